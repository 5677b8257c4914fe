"""Task-specific metrics reported beside the task loss at meta-test (``Task.report_metrics``, e.g. |θ − ν|).

The tasks, initialisations and SGD steps are exactly those of :func:`ml3cli.evaluate.evaluate` for the same
seed (same generator draws in the same order), so the numbers describe the same optimizees as its curves.
Tasks that report nothing cost nothing here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from rich.table import Table
from torch.func import vmap

from ml3cli.engine import sgd_step
from ml3cli.evaluate import NamedLoss
from ml3cli.runtime import generator
from ml3cli.tasks.base import Task


def task_report(
    task: Task, losses: Sequence[NamedLoss], tasks: int, seeds: int, steps: Sequence[int], seed: int = 0
) -> dict[str, dict[str, dict[str, float]]]:
    """``{loss: {metric: {step: mean over tasks × seeds}}}`` at each of ``steps``; ``{}`` if the task has none."""
    gen = generator(seed)
    batch = task.sample_tasks(1, gen)
    theta = task.init_theta(1, gen)
    if not task.report_metrics({k: v[0] for k, v in theta.items()}, type(batch)(*(t[0] for t in batch))):
        return {}
    wanted = sorted(set(steps))
    last = wanted[-1] if wanted else 0
    sums: dict[str, dict[str, dict[int, float]]] = {}
    metric_fn = vmap(task.report_metrics)
    for s in range(seeds):
        gen = generator(seed + s)
        batch = task.sample_tasks(tasks, gen)
        theta0 = task.init_theta(tasks, gen)
        for loss in losses:
            step_fn = vmap(lambda theta, batch, fn=loss.fn, lr=loss.lr: sgd_step(task, fn, theta, batch, lr))
            theta = theta0
            per_loss = sums.setdefault(loss.label, {})
            with torch.no_grad():
                for step in range(last + 1):
                    if step in wanted:
                        for name, values in metric_fn(theta, batch).items():
                            slot = per_loss.setdefault(name, {})
                            slot[step] = slot.get(step, 0.0) + float(values.double().sum())
                    if step < last:
                        theta = step_fn(theta, batch)
    count = tasks * seeds
    return {
        label: {name: {str(step): total / count for step, total in by_step.items()} for name, by_step in m.items()}
        for label, m in sums.items()
    }


def print_task_report(console, task: Task, report: dict[str, dict[str, dict[str, float]]], count: int) -> None:
    """One table: a row per (loss, metric), a column per step."""
    first = next(iter(next(iter(report.values())).values()))
    table = Table(title=f"{task.name}: task metrics, mean over {count} tasks (0/1 metrics: the fraction)")
    table.add_column("loss")
    table.add_column("metric")
    for step in first:
        table.add_column(f"step {step}", justify="right")
    for label, metrics in report.items():
        for name, by_step in metrics.items():
            table.add_row(label, name, *(f"{by_step[step]:.4g}" for step in first))
    console.print(table)
