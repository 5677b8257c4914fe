"""The outer loop's state between two outer steps, as one in-memory record (no file I/O).

:func:`~ml3cli.engine.meta_train` captures a :class:`MetaTrainState` after an outer step and restores one before
the next, so that an interrupted run resumes bit for bit; :mod:`ml3cli.checkpoints` turns it into a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class MetaTrainState:
    """Everything the outer loop of :func:`ml3cli.engine.meta_train` carries from one step to the next.

    ``step`` outer steps are done; the next one is ``step + 1``. ``theta`` and ``batch`` are None before the
    first step. Tensors are detached copies, owned by the record.
    """

    step: int
    phi: dict[str, Tensor]
    optimizer: dict[str, Any]  # torch.optim.Optimizer.state_dict()
    generator: Tensor  # torch.Generator.get_state()
    theta: dict[str, Tensor] | None
    batch: Any  # the task's NamedTuple of tensors, or None
    age: int
    curves: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    #: what a stateful task carries between outer steps (e.g. a learned dynamics model): Task.state_tensors()
    task_state: dict[str, Tensor] = field(default_factory=dict)
    #: the inner optimizer's state beside θ (momentum's velocity; Adam's moments and step count), with θ's task
    #: axis; empty for SGD and before the first step
    inner_state: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def capture(
        cls,
        step: int,
        metaloss: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        gen: torch.Generator,
        theta: dict[str, Tensor] | None,
        batch: Any,
        age: int,
        curves: list[dict[str, float]],
        seconds: float,
        task_state: dict[str, Tensor] | None = None,
        inner_state: dict[str, Tensor] | None = None,
    ) -> MetaTrainState:
        """A snapshot that later steps cannot alter (tensors cloned, the curves copied)."""
        return cls(
            step=step,
            phi={k: v.detach().clone() for k, v in metaloss.state_dict().items()},
            optimizer=_clone_tree(optimizer.state_dict()),
            generator=gen.get_state().clone(),
            theta=None if theta is None else {k: v.detach().clone() for k, v in theta.items()},
            batch=None if batch is None else type(batch)(*(t.detach().clone() for t in batch)),
            age=age,
            curves=[dict(row) for row in curves],
            seconds=seconds,
            task_state={k: v.detach().clone() for k, v in (task_state or {}).items()},
            inner_state={k: v.detach().clone() for k, v in (inner_state or {}).items()},
        )

    def restore(self, metaloss: torch.nn.Module, optimizer: torch.optim.Optimizer, gen: torch.Generator) -> None:
        """Put φ, Adam's state and the generator back (θ, the inner optimizer's state, batch, age and curves are
        read from the record)."""
        metaloss.load_state_dict(self.phi)
        optimizer.load_state_dict(self.optimizer)
        gen.set_state(self.generator)


def _clone_tree(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone_tree(v) for v in value]
    return value
