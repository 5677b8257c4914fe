"""What the curves report besides the post-update task loss: L_T and M_φ at θ₀ of an outer step.

Two forward passes without a gradient, on logging steps only; a task that collects data rolls out for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import vmap

from ml3cli.engine.data import share
from ml3cli.engine.unroll import Objective, Phi, learned_loss_fn, loss_value
from ml3cli.metaloss import MetaLoss
from ml3cli.tasks.base import Task, Theta

if TYPE_CHECKING:
    from ml3cli.distributed import Shard


@dataclass(frozen=True)
class Diagnostics:
    """L_T and M_φ at θ₀ of one outer step; tensors ``[n]`` over this process's tasks."""

    task_loss_before: Tensor  #: L_T at θ₀, before the inner steps
    learned_loss: Tensor  #: M_φ at θ₀: the inner loss the first inner step descends


def diagnose(
    metaloss: MetaLoss,
    phi: Phi,
    task: Task,
    theta: Theta,
    batch: Any,
    objective: Objective,
    gen: torch.Generator | None = None,
    shard: Shard | None = None,
) -> Diagnostics:
    """L_T and M_φ at ``theta`` (θ₀, leading task axis) for this process's share of the tasks.

    A task that collects data gathers one batch for L_T and one for M_φ (in that order) from ``gen``; other tasks
    use ``batch`` and ignore ``gen``.
    """
    loss_fn = learned_loss_fn(metaloss, phi)
    with torch.no_grad():
        theta, data = share(task, theta, batch, gen, shard)
        measured = data(theta, "task_loss")
        inputs = data(theta, "inner")
        before = vmap(objective)(theta, measured)
        learned = vmap(lambda theta, batch: loss_value(loss_fn(task.loss_inputs(theta, batch))))(theta, inputs)
    return Diagnostics(before, learned)
