"""Meta-test (paper, algorithm 2): train fresh optimizees on new tasks with a given loss only.

Every loss under comparison starts from the same θ₀ on the same tasks for a given seed, so differences between
losses are paired. The recorded metric is the task's own task loss on held-out query points (e.g. MSE).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import vmap

from ml3cli.engine import LossFn, sgd_step
from ml3cli.runtime import generator, stream_seed
from ml3cli.tasks.base import Task

#: learning rates tried when a baseline's rate is tuned (on tasks the test never sees).
BASELINE_LR_SWEEP = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
#: tuning draws its tasks from seeds this far from the test seeds, so that it never sees a test task.
TUNING_SEED_OFFSET = 10_000


@dataclass(frozen=True)
class NamedLoss:
    """A loss to test: a label for tables, the function over the task's loss inputs, its SGD learning rate."""

    label: str
    fn: LossFn
    lr: float
    source: str = "builtin"  # "builtin" or the artifact's path


@dataclass(frozen=True)
class LossCurves:
    """The metric of one loss: ``values[seed, task, step]`` for steps 0 … S (step 0 is θ₀), and the task's
    report metrics (``Task.report_metrics``, e.g. |θ − ν| or accuracy) in ``extras[name]``, same shape."""

    label: str
    lr: float
    source: str
    values: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def per_seed(self) -> np.ndarray:
        """Mean over the test tasks: ``[seeds, steps + 1]``."""
        return self.values.mean(axis=1)

    def at(self, step: int) -> np.ndarray:
        return self.per_seed[:, step]

    def steps_to(self, threshold: float) -> list[int | None]:
        """Per seed: the first step at which the mean metric is at or below ``threshold`` (None: never)."""
        out: list[int | None] = []
        for curve in self.per_seed:
            hits = np.nonzero(curve <= threshold)[0]
            out.append(int(hits[0]) if hits.size else None)
        return out


