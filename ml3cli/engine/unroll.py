"""Pure inner steps: gradient steps on θ with a loss over a task's named inputs (paper, section 3.1, algorithm 1).

θ is a ``dict[str, Tensor]``; every function here returns a new dict (out of place), so ``torch.func`` and autograd
can differentiate through any number of steps. One inner step of ONE task is

    g          = ∇_θ M_φ(task.loss_inputs(θ, batch))
    θ', state' = optimizer.update(θ, g, state, α, scale)                       (:func:`inner_step`)

with ``scale`` = 1, or the step scale that a learned loss with ``meta_loss.learned_lr`` outputs (paper 4.1.2),
evaluated at θ but not differentiated with respect to it (φ still reaches it). The update rule is plain SGD,
θ' = θ − α·scale·g without state (:func:`sgd_step`, the paper's), or heavy-ball momentum or Adam
(:mod:`ml3cli.engine.inner_optimizers`), whose state travels beside θ. With ``truncate`` the gradient is taken at a
detached θ, so θ' depends on φ through this step's gradient and the state alone (see
:mod:`ml3cli.engine.estimators`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from ml3cli.engine.inner_optimizers import SGD, InnerOptimizer, InnerState
from ml3cli.metaloss import MetaLoss
from ml3cli.recipes import TaskLossConfig
from ml3cli.tasks.base import Task, Theta

#: A loss over a task's named loss inputs, e.g. ``lambda inputs: mse(**inputs)``. A learned loss that also sets
#: the inner learning rate (``meta_loss.learned_lr``) returns ``(loss, scale)``: the step is θ − α·scale·∇_θ loss,
#: the scale evaluated at θ but not differentiated with respect to it (φ still reaches it).
LossFn = Callable[[dict[str, Tensor]], Tensor | tuple[Tensor, Tensor]]
#: φ, the meta-loss parameters, by name.
Phi = dict[str, Tensor]
#: L_T for ONE task: ``objective(theta, batch)`` → scalar (see :func:`task_objective`).
Objective = Callable[[Theta, Any], Tensor]


def detached(theta: Theta) -> Theta:
    """θ without its autograd history (the same storage)."""
    return {name: value.detach() for name, value in theta.items()}


def loss_and_scale(value: Tensor | tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor | None]:
    """A :data:`LossFn`'s result as (loss, step scale or None)."""
    return value if isinstance(value, tuple) else (value, None)


def loss_value(value: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """A :data:`LossFn`'s loss, without a learned step scale."""
    return loss_and_scale(value)[0]


def learned_loss_fn(metaloss: MetaLoss, phi: Phi) -> LossFn:
    """M_φ as a :data:`LossFn` with φ given explicitly (so that ``torch.func.grad`` can differentiate it)."""
    return metaloss.inner_loss_with_phi(phi)


def inner_loss(task: Task, loss_fn: LossFn, theta: Theta, batch: Any) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The inner loss for ONE task and its learned step scale as ``(scale,)``, or ``()`` for a plain loss (the form
    torch.func's aux outputs and ``vmap`` need: tensors only)."""
    loss, scale = loss_and_scale(loss_fn(task.loss_inputs(theta, batch)))
    return loss, () if scale is None else (scale,)


def inner_gradient(task: Task, loss_fn: LossFn, theta: Theta, batch: Any) -> tuple[Theta, tuple[Tensor, ...]]:
    """∇_θ of the inner loss for ONE task, and the learned step scale (undifferentiated aux output)."""
    return grad(lambda theta: inner_loss(task, loss_fn, theta, batch), has_aux=True)(theta)


def inner_step(
    task: Task,
    loss_fn: LossFn,
    theta: Theta,
    state: InnerState,
    batch: Any,
    lr: float,
    optimizer: InnerOptimizer,
    truncate: bool = False,
) -> tuple[Theta, InnerState]:
    """One inner step of ``optimizer`` for ONE task with ``torch.func.grad`` (composes with ``vmap``): θ' and the
    state after it, the gradient ∇_θ loss_fn(task.loss_inputs(θ, batch)) taken at a detached θ with ``truncate``."""
    gradient, scale = inner_gradient(task, loss_fn, detached(theta) if truncate else theta, batch)
    return optimizer.update(theta, gradient, state, lr, scale[0] if scale else None)


def sgd_step(task: Task, loss_fn: LossFn, theta: Theta, batch: Any, lr: float, truncate: bool = False) -> Theta:
    """One inner SGD step for ONE task (:func:`inner_step` with plain SGD, which has no state):
    θ' = θ − α·scale·∇_θ loss_fn(task.loss_inputs(θ, batch)), the gradient taken at a detached θ with ``truncate``."""
    return inner_step(task, loss_fn, theta, {}, batch, lr, SGD(), truncate)[0]


def unroll(
    task: Task, loss_fn: LossFn, theta: Theta, batch: Any, lr: float, steps: int, truncate: bool = False
) -> Theta:
    """``steps`` differentiable inner SGD steps (:func:`sgd_step`) for ONE task."""
    for _ in range(steps):
        theta = sgd_step(task, loss_fn, theta, batch, lr, truncate)
    return theta


def inner_step_autograd(
    task: Task,
    loss_fn: LossFn,
    theta: Theta,
    state: InnerState,
    batch: Any,
    lr: float,
    optimizer: InnerOptimizer,
    truncate: bool = False,
    batched: bool = False,
) -> tuple[Theta, InnerState]:
    """:func:`inner_step` with ``torch.autograd.grad(create_graph=True)`` instead of ``torch.func.grad``: the same
    update and the same second-order graph, outside ``vmap``, and cheaper (torch.func's grad transform costs more
    per operation than the work of these small networks). For ONE task, or with ``batched`` for a batch of tasks
    (leading axis) whose forward passes run in one ``vmap``: the gradient of the SUM of the per-task losses with
    respect to the stacked θ is every task's own gradient, because θ_i enters only loss_i. That holds only when
    every leaf of θ carries the task axis and the optimizee keeps no state outside θ (the estimators check both).
    """
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
    return optimizer.update(theta, dict(zip(at, gradient, strict=True)), state, lr, scale[0] if scale else None)


def sgd_step_autograd(
    task: Task, loss_fn: LossFn, theta: Theta, batch: Any, lr: float, truncate: bool = False, batched: bool = False
) -> Theta:
    """:func:`inner_step_autograd` with plain SGD: θ' only (SGD has no state)."""
    return inner_step_autograd(task, loss_fn, theta, {}, batch, lr, SGD(), truncate, batched)[0]


def task_objective(task: Task, weights: TaskLossConfig) -> Objective:
    """L_T for ONE task: β · task loss + Σ γ_j · extra_j (paper, equation 9)."""

    def objective(theta: Theta, batch: Any) -> Tensor:
        loss = weights.weight * task.task_loss(theta, batch)
        for name, gamma in weights.extra.items():
            loss = loss + gamma * task.extra_term(name, theta, batch)
        return loss

    return objective
