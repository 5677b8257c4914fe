"""Inner optimizers: the rule that turns θ and its inner gradient g into the next θ, as pure functions.

Each rule is a pair of functions, out of place, so that ``torch.func`` and autograd differentiate through any number
of steps, the rule's state included (second order: the meta-gradient reaches φ through the state too):

* ``init(theta) → state``: the state at θ₀, a ``dict[str, Tensor]`` whose tensors lead with θ's task axis (so
  ``vmap`` maps it, a shard slices it and a checkpoint stores it like θ); Adam's step count is a tensor too;
* ``update(theta, gradient, state, lr, scale) → (theta', state')``, for one task (inside ``vmap``) or a batch.

The rules, with α the inner learning rate and ``scale`` the learned step scale of a ``meta_loss.learned_lr`` loss
(1 without one):

    sgd        θ' = θ − α·scale·g                                              (no state; :func:`sgd_update`)
    momentum   v' = β·v + g,              θ' = θ − α·scale·v'                   (heavy ball, torch.optim.SGD's)
    adam       m' = β₁·m + (1 − β₁)·g,    v' = β₂·v + (1 − β₂)·g²,    t' = t + 1
               θ' = θ − α·scale · (m'/(1 − β₁^t')) / (√(v'/(1 − β₂^t')) + ε)   (torch.optim.Adam's)

The learned scale multiplies α, the step of the current update, and never enters the state: it is a learning rate
that the loss sets at every step. (Scaling the gradient before Adam's moments instead would cancel in m̂/√v̂, so
a learned rate could not change Adam's steps at all.) :func:`optimizer_for` picks the rule from the recipe once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from ml3cli.recipes import InnerConfig
from ml3cli.tasks.base import Theta

#: An inner optimizer's state: tensors named ``<part>/<θ leaf>`` (and Adam's ``step``), each with θ's task axis.
InnerState = dict[str, Tensor]


def per_task(value: Tensor, like: Tensor) -> Tensor:
    """``value``, one number per task (a scalar for one task, ``[n]`` for a batch), shaped to broadcast over the
    entries of each task's leaf ``like``."""
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim))


def step_size(lr: float, scale: Tensor | None, like: Tensor) -> float | Tensor:
    """α, or α·scale per task shaped to broadcast over the leaf ``like``."""
    return lr if scale is None else lr * per_task(scale, like)


def sgd_update(theta: Theta, gradient: Theta, lr: float, scale: Tensor | None = None) -> Theta:
    """The SGD update, the only place it is written: θ' = θ − α · scale · g, leaf by leaf.

    Args:
        theta: θ, one task's or a batch's (leading task axis).
        gradient: g, with the names and shapes of ``theta``.
        lr: α, the inner learning rate.
        scale: None for plain SGD; a learned step scale, a scalar for one task or ``[n]`` for a batch of n tasks
            (then broadcast over the entries of each task's leaves).
    """
    return {name: theta[name] - step_size(lr, scale, gradient[name]) * gradient[name] for name in theta}


class InnerOptimizer(Protocol):
    """A pure inner update rule (see the module docstring)."""

    #: the recipe's name of the rule (``inner.optimizer``)
    name: ClassVar[str]

    def init(self, theta: Theta) -> InnerState:
        """The state at ``theta`` (θ₀ of a batch of tasks: every leaf leads with the task axis)."""
        ...

    def update(
        self, theta: Theta, gradient: Theta, state: InnerState, lr: float, scale: Tensor | None = None
    ) -> tuple[Theta, InnerState]:
        """θ' and the state after one step with the gradient g, out of place; ``scale`` as for :func:`sgd_update`."""
        ...

    def check_state(self, state: InnerState, steps: int) -> str | None:
        """What is wrong with a restored ``state`` after ``steps`` inner steps from θ₀ (None: nothing)."""
        ...


@dataclass(frozen=True)
class SGD:
    """θ' = θ − α·scale·g, without state: exactly :func:`sgd_update`, the paper's inner loop."""

    name: ClassVar[str] = "sgd"

    def init(self, theta: Theta) -> InnerState:
        return {}

    def update(
        self, theta: Theta, gradient: Theta, state: InnerState, lr: float, scale: Tensor | None = None
    ) -> tuple[Theta, InnerState]:
        return sgd_update(theta, gradient, lr, scale), state

    def check_state(self, state: InnerState, steps: int) -> str | None:
        return None


