"""Terminal output shared by the commands: number formatting and the progress bar."""

from __future__ import annotations

import math

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def fmt(value: float | None) -> str:
    """A number in 4 significant digits, small ones in scientific notation (``0.01234``, ``1.23e-05``); ``n/a``
    for None (a number an artifact did not record)."""
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def fmt_spread(value: float) -> str:
    """A spread (std, sd) in 2 significant digits: enough beside a 4-digit mean, and the table stays narrow."""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def progress_bar(console: Console, quiet: bool) -> Progress:
    """A progress bar with elapsed and remaining time; ``quiet`` hides it."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )


def warn_if_oversubscribed(threads: int, processes: int) -> None:
    """Before any work: say on stderr when ``processes`` runs of ``threads`` threads each exceed the cores."""
    from ml3cli.runtime import oversubscription  # torch: only when a command runs

    warning = oversubscription(threads, processes)
    if warning:
        Console(stderr=True, highlight=False).print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True)
