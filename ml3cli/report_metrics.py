"""Task-specific metrics reported beside the task loss at meta-test (``Task.report_metrics``, e.g. |θ − ν|).

:func:`ml3cli.evaluate.evaluate` records them beside the task loss, on the same optimizees; this module turns
them into a table.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.table import Table

from ml3cli.evaluate import LossCurves, NamedLoss, evaluate
from ml3cli.tasks.base import Task


def report_from_curves(curves: Sequence[LossCurves], steps: Sequence[int]) -> dict[str, dict[str, dict[str, float]]]:
    """``{loss: {metric: {step: mean over tasks × seeds}}}`` at each of ``steps``; ``{}`` if the task has none."""
    wanted = sorted(set(steps))
    return {
        c.label: {
            name: {str(step): float(grid[:, :, step].mean()) for step in wanted} for name, grid in c.extras.items()
        }
        for c in curves
        if c.extras
    }


def task_report(
    task: Task, losses: Sequence[NamedLoss], tasks: int, seeds: int, steps: Sequence[int], seed: int = 0
) -> dict[str, dict[str, dict[str, float]]]:
    """Meta-test ``losses`` (as :func:`ml3cli.evaluate.evaluate`) and report the task's metrics at ``steps``."""
    return report_from_curves(evaluate(task, losses, tasks, seeds, max(steps, default=0), seed), steps)


def print_task_report(console, task: Task, report: dict[str, dict[str, dict[str, float]]], count: int) -> None:
    """One table: a row per (loss, metric), a column per step."""
    first = next(iter(next(iter(report.values())).values()))
    table = Table(title=f"{task.name}: task metrics, mean over {count} tasks (0/1 metrics: fraction)")
    table.add_column("loss")
    table.add_column("metric")
    for step in first:
        table.add_column(f"step {step}", justify="right")
    for label, metrics in report.items():
        for name, by_step in metrics.items():
            table.add_row(label, name, *(f"{by_step[step]:.4g}" for step in first))
    console.print(table)
