"""Where an unroll's data come from: the task batch itself, or data gathered with the current θ.

A task that ``collects_data`` (rollouts of a policy on a simulator) gets fresh data from ``task.collect`` before
every inner step and before L_T, outside autograd and ``vmap``, drawing from a generator. With a ``shard`` (one of
several processes) each process differentiates its share of the tasks, but the data of a collecting task are
gathered for the WHOLE batch on every process, from the θ of all shares: the random stream is drawn exactly as by
a single process, so the result does not depend on the number of processes (the simulation is repeated, the
differentiation is split).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_leaves

from ml3cli.engine.unroll import detached
from ml3cli.tasks.base import Task, Theta

if TYPE_CHECKING:
    from ml3cli.distributed import Shard


def task_count(batch: Any) -> int:
    """The number of tasks in a batch: the leading axis of its tensors."""
    return len(tree_leaves(batch)[0])


@dataclass(frozen=True)
class TaskData:
    """The data source of one unroll on this process's share of the tasks (see the module docstring)."""

    task: Task
    batch: Any  #: the tasks this process differentiates (all of them without a shard)
    gen: torch.Generator | None  #: what a collecting task draws from
    shard: Shard | None = None
    whole_batch: Any = None  #: every process's tasks (with a shard)

    def __call__(self, theta: Theta, purpose: str) -> Any:
        """The batch for ``purpose`` (``"inner"`` or ``"task_loss"``, see :meth:`Task.collect`) at this share's θ."""
        if not self.task.collects_data:
            return self.batch
        theta = detached(theta)
        if self.shard is None:
            return self.task.collect(theta, self.batch, self.gen, purpose)
        collected = self.task.collect(self.shard.gather(theta), self.whole_batch, self.gen, purpose)
        return self.shard.part(collected, task_count(self.whole_batch))


def own_share(tree: Any, batch: Any, shard: Shard | None) -> Any:
    """This process's share of ``tree``, tensors with the task axis of the WHOLE ``batch`` (the inner optimizer's
    state, sharded like θ)."""
    return tree if shard is None else shard.part(tree, task_count(batch))


def share(
    task: Task, theta: Theta, batch: Any, gen: torch.Generator | None, shard: Shard | None
) -> tuple[Theta, TaskData]:
    """This process's θ and the source of its data, from the WHOLE batch of θ and tasks."""
    if task.collects_data and gen is None:
        raise ValueError(f"task {task.name!r} collects data and needs a generator")
    if shard is None:
        return theta, TaskData(task, batch, gen)
    n_tasks = task_count(batch)
    own_theta, own_batch = shard.part((theta, batch), n_tasks)
    return own_theta, TaskData(task, own_batch, gen, shard, batch)
