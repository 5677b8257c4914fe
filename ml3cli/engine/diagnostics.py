"""What the curves report besides the post-update task loss: L_T and M_φ at θ₀ of an outer step.

Two forward passes without a gradient, on logging steps only. For a task that collects data they need rollouts
of their own, drawn from a generator of their own (:func:`diagnostics_generator`): drawing them from the training
generator would shift every later training draw, so φ would depend on how often the run logs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import vmap

from ml3cli.engine.data import share
from ml3cli.engine.unroll import Objective, Phi, learned_loss_fn, loss_value
from ml3cli.metaloss import MetaLoss
from ml3cli.runtime import generator
from ml3cli.tasks.base import Task, Theta

if TYPE_CHECKING:
    from ml3cli.distributed import Shard


@dataclass(frozen=True)
class Diagnostics:
    """L_T and M_φ at θ₀ of one outer step; tensors ``[n]`` over this process's tasks."""

    task_loss_before: Tensor  #: L_T at θ₀, before the inner steps
    learned_loss: Tensor  #: M_φ at θ₀: the inner loss the first inner step descends


def diagnostics_generator(seed: int, outer_step: int) -> torch.Generator:
    """The generator of the diagnostics' rollouts at ``outer_step`` of the run with ``seed``.

    A function of the seed and the step alone, so it needs no saved state: a resumed run draws the same numbers,
    and every process of a sharded run too. (Hashing keeps the streams of neighbouring seeds and steps apart.)
    """
    digest = hashlib.blake2b(f"ml3 diagnostics {seed} {outer_step}".encode(), digest_size=8).digest()
    return generator(int.from_bytes(digest, "little") >> 1)


def side_generator(gen: torch.Generator) -> torch.Generator:
    """A generator seeded from ``gen``'s next draw without advancing ``gen`` itself."""
    copy = torch.Generator(device=gen.device)
    copy.set_state(gen.get_state())
    return generator(int(torch.randint(0, 2**62, (), generator=copy)))


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

    A task that collects data gathers one batch for L_T and one for M_φ (in that order) from ``gen``, which must
    not be the training generator (see the module docstring); other tasks use ``batch`` and ignore ``gen``.
    """
    loss_fn = learned_loss_fn(metaloss, phi)
    with torch.no_grad():
        theta, data = share(task, theta, batch, gen, shard)
        measured = data(theta, "task_loss")
        inputs = data(theta, "inner")
        before = vmap(objective)(theta, measured)
        learned = vmap(lambda theta, batch: loss_value(loss_fn(task.loss_inputs(theta, batch))))(theta, inputs)
    return Diagnostics(before, learned)
