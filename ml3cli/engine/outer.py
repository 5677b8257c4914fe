"""The outer loop (paper, algorithm 1): Adam on φ over meta-gradients of batches of tasks.

Per outer step: the task may update its state (``begin_outer_step``), θ₀ and the tasks are redrawn every
``inner.reset_period`` inner steps (the inner optimizer's state starts afresh with θ₀ and is carried beside θ in
between), the estimator chosen from the recipe gives ∇_φ L_T, and Adam (with the recipe's schedule and clipping)
updates φ. Everything random is drawn from one generator seeded by ``recipe.seed``, except
the logging diagnostics (:mod:`~.diagnostics`), so that φ depends neither on ``log_every`` nor on interruptions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ml3cli.engine.diagnostics import Diagnostics, diagnose, diagnostics_generator
from ml3cli.engine.estimators import MetaGradient, check_task_axis, estimator_for
from ml3cli.engine.inner_optimizers import InnerState, optimizer_for
from ml3cli.engine.state import MetaTrainState
from ml3cli.engine.unroll import Phi, task_objective
from ml3cli.errors import DivergenceError
from ml3cli.metaloss import MetaLoss
from ml3cli.recipes import OuterConfig, Recipe
from ml3cli.runtime import generator
from ml3cli.tasks.base import Task, Theta

if TYPE_CHECKING:
    from ml3cli.distributed import Shard


def build_metaloss(recipe: Recipe, task: Task, gen: torch.Generator) -> MetaLoss:
    """M_φ for ``task`` with the recipe's architecture, initialised from ``gen``."""
    config = recipe.meta_loss
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))
        metaloss = MetaLoss(
            task.loss_inputs_spec, config.hidden, config.activation, config.bias, config.output, config.learned_lr
        )
    return metaloss.to(task.device)


@dataclass
class MetaTrainResult:
    """The learned M_φ, the curves (one row per logging step) and the wall time of :func:`meta_train`."""

    metaloss: MetaLoss
    curves: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> dict[str, float]:
        """The last row of the curves (empty before any)."""
        return self.curves[-1] if self.curves else {}


# -- the outer optimiser --------------------------------------------------------------------------------------
class OuterOptimizer:
    """φ ← Adam(φ, clip(∇_φ)) with η constant or on a cosine from ``outer.lr`` to 0 over ``outer.steps``.

    ``first_step`` is the outer step the run starts at (after :meth:`MetaTrainState.restore` put Adam's state back
    on a resume): the schedule is a pure function of the step, so a resumed run continues it exactly.
    """

    def __init__(self, adam: torch.optim.Adam, outer: OuterConfig, first_step: int):
        self.adam, self.grad_clip = adam, outer.grad_clip
        self.schedule = None
        if outer.lr_schedule == "cosine":
            for group in adam.param_groups:
                group.setdefault("initial_lr", outer.lr)
            cosine = lambda done: 0.5 * (1 + math.cos(math.pi * done / outer.steps))  # noqa: E731
            self.schedule = torch.optim.lr_scheduler.LambdaLR(adam, cosine, last_epoch=first_step - 2)

    def clip(self, gradient: Phi, norm: float) -> Phi:
        """``gradient`` scaled down to the global norm ``grad_clip`` when its ``norm`` is larger."""
        if self.grad_clip is None or norm <= self.grad_clip:
            return gradient
        scale = self.grad_clip / (norm + 1e-12)
        return {name: g * scale for name, g in gradient.items()}

    def step(self, metaloss: MetaLoss, gradient: Phi) -> None:
        """One Adam step on M_φ's parameters with ``gradient`` (named as φ), then one step of the schedule."""
        for name, p in metaloss.named_parameters():
            p.grad = gradient[name]
        self.adam.step()
        if self.schedule is not None:
            self.schedule.step()


def global_norm(gradient: Phi) -> float:
    """‖∇_φ‖₂ over all of φ's tensors."""
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in gradient.values()])).item()


def require_finite(step: int, what: str, values: float | Iterable[Tensor]) -> None:
    """Raise :class:`DivergenceError` naming ``step`` and ``what`` unless every value is finite."""
    finite = math.isfinite(values) if isinstance(values, float) else all(bool(torch.isfinite(t).all()) for t in values)
    if not finite:
        raise DivergenceError(step, what)


def curve_row(
    step: int, estimate: MetaGradient, seen: Diagnostics, grad_norm: float, seconds: float
) -> dict[str, float]:
    """The row of the curves at a logging step (means over the tasks)."""
    return {
        "step": step,
        "meta/task_loss": estimate.task_loss.mean().item(),
        "meta/task_loss_before": seen.task_loss_before.mean().item(),
        "inner/learned_loss": seen.learned_loss.mean().item(),
        "meta/grad_norm": grad_norm,
        "time/seconds": seconds,
    }


