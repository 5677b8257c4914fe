"""The ML³ engine: inner unroll, meta-gradient and outer loop (paper, section 3.1, algorithm 1).

It knows nothing of sines or robots: a :class:`~ml3cli.tasks.base.Task` supplies tasks, the optimizee, the
loss inputs and the task loss. Everything is written with ``torch.func``: θ is a ``dict[str, Tensor]``, inner
updates are out of place, and a batch of tasks is one ``vmap``.

One outer step (a meta-update of φ):

    θ_{k+1} = θ_k − α ∇_θ mean_i M_φ(inputs_i(θ_k))            k = 0 … K−1   (inner SGD, per task)
    L_T(φ)  = mean_tasks [β · task_loss(θ_K) + Σ_j γ_j · extra_j(θ_K)]       (on held-out query data)
    φ      ← Adam(φ, ∇_φ L_T)                                            (full second order through all K steps)

With ``truncate`` the gradient of step k is taken at a detached θ_k: dθ_{k+1}/dφ = dθ_k/dφ − α ∂²M/∂θ∂φ, i.e.
the θ–θ Hessian chain is dropped and the mixed term kept. (Dropping the mixed term too would make the
meta-gradient exactly zero: ML³ has no first-order shortcut.) Then dL_T/dφ = −α Σ_k (∂g_k/∂φ)ᵀ v with
v = ∂L_T/∂θ_K, so the engine keeps only the K values of θ_k and rebuilds one step's graph at a time: memory
O(K·|θ|) instead of O(K) autograd graphs (:func:`truncated_meta_gradient`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vmap
from torch.utils._pytree import tree_map

from ml3cli.checkpoints import MetaTrainState
from ml3cli.errors import DivergenceError
from ml3cli.metaloss import MetaLoss
from ml3cli.recipes import InnerConfig, Recipe, TaskLossConfig
from ml3cli.runtime import generator
from ml3cli.tasks.base import Task, Theta

if TYPE_CHECKING:
    from ml3cli.distributed import Shard

#: A loss over a task's named loss inputs, e.g. ``lambda inputs: mse(**inputs)``. A learned loss that also sets
#: the inner learning rate (``meta_loss.learned_lr``) returns ``(loss, scale)``: the step is θ − α·scale·∇_θ loss,
#: the scale evaluated at θ but not differentiated with respect to it (φ still reaches it).
LossFn = Callable[[dict[str, Tensor]], Tensor | tuple[Tensor, Tensor]]
Phi = dict[str, Tensor]


def detached(theta: Theta) -> Theta:
    return {name: value.detach() for name, value in theta.items()}


def loss_and_scale(value: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    """A :data:`LossFn`'s result as (loss, step scale or None)."""
    return value if isinstance(value, tuple) else (value, None)