def train_curve(
    task: Task,
    loss_fn: LossFn,
    theta,
    batch,
    lr: float,
    steps: int,
    report: bool = False,
    gen: torch.Generator | None = None,
    record_at: Collection[int] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train a batch of optimizees with ``loss_fn`` for ``steps`` SGD steps.

    Returns the task loss ``[steps + 1, n]`` and, with ``report``, each of the task's report metrics likewise.
    A task that ``collects_data`` gathers fresh data with the current θ (from ``gen``) before every step and
    every measurement. ``record_at``: the steps to measure besides the last (NaN at the others; None: every
    step), for a protocol that reads a few steps of a long run (measuring can cost as much as the step). A task
    that collects data is measured at every step whatever ``record_at`` says: its measurement rollouts draw from
    the generator its training rollouts draw from, so skipping one would change the training.
    """
    if task.collects_data and gen is None:
        raise ValueError(f"task {task.name!r} collects data and needs a generator")
    gather = (lambda theta, purpose: task.collect(theta, batch, gen, purpose)) if task.collects_data else None
    step_fn = vmap(lambda theta, batch: sgd_step(task, loss_fn, theta, batch, lr))
    metric_fn = vmap(task.task_loss)
    report_fn = vmap(task.report_metrics) if report else None
    history: list[torch.Tensor | None] = []
    extras: dict[str, list[torch.Tensor | None]] = {}
    every = record_at is None or task.collects_data
    wanted = {*(record_at or ()), steps}

    def record(theta, step: int) -> None:
        if not every and step not in wanted:
            history.append(None)
            for values in extras.values():
                values.append(None)
            return
        measured = gather(theta, "task_loss") if gather is not None else batch
        history.append(metric_fn(theta, measured))
        if report_fn is not None:
            for name, values in report_fn(theta, measured).items():
                extras.setdefault(name, [None] * (len(history) - 1)).append(values)

    def stack(values: list[torch.Tensor | None]) -> torch.Tensor:
        shape = next(v for v in values if v is not None)
        return torch.stack([torch.full_like(shape, math.nan) if v is None else v for v in values])

    with torch.no_grad():
        for step in range(steps):
            record(theta, step)
            theta = step_fn(theta, gather(theta, "inner") if gather is not None else batch)
        record(theta, steps)
    return stack(history), {name: stack(values) for name, values in extras.items()}


def has_report_metrics(task: Task) -> bool:
    """Whether ``task`` reports metrics beside its task loss (its family overrides ``Task.report_metrics``)."""
    return type(task).report_metrics is not Task.report_metrics


def evaluate(
    task: Task,
    losses: Sequence[NamedLoss],
    tasks: int,
    seeds: int | Sequence[int],
    steps: int,
    seed: int = 0,
    on_seed: Callable[[int], None] | None = None,
    stream: str = "test",
    record_at: Collection[int] | None = None,
) -> list[LossCurves]:
    """Meta-test every loss on ``tasks`` test tasks for each seed: ``seeds`` the seeds themselves, or a count of
    seeds from ``seed`` on (``seed``, ``seed + 1``, …). Seed s draws its tasks and θ₀ from the random stream
    ``stream`` of s (:func:`ml3cli.runtime.stream_seed`: never the draws of meta-training, and ``validation``
    never those of ``test``).

    ``on_seed(done)`` is called after each seed (for progress bars). ``record_at``: see :func:`train_curve`.
    """
    values: dict[str, list[np.ndarray]] = {loss.label: [] for loss in losses}
    extras: dict[str, dict[str, list[np.ndarray]]] = {loss.label: {} for loss in losses}
    report = has_report_metrics(task)
    chosen = range(seed, seed + seeds) if isinstance(seeds, int) else seeds
    for s, one_seed in enumerate(chosen):
        gen = generator(stream_seed(stream, one_seed))
        batch = task.sample_tasks(tasks, gen)
        theta = task.init_theta(tasks, gen)
        after_draws = gen.get_state()
        for loss in losses:
            gen.set_state(after_draws)  # every loss sees the same rollout randomness (paired comparisons)
            curve, reported = train_curve(task, loss.fn, theta, batch, loss.lr, steps, report, gen, record_at)
            values[loss.label].append(curve.T.cpu().double().numpy())
            for name, series in reported.items():
                extras[loss.label].setdefault(name, []).append(series.T.cpu().double().numpy())
        if on_seed is not None:
            on_seed(s + 1)
    return [
        LossCurves(
            loss.label,
            loss.lr,
            loss.source,
            np.stack(values[loss.label]),
            {name: np.stack(series) for name, series in extras[loss.label].items()},
        )
        for loss in losses
    ]


def tune_lr(
    task: Task,
    loss: NamedLoss,
    lrs: Sequence[float],
    tasks: int,
    seeds: int | Sequence[int],
    steps: int,
    seed: int = 0,
) -> tuple[float, dict[float, float]]:
    """The learning rate from ``lrs`` with the lowest mean final metric of ``loss`` on ``task``.

    The tasks come from the ``validation`` random stream, so the choice never sees a test task. Diverging rates
    score +inf.
    """
    candidates = [NamedLoss(f"{loss.label}@{lr:g}", loss.fn, lr, loss.source) for lr in lrs]
    scores: dict[float, float] = {}
    for candidate, curves in zip(
        candidates, evaluate(task, candidates, tasks, seeds, steps, seed, stream="validation"), strict=True
    ):
        final = float(curves.at(steps).mean())
        scores[candidate.lr] = final if math.isfinite(final) else math.inf
    best = min(scores, key=lambda lr: scores[lr])
    return best, scores


@dataclass(frozen=True)
class PairedDifference:
    """``other − reference`` of the final metric, paired by seed."""

    reference: str
    other: str
    mean: float
    low: float
    high: float
    reference_wins: int
    seeds: int


def t_quantile_975(df: int) -> float:
    """Student's t quantile t_{0.975, df}: the half-width factor of a two-sided 95% confidence interval."""
    # scipy is imported here, not at the top, so that `import ml3cli` (and the loss alone) stays light.
    from scipy.stats import t

    if df < 1:
        raise ValueError(f"a t quantile needs at least 1 degree of freedom, got {df}")
    return float(t.ppf(0.975, df))


def paired_difference(reference: LossCurves, other: LossCurves, step: int) -> PairedDifference:
    """``other − reference`` of the mean metric at ``step``, paired by seed, with a two-sided 95% Student-t
    confidence interval of the mean difference (NaN bounds for a single seed)."""
    diff = other.at(step) - reference.at(step)
    n = diff.size
    mean = float(diff.mean())
    if n > 1:
        half = t_quantile_975(n - 1) * float(diff.std(ddof=1)) / math.sqrt(n)
    else:
        half = math.nan
    wins = int((reference.at(step) < other.at(step)).sum())
    return PairedDifference(reference.label, other.label, mean, mean - half, mean + half, wins, n)
