"""Meta-gradient estimators: how ∇_φ L_T is computed, kept apart from the inner problem (the task).

One outer step (a meta-update of φ, paper section 3.1, algorithm 1), for each task of a batch:

    θ_{k+1} = θ_k − α ∇_θ M_φ(inputs(θ_k))                      k = 0 … K−1   (inner SGD, :mod:`~.unroll`)
    L_T(φ)  = β · task_loss(θ_K) + Σ_j γ_j · extra_j(θ_K)           (on held-out query data, averaged over tasks)

or, with ``inner.optimizer`` momentum or adam, θ_{k+1}, s_{k+1} = update(θ_k, ∇_θ M_φ(inputs(θ_k)), s_k), the
rule's state s (velocity; moments and step count) carried beside θ (:mod:`~.inner_optimizers`).

or, with ``inner.task_loss_at: every``, L_T is the mean over k of the same terms at θ_1 … θ_K. An estimator turns
φ, θ₀ and a task batch into ∇_φ L_T and what the unroll saw (a :class:`MetaGradient`); the outer loop then takes
an Adam step on φ. Two estimators, chosen once from the recipe by :func:`estimator_for`:

* :class:`FullBackprop`: the exact second-order gradient, one reverse pass through all K inner steps (and the
  optimizer's state).
* :class:`TruncatedBackprop` (``inner.truncate``): the gradient of step k is taken at a detached θ_k, so
  dθ_{k+1}/dφ = dθ_k/dφ − α ∂²M/∂θ∂φ: the θ–θ Hessian chain is dropped and the mixed term kept. (Dropping the mixed
  term too would make the meta-gradient exactly zero: ML³ has no first-order shortcut.) A stateful optimizer's
  state keeps its derivative: only the Hessian chain is dropped (see the class).

Both ``vmap`` over the tasks, which is exact only if every leaf of θ carries the task axis and the optimizee keeps
no state outside θ (batch norm's running statistics would be shared by all tasks and updated in place):
:func:`check_optimizee` and :func:`check_task_axis` refuse anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap
from torch.utils._pytree import tree_map

from ml3cli.engine.data import TaskData, own_share, share, task_count
from ml3cli.engine.diagnostics import diagnose, side_generator
from ml3cli.engine.inner_optimizers import InnerOptimizer, InnerState, optimizer_for
from ml3cli.engine.unroll import LossFn, Objective, Phi, detached, inner_step, inner_step_autograd, learned_loss_fn
from ml3cli.errors import ML3Error
from ml3cli.metaloss import MetaLoss
from ml3cli.recipes import InnerConfig
from ml3cli.tasks.base import Task, Theta

if TYPE_CHECKING:
    from ml3cli.distributed import Shard


@dataclass(frozen=True)
class MetaGradient:
    """One estimate of ∇_φ L_T and what the unroll saw; tensors have a leading task axis (this process's share)."""

    gradient: Phi  #: ∇_φ of the mean of L_T over the tasks, named as φ
    task_loss: Tensor  #: [n]  L_T after the K inner steps (mean over them with ``task_loss_at: every``)
    theta: Theta  #: θ_K, detached
    state: InnerState = field(default_factory=dict)  #: the inner optimizer's state after the K steps, detached


# -- the checks, once per estimator or run --------------------------------------------------------------------
def check_optimizee(task: Task) -> None:
    """Refuse an optimizee that keeps state outside θ: persistent buffers such as batch norm's running statistics.

    θ holds the optimizee's parameters only, so such buffers would be one tensor shared by every task of a batch,
    and the inner steps would update them in place. Non-persistent buffers (constants of the architecture: scales,
    index maps) are read, never written, and are fine.
    """
    optimizee = task.optimizee
    if next(optimizee.buffers(), None) is None:
        return
    parameters = {name for name, _ in optimizee.named_parameters()}
    state = [name for name in optimizee.state_dict() if name not in parameters]
    if state:
        raise ML3Error(
            f"task {task.name!r}: the optimizee keeps state outside θ in buffer(s) {state[:4]} (e.g. batch norm's "
            "running statistics), which every task of a batch would share and the inner steps would overwrite; "
            "use layers without running statistics (nn.LayerNorm, or BatchNorm with track_running_stats=False), "
            "or register constants with register_buffer(..., persistent=False)"
        )


def check_task_axis(theta: Theta, batch: Any) -> None:
    """Refuse a θ leaf whose leading dimension is not the number of tasks in ``batch``."""
    n = task_count(batch)
    for name, value in theta.items():
        if value.ndim == 0 or value.shape[0] != n:
            raise ML3Error(
                f"θ leaf {name!r} has shape {list(value.shape)} but the task batch holds {n} tasks: every leaf of θ "
                f"needs the task axis first ([{n}, ...]); draw θ with task.init_theta({n}, generator)"
            )


def _phi_leaves(phi: Phi) -> Phi:
    return {name: value.detach().requires_grad_() for name, value in phi.items()}


def _gradient_of(loss: Tensor, phi: Phi) -> Phi:
    """∇_φ of the mean of ``loss``; zeros when it does not depend on φ at all (e.g. every unit of M_φ is dead)."""
    if not loss.requires_grad:
        return {name: torch.zeros_like(value) for name, value in phi.items()}
    grads = torch.autograd.grad(loss.mean(), list(phi.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(phi, grads, strict=True))


# -- the estimators -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FullBackprop:
    """The exact meta-gradient: one reverse pass through the graph of all K inner steps.

    Each inner step runs the tasks' forward passes in one ``vmap`` and takes every task's inner gradient at once
    with ``torch.autograd.grad(create_graph=True)`` of the summed losses (:func:`~.unroll.sgd_step_autograd`).
    Measured 1.2–1.4× faster than ``torch.func.grad`` inside ``vmap`` at 8–64 sine tasks (whose per-operation
    overhead exceeds the work of these small networks), and faster than nesting a second ``torch.func.grad``
    level. A batch of ONE task skips ``vmap`` altogether (``single_task_path``). A task that ``collects_data``
    gets its data from ``task.collect`` before every inner step and before L_T (:mod:`~.data`). The inner
    optimizer's state is part of the graph like θ, so the gradient is exact through it too.
    """

    task: Task
    inner: InnerConfig
    objective: Objective
    single_task_path: bool = True
    optimizer: InnerOptimizer = field(init=False)  #: the inner update rule, from ``inner.optimizer``

    def __post_init__(self) -> None:
        if self.inner.truncate:
            raise ValueError("FullBackprop does not truncate; build the estimator with estimator_for(inner, ...)")
        check_optimizee(self.task)
        object.__setattr__(self, "optimizer", optimizer_for(self.inner))

    def estimate(
        self,
        metaloss: MetaLoss,
        phi: Phi,
        theta: Theta,
        batch: Any,
        gen: torch.Generator | None = None,
        shard: Shard | None = None,
        state: InnerState | None = None,
    ) -> MetaGradient:
        """∇_φ L_T from θ₀ = ``theta`` and the optimizer's ``state`` (None: fresh at θ₀) on ``batch`` (the whole
        batch; a ``shard`` differentiates its share)."""
        state = self.optimizer.init(theta) if state is None else state
        state = own_share(state, batch, shard)
        theta, data = share(self.task, theta, batch, gen, shard)
        phi = _phi_leaves(phi)
        loss_fn = learned_loss_fn(metaloss, phi)
        if self.single_task_path and not self.task.collects_data and task_count(theta) == 1:
            after, theta_k, state_k = self._one_task(loss_fn, theta, state, data.batch)
        else:
            after, theta_k, state_k = self._batched(loss_fn, theta, state, data)
        return MetaGradient(_gradient_of(after, phi), after.detach(), detached(theta_k), detached(state_k))

    def _one_task(
        self, loss_fn: LossFn, theta: Theta, state: InnerState, batch: Any
    ) -> tuple[Tensor, Theta, InnerState]:
        steps, every = self.inner.steps, self.inner.task_loss_at == "every"
        one_theta, one_state, one_batch = tree_map(lambda t: t[0], (theta, state, batch))
        total = 0.0
        for _ in range(steps):
            one_theta, one_state = inner_step_autograd(
                self.task, loss_fn, one_theta, one_state, one_batch, self.inner.lr, self.optimizer
            )
            if every:
                total = total + self.objective(one_theta, one_batch)
        one_after = total / steps if every else self.objective(one_theta, one_batch)
        return tree_map(lambda t: t.unsqueeze(0), (one_after, one_theta, one_state))

    def _batched(
        self, loss_fn: LossFn, theta: Theta, state: InnerState, data: TaskData
    ) -> tuple[Tensor, Theta, InnerState]:
        steps, every = self.inner.steps, self.inner.task_loss_at == "every"
        theta_k, state_k, total = theta, state, 0.0
        for k in range(steps):
            theta_k, state_k = inner_step_autograd(
                self.task, loss_fn, theta_k, state_k, data(theta_k, "inner"), self.inner.lr, self.optimizer,
                batched=True,
            )  # fmt: skip
            if every or k == steps - 1:
                total = total + vmap(self.objective)(theta_k, data(theta_k, "task_loss"))
        return (total / steps if every else total), theta_k, state_k


@dataclass(frozen=True)
class TruncatedBackprop:
    """``inner.truncate``: each inner gradient at a detached θ_k, with one inner step's graph alive at a time.

    With the θ–θ chain dropped, dL_T/dφ = Σ_k (∂θ_{k+1}/∂φ |_{θ_k fixed})ᵀ w_k = −α Σ_k (∂(scale·g_k)/∂φ)ᵀ w_k, where
    g_k = ∇_θ M_φ(θ_k) and w_k = v_K with v_j = ∂L_T/∂θ_j (L_T at the last θ), or w_k = (1/K) Σ_{j>k} v_j
    (``task_loss_at: every``). So the forward pass keeps only the K values of θ_k (no graph; the same values as
    unrolling :func:`~.unroll.inner_step` with ``truncate``), and the backward rebuilds one step's graph at a time:
    memory O(K·|θ|) instead of O(K) autograd graphs.

    A stateful inner optimizer (momentum, Adam) is truncated the same way and no further: the result is the exact
    gradient of the unroll in which every inner gradient is taken at a detached θ_k, the optimizer's state
    included. Step k moves θ_{k+1} = θ_k − U(g_k, s_k) and s_{k+1} = S(g_k, s_k), so ∂θ_{k+1}/∂θ_k is still the
    identity and w_k is unchanged, but g_k also reaches every later step through the state (momentum's
    v' = β·v + g applies it again with weight β, β², …). The state is carried like θ: the forward pass keeps the
    K + 1 values s_k without a graph, and the backward runs from the last step to the first with the adjoint
    λ_k = ∂L̄_T/∂s_k (L̄_T the mean over the tasks; λ_K = 0, as L_T reads θ alone): step k's graph gives both its
    term, the derivative in φ of w_k·θ_{k+1}/n + λ_{k+1}·s_{k+1}, and λ_k, its derivative in s_k. (Detaching the
    state as well would drop a first-order effect rather than the Hessian chain: every gradient would count only
    in the step it was taken, though momentum goes on applying it for about 1/(1 − β) steps.) Memory:
    O(K·(|θ| + |s|)); for SGD, without state, this is the backward described above.

    The forward pass replays the inner steps on the task batch, so a task that collects new data with the current
    θ between inner steps cannot use it: refused with an :class:`~ml3cli.errors.ML3Error`.
    """

    task: Task
    inner: InnerConfig
    objective: Objective
    optimizer: InnerOptimizer = field(init=False)  #: the inner update rule, from ``inner.optimizer``

    def __post_init__(self) -> None:
        if self.task.collects_data:
            raise ML3Error(
                f"inner.truncate: true cannot be used with task {self.task.name!r}, which collects new data with the "
                "current θ between inner steps (rollouts), while truncation replays the inner steps on fixed data; "
                "set inner.truncate: false (the full second-order meta-gradient)"
            )
        check_optimizee(self.task)
        object.__setattr__(self, "optimizer", optimizer_for(self.inner))

    def estimate(
        self,
        metaloss: MetaLoss,
        phi: Phi,
        theta: Theta,
        batch: Any,
        gen: torch.Generator | None = None,
        shard: Shard | None = None,
        state: InnerState | None = None,
    ) -> MetaGradient:
        """∇_φ L_T from θ₀ = ``theta`` and the optimizer's ``state`` (None: fresh at θ₀) on ``batch`` (the whole
        batch; a ``shard`` differentiates its share)."""
        state = self.optimizer.init(theta) if state is None else state
        state = own_share(state, batch, shard)
        theta, data = share(self.task, theta, batch, gen, shard)
        thetas, states = self._forward(metaloss, phi, theta, state, data.batch)
        weights, after = self._weights(thetas, data.batch)
        gradient = self._backward(metaloss, phi, thetas, states, data.batch, weights)
        return MetaGradient(gradient, after.detach(), thetas[-1], states[-1])

    def _forward(
        self, metaloss: MetaLoss, phi: Phi, theta: Theta, state: InnerState, batch: Any
    ) -> tuple[list[Theta], list[InnerState]]:
        """θ_0 … θ_K and the optimizer's s_0 … s_K, without any graph."""
        frozen = learned_loss_fn(metaloss, detached(phi))
        lr, optimizer = self.inner.lr, self.optimizer
        step = vmap(lambda theta, state, batch: inner_step(self.task, frozen, theta, state, batch, lr, optimizer))
        thetas, states = [detached(theta)], [detached(state)]
        for _ in range(self.inner.steps):
            theta_k, state_k = step(thetas[-1], states[-1], batch)
            thetas.append(detached(theta_k))
            states.append(detached(state_k))
        return thetas, states

    def _weights(self, thetas: list[Theta], batch: Any) -> tuple[list[Theta], Tensor]:
        """w_0 … w_{K−1} (see the class docstring) and L_T per task."""
        steps = self.inner.steps
        slope_and_loss = vmap(grad_and_value(self.objective))
        if self.inner.task_loss_at != "every":
            v, after = slope_and_loss(thetas[-1], batch)
            return [v] * steps, after
        weights: list[Theta] = [{}] * steps
        running, losses = None, []
        for j in range(steps, 0, -1):  # w_{j-1} = (1/K) Σ_{i ≥ j} v_i
            v, loss = slope_and_loss(thetas[j], batch)
            losses.append(loss)
            running = v if running is None else {name: running[name] + v[name] for name in v}
            weights[j - 1] = {name: value / steps for name, value in running.items()}
        return weights, torch.stack(losses).mean(0)

    def _backward(
        self,
        metaloss: MetaLoss,
        phi: Phi,
        thetas: list[Theta],
        states: list[InnerState],
        batch: Any,
        weights: list[Theta],
    ) -> Phi:
        """Σ_k of step k's term (see the class docstring), averaged over the tasks, one inner step's graph at a time.

        The steps are visited from the last to the first, which the state's adjoint needs, and their terms summed
        from the first on."""
        leaf = _phi_leaves(phi)
        live = learned_loss_fn(metaloss, leaf)
        n = task_count(thetas[0])
        lr, optimizer = self.inner.lr, self.optimizer

        def weighted_step(theta: Theta, state: InnerState, batch: Any, w: Theta) -> tuple[Tensor, InnerState]:
            # θ_k is a constant here, so the derivative in φ is the one term of step k that truncation keeps
            stepped, new_state = inner_step(self.task, live, theta, state, batch, lr, optimizer)
            return sum((w[name] * stepped[name]).sum() for name in stepped), new_state

        terms: list[Phi] = []
        adjoint: InnerState = {}  # λ_{k+1}, by state entry (the integer step count has none); nothing after step K
        for k in reversed(range(self.inner.steps)):
            state_k = {
                name: value.detach().requires_grad_() if value.is_floating_point() else value
                for name, value in states[k].items()
            }
            on_theta, new_state = vmap(weighted_step)(thetas[k], state_k, batch, weights[k])
            product = on_theta.sum() / n
            if adjoint:  # a stateless optimizer (SGD) has no state term
                product = product + sum((adjoint[name] * new_state[name]).sum() for name in adjoint)
            if not product.requires_grad:  # M_φ's inner gradient does not depend on φ (e.g. every unit is dead)
                terms.append({})
                continue
            carried = [name for name, value in state_k.items() if value.requires_grad]
            grads = torch.autograd.grad(
                product, [*leaf.values(), *(state_k[name] for name in carried)], allow_unused=True
            )
            terms.append({name: g for name, g in zip(leaf, grads[: len(leaf)], strict=True) if g is not None})
            adjoint = {
                name: torch.zeros_like(state_k[name]) if g is None else g
                for name, g in zip(carried, grads[len(leaf) :], strict=True)
            }
        total = {name: torch.zeros_like(value) for name, value in leaf.items()}
        for term in reversed(terms):  # step 0 first
            for name, g in term.items():
                total[name] += g
        return total


class Estimator(Protocol):
    """What the outer loop needs of a meta-gradient estimator (built once, by :func:`estimator_for`)."""

    @property
    def task(self) -> Task:
        """The inner problem: tasks, optimizee, loss inputs."""
        ...

    @property
    def objective(self) -> Objective:
        """L_T for one task (:func:`~.unroll.task_objective`)."""
        ...

    @property
    def optimizer(self) -> InnerOptimizer:
        """The inner update rule (``inner.optimizer``)."""
        ...

    def estimate(
        self,
        metaloss: MetaLoss,
        phi: Phi,
        theta: Theta,
        batch: Any,
        gen: torch.Generator | None = None,
        shard: Shard | None = None,
        state: InnerState | None = None,
    ) -> MetaGradient:
        """∇_φ L_T from θ₀ = ``theta`` (leading task axis) and the inner optimizer's ``state`` at θ₀ (None: fresh)
        on the task ``batch``, drawing from ``gen``."""
        ...


def estimator_for(inner: InnerConfig, task: Task, objective: Objective, single_task_path: bool = True) -> Estimator:
    """The estimator the recipe's ``inner`` section asks for, checked against ``task`` once, here.

    Raises :class:`~ml3cli.errors.ML3Error` for ``inner.truncate`` with a task that collects data, and for an
    optimizee with state outside θ (:func:`check_optimizee`).
    """
    if inner.truncate:
        return TruncatedBackprop(task, inner, objective)
    return FullBackprop(task, inner, objective, single_task_path)


# -- the entry point --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetaStep:
    """What one meta-gradient evaluation saw; tensors have a leading task axis."""

    task_loss: Tensor  # [n]  L_T after the K inner steps
    theta: Theta  # θ_K, detached
    task_loss_before: Tensor | None = None  # [n]  L_T at θ_0 of this unroll (with diagnostics)
    learned_loss: Tensor | None = None  # [n]  M_φ at θ_0, the inner loss the first step descended (with diagnostics)
    state: InnerState = field(default_factory=dict)  # the inner optimizer's state after the K steps, detached


def meta_gradient(
    metaloss: MetaLoss,
    phi: Phi,
    task: Task,
    theta: Theta,
    batch: Any,
    inner: InnerConfig,
    objective: Objective,
    diagnostics: bool = True,
    single_task_path: bool = True,
    gen: torch.Generator | None = None,
    shard: Shard | None = None,
    *,
    estimator: Estimator | None = None,
    diagnostics_gen: torch.Generator | None = None,
    state: InnerState | None = None,
) -> tuple[Phi, MetaStep]:
    """∇_φ of the mean task loss over a batch of tasks after K inner steps, and what the step saw.

    Builds the estimator from ``inner`` (:func:`estimator_for`) unless one is given (then ``inner``, ``objective``
    and ``single_task_path`` are its own), checks that ``theta`` carries the task axis, and estimates. A task that
    ``collects_data`` draws its data from ``gen``. ``diagnostics`` adds L_T and M_φ at θ₀ (:mod:`~.diagnostics`);
    a collecting task draws their data from ``diagnostics_gen``, by default from a generator seeded off ``gen``
    without advancing it, so that ``diagnostics`` never changes the gradient or ``gen``'s stream. With a ``shard``
    (one of several processes) ``theta`` and ``batch`` are the WHOLE batch and this process differentiates its
    share (:mod:`~.data`). ``state`` is the inner optimizer's state at ``theta`` (None: fresh, as at θ₀).
    """
    check_task_axis(theta, batch)
    if estimator is None:
        estimator = estimator_for(inner, task, objective, single_task_path)
    if diagnostics and task.collects_data and diagnostics_gen is None and gen is not None:
        diagnostics_gen = side_generator(gen)
    estimate = estimator.estimate(metaloss, phi, theta, batch, gen, shard, state=state)
    before = learned = None
    if diagnostics:
        seen = diagnose(metaloss, phi, estimator.task, theta, batch, estimator.objective, diagnostics_gen, shard)
        before, learned = seen.task_loss_before, seen.learned_loss
    return estimate.gradient, MetaStep(estimate.task_loss, estimate.theta, before, learned, estimate.state)
