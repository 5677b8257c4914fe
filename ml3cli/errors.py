"""The one exception type for mistakes a user can fix (bad recipe, bad file, bad flag).

The CLI renders an :class:`ML3Error` as one line on stderr and exits with code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pydantic


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


class RunInterrupted(Exception):
    """SIGINT or SIGTERM stopped a run; the CLI prints how to resume and exits with 128 + the signal number.

    ``checkpoint`` is where the run's state was kept (None when nothing was); ``outer_step`` the last outer step
    it holds; ``resume_command`` the exact command line to continue (filled in by the CLI).
    """

    def __init__(self, signum: int, outer_step: int | None, checkpoint: str | None, note: str = ""):
        import signal

        self.signum = signum
        self.outer_step = outer_step
        self.checkpoint = checkpoint
        self.resume_command: str | None = None
        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else f"signal {signum}"
        if checkpoint:
            at = f" at outer step {outer_step}" if outer_step is not None else ""
            kept = f"checkpoint{at} kept at {checkpoint}"
        else:
            kept = "no checkpoint was written yet"
        super().__init__(f"interrupted by {name}{note}; {kept}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def describe_validation_error(err: pydantic.ValidationError, prefix: str = "") -> str:
    """One line for the first problem pydantic found: ``field.path: what was expected (got value)``."""
    first = err.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in ((prefix,) if prefix else ()) + tuple(first["loc"]))
    loc = loc or "<top level>"
    if first["type"] == "extra_forbidden":
        return f"unknown field `{loc}`"
    if first["type"] == "missing":
        return f"missing required field `{loc}`"
    got = first.get("input")
    msg = first["msg"].removeprefix("Value error, ")
    return f"field `{loc}`: {msg} (got {got!r})"
