"""Meta-training across processes and machines with ``torch.distributed`` (torchrun).

State is replicated, work is sharded: every rank draws the same task batch and θ₀ from the same seed, computes
the meta-gradient of its contiguous share of the tasks, and the shares are combined with one all-reduce (the mean
over ranks of per-rank means is the mean over all tasks, because the shares are equal). The updated θ slices are
all-gathered, so every rank holds the full outer-loop state after each step: rank 0 alone writes checkpoints and
the artifact, and a checkpoint resumes under any number of processes. Gloo on CPU, NCCL on GPU.

    torchrun --nproc-per-node 2 -m ml3cli meta-train recipes/sine.yaml         # or: ml3 meta-train ... --nproc 2
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500 --nproc-per-node 4 \\
        -m ml3cli meta-train recipes/sine.yaml                                   # on each of 2 machines
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._pytree import tree_map

from ml3cli.errors import ML3Error


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` meta-training processes."""

    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def bounds(self, n_tasks: int) -> tuple[int, int]:
        """The contiguous task range ``[lo, hi)`` of this rank; ``n_tasks`` must split evenly."""
        if n_tasks % self.world:
            raise ML3Error(
                f"outer.tasks ({n_tasks}) must be a multiple of the number of processes ({self.world}) so that every "
                "process meta-trains on an equal share of the task batch"
            )
        share = n_tasks // self.world
        return self.rank * share, (self.rank + 1) * share

    def part(self, tree: Any, n_tasks: int) -> Any:
        """This rank's share of a batch of θ or tasks (tensors with a leading task axis)."""
        lo, hi = self.bounds(n_tasks)
        return tree_map(lambda t: t[lo:hi], tree)

    def mean(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The mean over ranks of each tensor (one flat all-reduce)."""
        names = list(tensors)
        flat = torch.cat([tensors[name].reshape(-1) for name in names])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        out, offset = {}, 0
        for name in names:
            size = tensors[name].numel()
            out[name] = flat[offset : offset + size].view_as(tensors[name])
            offset += size
        return out

    def gather(self, tree: Any) -> Any:
        """Concatenate every rank's share of a tree of tensors along the task axis (None leaves stay None)."""

        def cat(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            parts = [torch.empty_like(t) for _ in range(self.world)]
            dist.all_gather(parts, t.contiguous())
            return torch.cat(parts)

        return tree_map(cat, tree)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on at least one (to stop all ranks at the same step)."""
        value = torch.tensor([1.0 if flag else 0.0])
        if dist.get_backend() == "nccl":
            value = value.cuda()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)


def world_from_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by torchrun; (0, 1, 0) outside it."""
    try:
        return (
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError as err:
        raise ML3Error(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {err}") from None


def join(device: torch.device) -> Shard | None:
    """Join the process group that torchrun set up (None when this is a single process).

    On CUDA each process takes the GPU of its local rank and NCCL; on CPU gloo.
    """
    rank, world, local_rank = world_from_environment()
    if world <= 1:
        return None
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Shard(rank=rank, world=world)


def leave() -> None:
    """Close the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run ``ml3 ARGS`` in ``nproc`` local processes under torchrun and return its exit code."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "ml3cli",
        *args,
    ]
    return subprocess.call(command)
