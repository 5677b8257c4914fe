"""Meta-test (paper, algorithm 2): train fresh optimizees on new tasks with a given loss only.

Every loss under comparison starts from the same θ₀ on the same tasks for a given seed, so differences between
losses are paired. The recorded metric is the task's own task loss on held-out query points (e.g. MSE). The
optimizees train with plain SGD, the paper's inner loop, unless an inner optimizer is given (momentum or Adam,
:mod:`ml3cli.engine.inner_optimizers`, whose state starts afresh with each θ₀): every loss of one comparison
trains with the same one. With an :class:`~ml3cli.engine.online.Adaptation`, every learned loss keeps learning
while its optimizees train (online loss adaptation, from the support data only); hand-written losses stay fixed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.func import vmap
from torch.utils._pytree import tree_leaves, tree_map

from ml3cli.engine import InnerOptimizer, LossFn, detached, inner_gradient, inner_step
from ml3cli.engine.inner_optimizers import SGD
from ml3cli.engine.online import Adaptation, LossAdapter, RecordedData
from ml3cli.metaloss import MetaLoss
from ml3cli.runtime import generator, stream_seed
from ml3cli.tasks.base import Task


@dataclass(frozen=True)
class NamedLoss:
    """A loss to test: a label for tables, the function over the task's loss inputs, its SGD learning rate."""

    label: str
    fn: LossFn
    lr: float
    source: str = "builtin"  # "builtin" or the artifact's path
    metaloss: MetaLoss | None = None  #: M_φ of a learned loss (what online adaptation adapts), None for a built-in