@dataclass(frozen=True)
class Momentum:
    """Heavy-ball momentum, as torch.optim.SGD(momentum=β) without dampening: v' = β·v + g, θ' = θ − α·scale·v'."""

    beta: float = 0.9
    name: ClassVar[str] = "momentum"

    def init(self, theta: Theta) -> InnerState:
        return {f"velocity/{name}": torch.zeros_like(value) for name, value in theta.items()}

    def update(
        self, theta: Theta, gradient: Theta, state: InnerState, lr: float, scale: Tensor | None = None
    ) -> tuple[Theta, InnerState]:
        velocity = {name: self.beta * state[f"velocity/{name}"] + gradient[name] for name in theta}
        stepped = {name: theta[name] - step_size(lr, scale, velocity[name]) * velocity[name] for name in theta}
        return stepped, {f"velocity/{name}": value for name, value in velocity.items()}

    def check_state(self, state: InnerState, steps: int) -> str | None:
        return None


@dataclass(frozen=True)
class Adam:
    """Bias-corrected Adam, as torch.optim.Adam without weight decay or amsgrad (see the module docstring).

    The step count t is an integer tensor per task (``[n]`` beside θ), so that ``vmap``, shards and checkpoints
    carry it like the moments; it takes no part in differentiation.
    """

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    name: ClassVar[str] = "adam"

    def init(self, theta: Theta) -> InnerState:
        first = next(iter(theta.values()))
        state = {f"m/{name}": torch.zeros_like(value) for name, value in theta.items()}
        state |= {f"v/{name}": torch.zeros_like(value) for name, value in theta.items()}
        state["step"] = torch.zeros(first.shape[:1], dtype=torch.int64, device=first.device)
        return state

    def update(
        self, theta: Theta, gradient: Theta, state: InnerState, lr: float, scale: Tensor | None = None
    ) -> tuple[Theta, InnerState]:
        beta1, beta2 = self.betas
        step = state["step"] + 1
        t = step.to(next(iter(theta.values())).dtype)
        correction1, correction2 = 1 - beta1**t, 1 - beta2**t  # one per task
        new_state: InnerState = {"step": step}
        stepped = {}
        for name, g in gradient.items():
            m = beta1 * state[f"m/{name}"] + (1 - beta1) * g
            v = beta2 * state[f"v/{name}"] + (1 - beta2) * g * g
            direction = (m / per_task(correction1, g)) / (_sqrt(v / per_task(correction2, g)) + self.eps)
            stepped[name] = theta[name] - step_size(lr, scale, g) * direction
            new_state[f"m/{name}"], new_state[f"v/{name}"] = m, v
        return stepped, new_state

    def check_state(self, state: InnerState, steps: int) -> str | None:
        if not bool((state["step"] == steps).all()):
            return f"Adam's step count {state['step'].tolist()!s:.40} instead of the {steps} inner steps θ has taken"
        negative = [name for name, value in state.items() if name.startswith("v/") and bool((value < 0).any())]
        return f"Adam's {negative[0]} is negative" if negative else None


def _sqrt(value: Tensor) -> Tensor:
    """√value, with the derivative 0 where value = 0 rather than ∞·0 = NaN.

    Adam's v is exactly 0 where every gradient so far was 0 (a dead ReLU unit of the optimizee); the derivative of
    √v there meets a zero upstream gradient and would turn the whole meta-gradient into NaN. Elsewhere this is
    ``torch.sqrt``, value and derivative.
    """
    positive = value > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, value, 1.0)), 0.0)


def optimizer_for(inner: InnerConfig) -> InnerOptimizer:
    """The update rule the recipe's ``inner`` section asks for (``inner.optimizer`` and its settings)."""
    if inner.optimizer == "momentum":
        return Momentum(inner.momentum)
    if inner.optimizer == "adam":
        beta1, beta2 = inner.betas
        return Adam((beta1, beta2), inner.eps)
    return SGD()
