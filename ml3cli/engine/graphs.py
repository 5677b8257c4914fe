"""A meta-step replayed from a CUDA graph: the same ∇_φ L_T, launched as one graph instead of thousands of kernels.

On a GPU the engine is launch-bound: a meta-step of the sine reference networks is a few thousand small kernels
(forward, inner gradients, the double backward), each launched from Python, so the time per meta-step barely
changes from 1 to 4,096 tasks. A CUDA graph records those launches once and replays them with a single call.
:class:`GraphedEstimator` wraps any estimator of :mod:`~.estimators`:

* the first call for a given set of shapes (φ, θ₀, the inner state and the task batch) warms the estimator up on a
  side stream, then captures one call into a graph whose inputs are fixed ("static") tensors;
* every later call with the same shapes copies its tensors into those inputs, replays the graph and returns copies
  of its outputs: the values the estimator itself would return, as the same kernels run on the same data.

What a graph cannot hold falls back to the wrapped estimator, call by call: tensors not on a CUDA device, a task
that collects data between inner steps (rollouts run on the CPU, from a generator), and a shard of a distributed
run (its collectives are outside the graph). The outer loop (Adam on φ) stays outside the graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ml3cli.engine.estimators import Estimator, MetaGradient
from ml3cli.engine.inner_optimizers import InnerState
from ml3cli.engine.unroll import Phi
from ml3cli.metaloss import MetaLoss
from ml3cli.tasks.base import Theta

if TYPE_CHECKING:
    from ml3cli.distributed import Shard


def signature(tree: Any) -> tuple:
    """What a graph's inputs must match: the structure of ``tree`` and each tensor's shape, dtype and device."""
    leaves, spec = tree_flatten(tree)
    return (str(spec), tuple((tuple(t.shape), t.dtype, str(t.device)) for t in leaves))


def graphable(task_collects_data: bool, shard: Any, tensors: Any) -> bool:
    """Whether a call can be captured: every tensor on a CUDA device, no data collected between the inner steps
    (it comes from the CPU and a generator) and no shard of a distributed run."""
    leaves, _ = tree_flatten(tensors)
    return (
        not task_collects_data
        and shard is None
        and bool(leaves)
        and all(isinstance(t, torch.Tensor) and t.is_cuda for t in leaves)
        and torch.cuda.is_available()
    )


@dataclass
class GraphedEstimator:
    """``estimator`` with its calls on a CUDA device replayed from a captured graph (see the module docstring).

    ``warmup``: calls on a side stream before the capture, which CUDA graphs need (lazy initialisations, cuBLAS
    workspaces and the autograd engine's streams must exist before the capture records them).
    """

    estimator: Estimator
    warmup: int = 3
    captures: int = 0  #: how many graphs were captured (one per new set of shapes)
    replays: int = 0  #: how many calls a graph served
    _graph: Any = field(default=None, repr=False)
    _key: tuple | None = field(default=None, repr=False)
    _inputs: Any = field(default=None, repr=False)
    _outputs: MetaGradient | None = field(default=None, repr=False)

    @property
    def task(self):
        return self.estimator.task

    @property
    def optimizer(self):
        return self.estimator.optimizer

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
        """∇_φ L_T as ``estimator.estimate`` computes it, from a graph when the call can be captured."""
        state = self.estimator.optimizer.init(theta) if state is None else state
        inputs = (phi, theta, state, batch)
        if not graphable(self.estimator.task.collects_data, shard, inputs):
            return self.estimator.estimate(metaloss, phi, theta, batch, gen, shard, state)
        key = signature(inputs)
        if key != self._key:
            self._capture(metaloss, inputs, key)
        tree_map(lambda static, value: static.copy_(value), self._inputs, inputs)
        self._graph.replay()
        self.replays += 1
        return tree_map(lambda t: t.clone(), self._outputs)

    def _capture(self, metaloss: MetaLoss, inputs: Any, key: tuple) -> None:
        static = tree_map(lambda t: t.detach().clone(), inputs)

        def call() -> MetaGradient:
            phi, theta, state, batch = static
            return self.estimator.estimate(metaloss, phi, theta, batch, None, None, state)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = call()
        self._graph, self._key, self._inputs, self._outputs = graph, key, static, outputs
        self.captures += 1