def loss_value(value: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """A :data:`LossFn`'s loss, without a learned step scale."""
    return loss_and_scale(value)[0]


def inner_loss(task: Task, loss_fn: LossFn, theta: Theta, batch: Any) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The inner loss for ONE task and its learned step scale as ``(scale,)``, or ``()`` for a plain loss (the form
    torch.func's aux outputs and ``vmap`` need: tensors only)."""
    loss, scale = loss_and_scale(loss_fn(task.loss_inputs(theta, batch)))
    return loss, () if scale is None else (scale,)


def inner_gradient(task: Task, loss_fn: LossFn, theta: Theta, batch: Any) -> tuple[Theta, tuple[Tensor, ...]]:
    """∇_θ of the inner loss for ONE task, and the learned step scale (undifferentiated aux output)."""
    return grad(lambda theta: inner_loss(task, loss_fn, theta, batch), has_aux=True)(theta)


def sgd_step(task: Task, loss_fn: LossFn, theta: Theta, batch: Any, lr: float, truncate: bool = False) -> Theta:
    """One inner SGD step for ONE task: θ' = θ − α ∇_θ loss_fn(task.loss_inputs(θ, batch)) (α·scale with a
    learned learning rate)."""
    gradient, scale = inner_gradient(task, loss_fn, detached(theta) if truncate else theta, batch)
    step = lr * scale[0] if scale else lr
    return {name: theta[name] - step * gradient[name] for name in theta}


def unroll(
    task: Task, loss_fn: LossFn, theta: Theta, batch: Any, lr: float, steps: int, truncate: bool = False
) -> Theta:
    """``steps`` differentiable inner SGD steps for ONE task."""
    for _ in range(steps):
        theta = sgd_step(task, loss_fn, theta, batch, lr, truncate)
    return theta


def sgd_step_autograd(
    task: Task, loss_fn: LossFn, theta: Theta, batch: Any, lr: float, truncate: bool = False, batched: bool = False
) -> Theta:
    """:func:`sgd_step` with ``torch.autograd.grad(create_graph=True)`` instead of ``torch.func.grad``: the same
    update and the same second-order graph, outside ``vmap``, and cheaper (torch.func's grad transform costs more
    per operation than the work of these small networks). For ONE task, or with ``batched`` for a batch of tasks
    (leading axis) whose forward passes run in one ``vmap``: the gradient of the SUM of the per-task losses with
    respect to the stacked θ is every task's own gradient, because θ_i enters only loss_i."""
    at = {
        name: value if value.requires_grad and not truncate else value.detach().requires_grad_()
        for name, value in theta.items()
    }

    def one_task(theta: Theta, batch: Any) -> tuple[Tensor, tuple[Tensor, ...]]:
        return inner_loss(task, loss_fn, theta, batch)

    loss, scale = vmap(one_task)(at, batch) if batched else one_task(at, batch)
    gradient = torch.autograd.grad(
        loss.sum(), list(at.values()), create_graph=True, allow_unused=True, materialize_grads=True
    )

    def step(g: Tensor) -> Tensor:  # α, or α·scale broadcast over each task's entries
        return lr if not scale else lr * scale[0].reshape(scale[0].shape + (1,) * (g.ndim - scale[0].ndim))

    return {name: theta[name] - step(g) * g for name, g in zip(at, gradient, strict=True)}


def task_objective(task: Task, weights: TaskLossConfig) -> Callable[[Theta, Any], Tensor]:
    """L_T for ONE task: β · task loss + Σ γ_j · extra_j (paper, equation 9)."""

    def objective(theta: Theta, batch: Any) -> Tensor:
        loss = weights.weight * task.task_loss(theta, batch)
        for name, gamma in weights.extra.items():
            loss = loss + gamma * task.extra_term(name, theta, batch)
        return loss

    return objective


def learned_loss_fn(metaloss: MetaLoss, phi: Phi) -> LossFn:
    """M_φ as a :data:`LossFn` with φ given explicitly (so that ``torch.func.grad`` can differentiate it)."""
    return metaloss.inner_loss_with_phi(phi)


@dataclass(frozen=True)
class MetaStep:
    """What one meta-gradient evaluation saw; tensors have a leading task axis."""

    task_loss: Tensor  # [n]  L_T after the K inner steps
    theta: Theta  # θ_K, detached
    task_loss_before: Tensor | None = None  # [n]  L_T at θ_0 of this unroll (with diagnostics)
    learned_loss: Tensor | None = None  # [n]  M_φ at θ_0, the inner loss the first step descended (with diagnostics)


def meta_gradient(
    metaloss: MetaLoss,
    phi: Phi,
    task: Task,
    theta: Theta,
    batch: Any,
    inner: InnerConfig,
    objective: Callable[[Theta, Any], Tensor],
    diagnostics: bool = True,
    single_task_path: bool = True,
    gen: torch.Generator | None = None,
    shard: Shard | None = None,
) -> tuple[Phi, MetaStep]:
    """∇_φ of the mean task loss over a batch of tasks after K inner steps, and what the step saw.

    Each inner step runs the tasks' forward passes in one ``vmap`` and takes every task's inner gradient at once
    with ``torch.autograd.grad(create_graph=True)`` of the summed losses (:func:`sgd_step_autograd`); the outer
    derivative is one reverse pass through all of it. Measured 1.2–1.4× faster than ``torch.func.grad`` inside
    ``vmap`` at 8–64 sine tasks (whose per-operation overhead exceeds the work of these small networks), and
    faster than nesting a second ``torch.func.grad`` level. A batch of ONE task skips ``vmap`` altogether
    (``single_task_path``). A task that ``collects_data`` gets its data from ``task.collect`` (drawing from
    ``gen``) before every inner step and before L_T, the simulator outside autograd and ``vmap``.
    With ``inner.task_loss_at == "every"`` L_T is the mean over the θ after each inner step.
    ``diagnostics`` adds the task loss and learned loss at θ₀ (two forward passes, no gradient).
    With a ``shard`` (one of several processes) ``theta`` and ``batch`` are the WHOLE batch and this process
    differentiates its share; the data of a task that collects it are gathered for the whole batch on every process
    (from the θ of all shares), so that the random stream ``gen`` is drawn exactly as by a single process and the
    result does not depend on the number of processes: the simulation is repeated, the differentiation is split.
    """
    collect = task.collect
    if shard is not None:
        n_tasks = len(next(iter(theta.values())))
        whole_batch = batch
        theta, batch = shard.part((theta, batch), n_tasks)

        def collect(theta: Theta, _: Any, gen: torch.Generator | None, purpose: str) -> Any:
            return shard.part(task.collect(shard.gather(theta), whole_batch, gen, purpose), n_tasks)

    phi = {name: value.detach().requires_grad_() for name, value in phi.items()}
    loss_fn = learned_loss_fn(metaloss, phi)
    every = inner.task_loss_at == "every"

    gradient: Phi | None = None
    if inner.truncate and not task.collects_data:
        gradient, after, theta_k = truncated_meta_gradient(metaloss, phi, task, theta, batch, inner, objective)
    elif single_task_path and not task.collects_data and len(next(iter(theta.values()))) == 1:
        one_theta, one_batch = tree_map(lambda t: t[0], (theta, batch))
        total = 0.0
        for _ in range(inner.steps):
            one_theta = sgd_step_autograd(task, loss_fn, one_theta, one_batch, inner.lr, inner.truncate)
            if every:
                total = total + objective(one_theta, one_batch)
        one_after = total / inner.steps if every else objective(one_theta, one_batch)
        after, theta_k = tree_map(lambda t: t.unsqueeze(0), (one_after, one_theta))
    else:
        if task.collects_data and gen is None:
            raise ValueError(f"task {task.name!r} collects data and needs a generator")

        def data(theta: Theta, purpose: str) -> Any:
            return collect(detached(theta), batch, gen, purpose) if task.collects_data else batch

        theta_k, total = theta, 0.0
        for k in range(inner.steps):
            theta_k = sgd_step_autograd(
                task, loss_fn, theta_k, data(theta_k, "inner"), inner.lr, inner.truncate, batched=True
            )
            if every or k == inner.steps - 1:
                total = total + vmap(objective)(theta_k, data(theta_k, "task_loss"))
        after = total / inner.steps if every else total
    if gradient is None and after.requires_grad:  # (the truncated path returns its own gradient)
        grads = torch.autograd.grad(after.mean(), list(phi.values()), allow_unused=True, materialize_grads=True)
        gradient = dict(zip(phi, grads, strict=True))
    elif gradient is None:  # the task loss does not depend on φ at all (e.g. every unit of M_φ is dead)
        gradient = {name: torch.zeros_like(value) for name, value in phi.items()}
    before = learned = None
    if diagnostics:
        with torch.no_grad():
            measured = collect(theta, batch, gen, "task_loss") if task.collects_data else batch
            inputs = collect(theta, batch, gen, "inner") if task.collects_data else batch
            before = vmap(objective)(theta, measured)
            learned = vmap(lambda theta, batch: loss_value(loss_fn(task.loss_inputs(theta, batch))))(theta, inputs)
    return gradient, MetaStep(after.detach(), detached(theta_k), before, learned)


def truncated_meta_gradient(
    metaloss: MetaLoss,
    phi: Phi,
    task: Task,
    theta: Theta,
    batch: Any,
    inner: InnerConfig,
    objective: Callable[[Theta, Any], Tensor],
) -> tuple[Phi, Tensor, Theta]:
    """∇_φ L_T for ``inner.truncate`` with one inner step's graph alive at a time (see the module docstring).

    Forward: θ_0 … θ_K without any graph (values equal those of the graph-keeping path). Then v_j = ∂L_T/∂θ_j,
    and for each k the vector-Jacobian product of the inner gradient g_k = ∇_θ M_φ(θ_k) with the weight
    w_k = v_K (L_T at the last θ) or (1/K) Σ_{j>k} v_j (``task_loss_at: every``) gives −α w_kᵀ ∂g_k/∂φ.
    Returns the gradient, the task loss per task and θ_K (detached).
    """
    n = len(next(iter(theta.values())))
    steps, every = inner.steps, inner.task_loss_at == "every"
    frozen = learned_loss_fn(metaloss, detached(phi))
    step = vmap(lambda theta, batch: sgd_step(task, frozen, theta, batch, inner.lr))
    thetas = [detached(theta)]
    for _ in range(steps):
        thetas.append(detached(step(thetas[-1], batch)))
    slope_and_loss = vmap(grad_and_value(objective))
    weights: list[Theta] = [{}] * steps
    if every:
        running, losses = None, []
        for j in range(steps, 0, -1):  # w_{j-1} = (1/K) Σ_{i ≥ j} v_i
            v, loss = slope_and_loss(thetas[j], batch)
            losses.append(loss)
            running = v if running is None else {k: running[k] + v[k] for k in v}
            weights[j - 1] = {k: value / steps for k, value in running.items()}
        after = torch.stack(losses).mean(0)
    else:
        v, after = slope_and_loss(thetas[-1], batch)
        weights = [v] * steps

    leaf = {name: value.detach().requires_grad_() for name, value in phi.items()}
    live = learned_loss_fn(metaloss, leaf)

    def weighted_inner_gradient(theta: Theta, batch: Any, w: Theta) -> Tensor:
        g, scale = inner_gradient(task, live, theta, batch)
        product = sum((g[k] * w[k]).sum() for k in g)
        return scale[0] * product if scale else product

    total = {name: torch.zeros_like(value) for name, value in leaf.items()}
    for k in range(steps):
        product = vmap(weighted_inner_gradient)(thetas[k], batch, weights[k]).sum() * (-inner.lr / n)
        if product.requires_grad:
            for name, g in zip(leaf, torch.autograd.grad(product, list(leaf.values()), allow_unused=True), strict=True):
                if g is not None:
                    total[name] += g
    return total, after.detach(), thetas[-1]


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
    metaloss: MetaLoss
    curves: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> dict[str, float]:
        return self.curves[-1] if self.curves else {}


def _all_finite(tensors: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


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
    checkpoints from it). ``resume`` continues from such a state, bit for bit as if never interrupted.
    """
    gen = generator(recipe.seed)
    metaloss = build_metaloss(recipe, task, gen)
    optimizer = torch.optim.Adam(metaloss.parameters(), lr=recipe.outer.lr)
    objective = task_objective(task, recipe.task_loss)
    inner, outer = recipe.inner, recipe.outer

    result = MetaTrainResult(metaloss)
    theta: Theta | None = None
    batch: Any = None
    age = 0  # inner steps θ has taken since its last initialisation
    first = 1
    if resume is not None:
        resume.restore(metaloss, optimizer, gen)
        theta, batch, age, first = resume.theta, resume.batch, resume.age, resume.step + 1
        result.curves = [dict(row) for row in resume.curves]
        task.load_state_tensors(resume.task_state)
    schedule = None
    if outer.lr_schedule == "cosine":  # a pure function of the step, so a resumed run continues it exactly
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", outer.lr)
        cosine = lambda done: 0.5 * (1 + math.cos(math.pi * done / outer.steps))  # noqa: E731
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine, last_epoch=first - 2)
    started = time.perf_counter() - (resume.seconds if resume is not None else 0.0)
    for step in range(first, outer.steps + 1):
        task.begin_outer_step(step, theta, gen)
        if theta is None or age >= inner.reset_period:
            batch = task.sample_tasks(outer.tasks, gen)
            theta = task.init_theta(outer.tasks, gen)
            age = 0
        phi = {name: p.detach() for name, p in metaloss.named_parameters()}
        logging = step % recipe.log_every == 0 or step == outer.steps or step == 1
        gradient, seen = meta_gradient(
            metaloss, phi, task, theta, batch, inner, objective, diagnostics=logging, gen=gen, shard=shard
        )
        if shard is not None:
            gradient = shard.mean(gradient)
            seen = MetaStep(*shard.gather((seen.task_loss, seen.theta, seen.task_loss_before, seen.learned_loss)))
        if not _all_finite([seen.task_loss]):
            raise DivergenceError(step, "the task loss")
        if not _all_finite(gradient.values()):
            raise DivergenceError(step, "the meta-gradient")
        if not _all_finite(seen.theta.values()):
            raise DivergenceError(step, "θ after the inner steps")
        grad_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in gradient.values()])).item()
        if not math.isfinite(grad_norm):  # finite entries whose norm overflows would silently stall Adam
            raise DivergenceError(step, "the meta-gradient's norm")
        if outer.grad_clip is not None and grad_norm > outer.grad_clip:
            scale = outer.grad_clip / (grad_norm + 1e-12)
            gradient = {name: g * scale for name, g in gradient.items()}
        for name, p in metaloss.named_parameters():
            p.grad = gradient[name]
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if not _all_finite(p.detach() for p in metaloss.parameters()):
            raise DivergenceError(step, "φ after the Adam step")
        theta, age = seen.theta, age + inner.steps

        record = None
        if logging:
            record = {
                "step": step,
                "meta/task_loss": seen.task_loss.mean().item(),
                "meta/task_loss_before": seen.task_loss_before.mean().item(),
                "inner/learned_loss": seen.learned_loss.mean().item(),
                "meta/grad_norm": grad_norm,
                "time/seconds": time.perf_counter() - started,
            }
            result.curves.append(record)
        if on_step is not None:
            on_step(step, record)
        if on_state is not None:
            on_state(
                step,
                lambda step=step, theta=theta, batch=batch, age=age: MetaTrainState.capture(
                    step,
                    metaloss,
                    optimizer,
                    gen,
                    theta,
                    batch,
                    age,
                    result.curves,
                    time.perf_counter() - started,
                    task.state_tensors(),
                ),
            )
    result.seconds = time.perf_counter() - started
    return result