def combined(shard: Shard, estimate: MetaGradient, seen: Diagnostics | None) -> tuple[MetaGradient, Diagnostics | None]:
    """The whole batch's view from every process's share: the gradients averaged, the per-task values gathered (the
    inner optimizer's state with θ)."""
    gradient = shard.mean(estimate.gradient)
    estimate = MetaGradient(gradient, *shard.gather((estimate.task_loss, estimate.theta, estimate.state)))
    if seen is not None:
        seen = Diagnostics(*shard.gather((seen.task_loss_before, seen.learned_loss)))
    return estimate, seen


# -- the loop -------------------------------------------------------------------------------------------------
def meta_train(
    recipe: Recipe,
    task: Task,
    on_step: Callable[[int, dict[str, float] | None], None] | None = None,
    *,
    resume: MetaTrainState | None = None,
    on_state: Callable[[int, Callable[[], MetaTrainState]], None] | None = None,
    shard: Shard | None = None,
) -> MetaTrainResult:
    """Algorithm 1: learn φ on ``task`` with the recipe's settings; deterministic for a given ``recipe.seed``.

    ``on_step(step, record)`` is called after every outer step (``record`` is the row written to the
    curves at logging steps, else None): the CLI hangs its progress bar here. ``on_state(step, snapshot)`` is
    called next; ``snapshot()`` returns the full :class:`MetaTrainState` after that step (the CLI writes
    checkpoints from it). ``resume`` continues from such a state, bit for bit as if never interrupted. With a
    ``shard`` this process differentiates its share of every task batch and the gradients are averaged.
    """
    inner, outer = recipe.inner, recipe.outer
    gen = generator(recipe.seed)
    metaloss = build_metaloss(recipe, task, gen)
    adam = torch.optim.Adam(metaloss.parameters(), lr=outer.lr)
    objective = task_objective(task, recipe.task_loss)
    estimator = estimator_for(inner, task, objective)
    inner_optimizer = optimizer_for(inner)

    result = MetaTrainResult(metaloss)
    theta: Theta | None = None
    state: InnerState = {}  # the inner optimizer's state beside θ (none for SGD)
    batch: Any = None
    age = 0  # inner steps θ has taken since its last initialisation
    first = 1
    if resume is not None:
        resume.restore(metaloss, adam, gen)
        theta, state, batch, age, first = resume.theta, resume.inner_state, resume.batch, resume.age, resume.step + 1
        result.curves = [dict(row) for row in resume.curves]
        task.load_state_tensors(resume.task_state)
    optimizer = OuterOptimizer(adam, outer, first)
    started = time.perf_counter() - (resume.seconds if resume is not None else 0.0)

    def snapshot(step: int, theta: Theta, state: InnerState, batch: Any, age: int) -> Callable[[], MetaTrainState]:
        """The state after ``step``, captured when the caller asks for it (checkpoints are not written every step)."""
        return lambda: MetaTrainState.capture(
            step, metaloss, adam, gen, theta, batch, age, result.curves, time.perf_counter() - started,
            task.state_tensors(), inner_state=state,
        )  # fmt: skip

    for step in range(first, outer.steps + 1):
        task.begin_outer_step(step, theta, gen)
        if theta is None or age >= inner.reset_period:
            batch = task.sample_tasks(outer.tasks, gen)
            theta = task.init_theta(outer.tasks, gen)
            state = inner_optimizer.init(theta)  # a fresh θ₀ has taken no step: no momentum, no moments
            age = 0
        if step == first:  # θ keeps its layout from one redraw to the next
            check_task_axis(theta, batch)
        phi = {name: p.detach() for name, p in metaloss.named_parameters()}
        logging = step % recipe.log_every == 0 or step == outer.steps or step == 1

        estimate = estimator.estimate(metaloss, phi, theta, batch, gen, shard, state=state)
        seen = None
        if logging:
            own_stream = diagnostics_generator(recipe.seed, step)
            seen = diagnose(metaloss, phi, task, theta, batch, objective, own_stream, shard)
        if shard is not None:
            estimate, seen = combined(shard, estimate, seen)

        require_finite(step, "the task loss", [estimate.task_loss])
        require_finite(step, "the meta-gradient", estimate.gradient.values())
        require_finite(step, "θ after the inner steps", estimate.theta.values())
        grad_norm = global_norm(estimate.gradient)
        require_finite(step, "the meta-gradient's norm", grad_norm)  # an overflowing norm would silently stall Adam
        optimizer.step(metaloss, optimizer.clip(estimate.gradient, grad_norm))
        require_finite(step, "φ after the Adam step", (p.detach() for p in metaloss.parameters()))
        theta, state, age = estimate.theta, estimate.state, age + inner.steps

        record = None
        if seen is not None:
            record = curve_row(step, estimate, seen, grad_norm, time.perf_counter() - started)
            result.curves.append(record)
        if on_step is not None:
            on_step(step, record)
        if on_state is not None:
            on_state(step, snapshot(step, theta, state, batch, age))
    result.seconds = time.perf_counter() - started
    return result