@dataclass(frozen=True)
class LossCurves:
    """The metric of one loss: ``values[seed, task, step]`` for steps 0 … S (step 0 is θ₀), and the task's
    report metrics (``Task.report_metrics``, e.g. |θ − ν| or accuracy) in ``extras[name]``, same shape."""

    label: str
    lr: float
    source: str
    values: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    adapts: bool = False  #: whether φ learned online while these optimizees trained

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
    lr: float | torch.Tensor,
    steps: int,
    report: bool = False,
    gen: torch.Generator | None = None,
    record_at: Collection[int] | None = None,
    optimizer: InnerOptimizer = SGD(),
    adapter: LossAdapter | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train a batch of optimizees with ``loss_fn`` for ``steps`` steps of ``optimizer`` (plain SGD by default),
    its state fresh at ``theta``, at the learning rate ``lr``: one for all, or a tensor ``[n]``, one per optimizee.

    Returns the task loss ``[steps + 1, n]`` and, with ``report``, each of the task's report metrics likewise.
    A task that ``collects_data`` gathers fresh data with the current θ (from ``gen``) before every step and
    every measurement. ``record_at``: the steps to measure besides the last (NaN at the others; None: every
    step), for a protocol that reads a few steps of a long run (measuring can cost as much as the step). A task
    that collects data is measured at every step whatever ``record_at`` says: its measurement rollouts draw from
    the generator its training rollouts draw from, so skipping one would change the training.

    With an ``adapter`` the optimizees train with its loss (``loss_fn`` unused), whose φ every
    ``adapter.adaptation.every`` steps takes a step on the validation loss of the tasks' training data
    (:meth:`Task.validation_batch`; for a task that collects data, a fresh rollout of the current θ from ``gen``),
    through the last ``unroll`` steps (:mod:`ml3cli.engine.online`).
    """
    if task.collects_data and gen is None:
        raise ValueError(f"task {task.name!r} collects data and needs a generator")
    recorded = RecordedData(task, gen) if adapter is not None and task.collects_data else None
    if adapter is not None:
        loss_fn, adaptation, window = adapter.loss_fn, adapter.adaptation, (theta, optimizer.init(theta))
        if recorded is None:
            validation, estimator = task.validation_batch(batch), adapter.estimator(task, lr, optimizer)
        else:  # the replay reads the rollouts the steps trained on; L_val a fresh rollout (see engine.online)
            validation, estimator = batch, adapter.estimator(recorded, lr, optimizer)  # type: ignore[arg-type]
    gather = (lambda theta, purpose: task.collect(theta, batch, gen, purpose)) if task.collects_data else None
    if isinstance(lr, torch.Tensor):
        each = vmap(lambda theta, state, batch, lr: inner_step(task, loss_fn, theta, state, batch, lr, optimizer))
        step_fn = lambda theta, state, batch: each(theta, state, batch, lr)  # noqa: E731
    else:
        step_fn = vmap(lambda theta, state, batch: inner_step(task, loss_fn, theta, state, batch, lr, optimizer))
    state = optimizer.init(theta)
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
            if adapter is not None and adaptation.opens_window(step):
                window = theta, state
                if recorded is not None:
                    recorded.open()
            inner_batch = gather(theta, "inner") if gather is not None else batch
            if recorded is not None:
                recorded.record(inner_batch)
            theta, state = step_fn(theta, state, inner_batch)
            if adapter is not None and adaptation.due(step + 1):
                if recorded is not None:
                    recorded.collect_validation(theta, batch)
                adapter.adapt(estimator, window[0], validation, state=window[1], gen=gen)
        record(theta, steps)
    return stack(history), {name: stack(values) for name, values in extras.items()}


@dataclass(frozen=True)
class StepSizeRatio:
    """How much larger a learned loss's steps are than the baseline's at the same learning rate, along the learned
    loss's own meta-test trajectories: per task and step, r = scale·‖∇_θ ℓ_φ‖ / ‖∇_θ ℓ_baseline‖ at the same θ
    (``scale``: the learned step scale of a ``learned_lr`` loss, else 1; norms over all of θ). With an inner
    optimizer other than SGD the trajectories are its own and r still compares the gradients fed to it: the size
    of momentum's steps follows it, Adam's (normalised by √v̂) mostly does not."""

    mean: float  #: the mean of r over tasks, seeds and steps
    median: float
    low: float  #: 10th percentile
    high: float  #: 90th percentile
    points: int  #: (task, step) pairs measured (where the baseline's gradient is not zero)


def step_size_ratio(
    task: Task,
    learned: NamedLoss,
    baseline: NamedLoss,
    tasks: int,
    seeds: int | Sequence[int],
    steps: int,
    seed: int = 0,
    stream: str = "test",
    optimizer: InnerOptimizer = SGD(),
) -> StepSizeRatio:
    """:class:`StepSizeRatio` of ``learned`` against ``baseline`` on the tasks :func:`evaluate` draws for the same
    seeds and stream, training with ``learned`` at its own rate (as its meta-test does). A ratio far from 1 is a
    step size the loss has learned: a comparison at one shared learning rate then measures mostly that, which is
    why every loss is also compared at its own tuned rate."""

    def norms(theta, batch, loss_fn: LossFn) -> torch.Tensor:
        gradient, scale = inner_gradient(task, loss_fn, theta, batch)
        norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in gradient.values()]))
        return norm * (scale[0] if scale else 1.0)

    learned_norm = vmap(lambda theta, batch: norms(theta, batch, learned.fn))
    baseline_norm = vmap(lambda theta, batch: norms(theta, batch, baseline.fn))
    step_fn = vmap(lambda theta, state, batch: inner_step(task, learned.fn, theta, state, batch, learned.lr, optimizer))
    ratios = []
    for one_seed in range(seed, seed + seeds) if isinstance(seeds, int) else seeds:
        gen, batch, theta = draw_tasks(task, tasks, stream, one_seed)
        state = optimizer.init(theta)
        for _ in range(steps):
            data = task.collect(theta, batch, gen, "inner") if task.collects_data else batch
            base = baseline_norm(theta, data)
            keep = base > 0
            ratios.append((learned_norm(theta, data)[keep] / base[keep]).detach())
            theta, state = (detached(tree) for tree in step_fn(theta, state, data))
    r = torch.cat(ratios).double().cpu().numpy() if ratios else np.array([math.nan])
    finite = r[np.isfinite(r)]
    if not finite.size:
        return StepSizeRatio(math.nan, math.nan, math.nan, math.nan, 0)
    low, median, high = np.percentile(finite, [10, 50, 90])
    return StepSizeRatio(float(finite.mean()), float(median), float(low), float(high), int(finite.size))


def draw_tasks(task: Task, tasks: int, stream: str, seed: int) -> tuple[torch.Generator, Any, Any]:
    """The tasks and θ₀ that seed ``seed`` of the random stream ``stream`` draws (every loss, baseline and check
    of that seed starts from these), and the generator after the draws (rollouts go on drawing from it)."""
    gen = generator(stream_seed(stream, seed))
    batch = task.sample_tasks(tasks, gen)
    return gen, batch, task.init_theta(tasks, gen)


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
    optimizer: InnerOptimizer = SGD(),
    adaptation: Adaptation | None = None,
    together: bool = True,
) -> list[LossCurves]:
    """Meta-test every loss on ``tasks`` test tasks for each seed: ``seeds`` the seeds themselves, or a count of
    seeds from ``seed`` on (``seed``, ``seed + 1``, …). Seed s draws its tasks and θ₀ from the random stream
    ``stream`` of s (:func:`ml3cli.runtime.stream_seed`: never the draws of meta-training, and ``validation``
    never those of ``test``).

    ``on_seed(done)`` is called after each seed (for progress bars). ``record_at``: see :func:`train_curve`.
    Every loss trains with ``optimizer`` (plain SGD by default). With ``adaptation`` every learned loss (one with a
    ``metaloss``) adapts online, starting afresh from its φ for each seed; the hand-written ones stay fixed.
    ``together``: for a task that does not collect data, without adaptation, train the seeds and losses in batches
    (:func:`evaluate_together`: the same numbers, fewer kernels); False trains one seed and loss after another.
    """
    chosen = list(range(seed, seed + seeds) if isinstance(seeds, int) else seeds)
    if adaptation is not None:
        task.check_validation_split()
    elif not task.collects_data and together:
        return evaluate_together(task, losses, tasks, chosen, steps, on_seed, stream, record_at, optimizer)
    values: dict[str, list[np.ndarray]] = {loss.label: [] for loss in losses}
    extras: dict[str, dict[str, list[np.ndarray]]] = {loss.label: {} for loss in losses}
    report = has_report_metrics(task)
    for s, one_seed in enumerate(chosen):
        gen, batch, theta = draw_tasks(task, tasks, stream, one_seed)
        after_draws = gen.get_state()
        for loss in losses:
            gen.set_state(after_draws)  # every loss sees the same rollout randomness (paired comparisons)
            adapts = adaptation is not None and loss.metaloss is not None
            curve, reported = train_curve(
                task, loss.fn, theta, batch, loss.lr, steps, report, gen, record_at, optimizer,
                LossAdapter(loss.metaloss, adaptation) if adapts else None,
            )  # fmt: skip
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
            adaptation is not None and loss.metaloss is not None,
        )
        for loss in losses
    ]


#: how many numbers (θ and task data) one batched training of :func:`evaluate_together` may hold; the
#: activations come on top (a few times that for a small convolutional network)
BATCH_ELEMENTS = 50_000_000


def evaluate_together(
    task: Task,
    losses: Sequence[NamedLoss],
    tasks: int,
    seeds: Sequence[int],
    steps: int,
    on_seed: Callable[[int], None] | None = None,
    stream: str = "test",
    record_at: Collection[int] | None = None,
    optimizer: InnerOptimizer = SGD(),
    batch_elements: int = BATCH_ELEMENTS,
) -> list[LossCurves]:
    """:func:`evaluate` for a task that does not collect data: the optimizees of every seed, and of every loss
    that shares a function (one loss at several learning rates, as a rate search has), train together in one
    ``vmap`` with a learning rate per optimizee, in as few batches as ``batch_elements`` allows.

    Each optimizee trains as it would alone (its own θ₀, tasks and rate; nothing couples them), so the curves
    equal those of training one seed and loss after another (bit for bit on the machines measured; a test holds
    them to float32 rounding, as a kernel may sum in another order for another batch size). What changes is the
    number of small kernels launched, which is what a sweep of small optimizees waits for: a rate search on
    ``sine_shifted`` runs several times faster. Convolutional optimizees (LeNet) gain less: their time is the
    convolutions' own, which :func:`ml3cli.functional.per_optimizee_conv2d` runs one optimizee at a time (the
    grouped convolution ``vmap`` would make of them is slower, worse the more optimizees a batch holds), and a
    rate search on ``mnist_binary`` runs about 1.4× faster batched than looped (``benchmarks/sweeps.py``)."""
    draws = [draw_tasks(task, tasks, stream, one_seed)[1:] for one_seed in seeds]  # (tasks, θ₀) of each seed
    report = has_report_metrics(task)
    per_seed = sum(leaf.numel() for leaf in tree_leaves(draws[0]))
    capacity = max(1, batch_elements // max(1, per_seed))  # (seed, loss) pairs per batch
    groups: dict[int, list[int]] = {}  # losses that share a function train together
    for index, loss in enumerate(losses):
        groups.setdefault(id(loss.fn), []).append(index)
    total = len(seeds) * len(losses)
    trained: dict[tuple[int, int], tuple[np.ndarray, dict[str, np.ndarray]]] = {}
    for indices in groups.values():
        pairs = [(s, index) for s in range(len(seeds)) for index in indices]
        for start in range(0, len(pairs), capacity):
            chunk = pairs[start : start + capacity]
            batch, theta = tree_map(lambda *leaves: torch.cat(leaves), *[draws[s] for s, _ in chunk])
            like = tree_leaves(theta)[0]
            lr = torch.tensor([losses[index].lr for _, index in chunk], dtype=like.dtype, device=like.device)
            curve, reported = train_curve(
                task, losses[indices[0]].fn, theta, batch, lr.repeat_interleave(tasks), steps, report,
                record_at=record_at, optimizer=optimizer,
            )  # fmt: skip
            for k, pair in enumerate(chunk):
                part = slice(k * tasks, (k + 1) * tasks)
                trained[pair] = (
                    curve[:, part].T.cpu().double().numpy(),
                    {name: series[:, part].T.cpu().double().numpy() for name, series in reported.items()},
                )
            if on_seed is not None:
                on_seed(len(trained) * len(seeds) // total)
    return [
        LossCurves(
            loss.label,
            loss.lr,
            loss.source,
            np.stack([trained[s, index][0] for s in range(len(seeds))]),
            {name: np.stack([trained[s, index][1][name] for s in range(len(seeds))]) for name in trained[0, index][1]},
        )
        for index, loss in enumerate(losses)
    ]


def metric_at(curves: LossCurves, step: int, metric: str | None = None) -> np.ndarray:
    """Per seed, the mean over its tasks of the task metric (or the report metric ``metric``) at ``step``."""
    return curves.at(step) if metric is None else curves.extras[metric][:, :, step].mean(axis=1)


def lr_grid(center: float, span: float = 2.0, step: float = 0.5) -> list[float]:
    """A log grid of learning rates around ``center``, ``step`` decades apart, ``span`` decades either side."""
    half_width = round(span / step)
    return [center * 10 ** (k * step) for k in range(-half_width, half_width + 1)]


def widen_until_interior(
    score: Callable[[list[float]], dict[float, float]],
    center: float,
    span: float = 2.0,
    step: float = 0.5,
    max_widenings: int = 3,
) -> tuple[float, dict[float, float]]:
    """The rate with the lowest ``score(lrs) → {lr: final validation metric}`` (lower is better, +inf: diverged) on
    :func:`lr_grid` around ``center``, widened by two more rates at the edge that won until the choice is interior
    or ``max_widenings`` are spent; returns it and every score. A rate at the edge of the grid may only be the
    edge of what was tried, so a comparison that stopped there would not be a tuned one."""
    grid = lr_grid(center, span, step)
    scores: dict[float, float] = {}
    for _ in range(max_widenings + 1):
        todo = [lr for lr in grid if lr not in scores]
        if todo:
            scores.update(score(todo))
        ordered = sorted(scores)
        best = min(ordered, key=lambda lr: scores[lr])
        if best == ordered[0]:
            grid = [ordered[0] / 10 ** (k * step) for k in (1, 2)]
        elif best == ordered[-1]:
            grid = [ordered[-1] * 10 ** (k * step) for k in (1, 2)]
        else:
            break
    return best, dict(sorted(scores.items()))


def validation_scores(
    task: Task,
    loss: NamedLoss,
    lrs: Sequence[float],
    tasks: int,
    seeds: int | Sequence[int],
    steps: int,
    metric: str | None = None,
    optimizer: InnerOptimizer = SGD(),
    adaptation: Adaptation | None = None,
) -> dict[float, float]:
    """The final metric of ``loss`` at each rate, on tasks of the ``validation`` stream (diverging: +inf), trained
    with ``optimizer`` (and, for a learned loss, adapting online with ``adaptation``, as it will be tested)."""
    candidates = [dataclasses.replace(loss, label=f"{loss.label}@{lr!r}", lr=lr) for lr in lrs]
    scores = {}
    found = evaluate(
        task, candidates, tasks, seeds, steps, seed=0, stream="validation", record_at=(), optimizer=optimizer,
        adaptation=adaptation,
    )  # fmt: skip
    for lr, curves in zip(lrs, found, strict=True):
        value = float(metric_at(curves, steps, metric).mean())
        scores[lr] = value if math.isfinite(value) else math.inf
    return scores


def tune_lr(
    task: Task,
    loss: NamedLoss,
    center: float,
    tasks: int,
    seeds: int | Sequence[int],
    steps: int,
    metric: str | None = None,
    span: float = 2.0,
    step: float = 0.5,
    max_widenings: int = 3,
    optimizer: InnerOptimizer = SGD(),
    adaptation: Adaptation | None = None,
) -> tuple[float, dict[float, float]]:
    """The learning rate of ``loss`` with the lowest mean final metric on validation tasks of ``task``'s family
    (the ``validation`` random stream: never a test task), on a grid around ``center`` widened until the choice
    is interior (:func:`widen_until_interior`), trained with ``optimizer`` (and ``adaptation``, see
    :func:`validation_scores`). Returns the rate and every score."""
    return widen_until_interior(
        lambda lrs: validation_scores(task, loss, lrs, tasks, seeds, steps, metric, optimizer, adaptation),
        center, span, step, max_widenings,
    )  # fmt: skip


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
