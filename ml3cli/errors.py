"""The one exception type for mistakes a user can fix (bad recipe, bad file, bad flag).

The CLI renders an :class:`ML3Error` as one line on stderr and exits with code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pydantic


class ML3Error(Exception):
    """A user-facing error: the message names the file or field, what was expected, and how to fix it."""


class MissingExtra(ML3Error):
    """``needed_by`` (a task, a simulator) needs ``module`` from an optional extra that is not installed."""

    def __init__(self, needed_by: str, module: str, extra: str):
        super().__init__(
            f"{needed_by} needs {module}, which is not installed: it comes with the optional extra [{extra}], "
            f"pip install 'ml3cli[{extra}]'"
        )
        self.needed_by = needed_by
        self.module = module
        self.extra = extra


#: the top-level modules of the simulators extra, ``pip install 'ml3cli[sim]'``
SIMULATOR_MODULES = ("mujoco", "gymnasium", "pybullet", "pybullet_data")


@contextlib.contextmanager
def simulators_needed(what: str) -> Iterator[None]:
    """Around the imports of a simulator: a missing one becomes one :class:`MissingExtra` naming the extra.

    ``what`` names the part that needs it (``"the MuJoCo Reacher"``). gymnasium's own guard (gymnasium installed,
    mujoco not) counts as missing mujoco; any other import error keeps its traceback.
    """
    try:
        yield
    except ImportError as err:
        root = (err.name or "").partition(".")[0]
        if root not in SIMULATOR_MODULES:
            raise
        raise MissingExtra(what, root, "sim") from None
    except Exception as err:
        if type(err).__name__ != "DependencyNotInstalled":
            raise
        raise MissingExtra(what, "mujoco", "sim") from None


def one_of(word: str, choices: Iterable[str], known: str = "known") -> str:
    """``; did you mean 'sine'? known: a, b, c``: what a refusal of ``word`` appends (a close match first)."""
    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ";"
    return f"{hint} {known}: {', '.join(choices)}"


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


def describe_validation_error(
    err: pydantic.ValidationError, prefix: str = "", model: type[pydantic.BaseModel] | None = None
) -> str:
    """One line for the first problem pydantic found: ``field.path: what was expected (got value)``.

    With ``model`` (the class that was validated), an unknown field also lists the valid fields at its place and
    suggests the closest one: ``unknown field `outer.stpes`; did you mean 'steps'? known: grad_clip, lr, ...``.
    """
    first = err.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first["loc"])
    if prefix:  # a flag (--task-option) is followed by the key, a recipe section by a dot
        loc = f"{prefix} {loc}" if prefix.startswith("-") else ".".join(filter(None, (prefix, loc)))
    loc = loc or "<top level>"
    if first["type"] == "extra_forbidden":
        fields = _fields_at(model, first["loc"][:-1]) if model is not None else None
        known = one_of(str(first["loc"][-1]), fields) if fields else ""
        return f"unknown field `{loc}`{known}"
    if first["type"] == "missing":
        return f"missing required field `{loc}`"
    got = repr(first.get("input"))
    got = got if len(got) <= 80 else got[:79] + "…"  # a value can be megabytes long: the line stays one line
    msg = first["msg"].removeprefix("Value error, ")
    return f"field `{loc[:200]}`: {msg[:300]} (got {got})"


def _fields_at(model: Any, path: tuple[Any, ...]) -> list[str] | None:
    """The field names of the pydantic model found by following ``path`` from ``model`` (None: not a model)."""
    import typing

    from pydantic import BaseModel

    def model_in(annotation: Any) -> Any:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        return next((m for m in map(model_in, typing.get_args(annotation)) if m is not None), None)

    for part in path:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        model = model_in(field.annotation) if field is not None else None
        if model is None:
            return None
    return list(model.model_fields)
