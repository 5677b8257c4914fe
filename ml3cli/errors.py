"""The one exception type for mistakes a user can fix (bad recipe, bad file, bad flag).

The CLI renders an :class:`ML3Error` as one line on stderr and exits with code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class ML3Error(Exception):
    """A user-facing error: the message names the file or field, what was expected, and how to fix it."""


class DivergenceError(ML3Error):
    """Meta-training produced a non-finite loss or gradient."""

    def __init__(self, outer_step: int, what: str, kept: str | None = None):
        hint = "lower inner.lr or outer.lr, or set outer.grad_clip"
        kept_note = f"; the last good checkpoint is kept at {kept}" if kept else ""
        super().__init__(f"meta-training diverged at outer step {outer_step}: {what} is not finite ({hint}){kept_note}")
        self.outer_step = outer_step
        self.what = what
