"""Process-wide settings: threads, device, seeding. Kept in one place so that every entry point agrees."""

from __future__ import annotations

import random

import numpy as np
import torch

from ml3cli.errors import ML3Error


def resolve_device(name: str) -> torch.device:
    """Map the recipe/CLI value ``cpu`` | ``cuda`` | ``cuda:N`` | ``auto`` to a torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ML3Error(f"device {name!r} was asked for but CUDA is not available here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ML3Error(f"device {name!r} is not a valid device (expected cpu, cuda, cuda:N or auto)") from err


def configure(threads: int, seed: int | None = None) -> None:
    """Set the intra-op thread count (small models run far faster on 1 thread) and seed the global RNGs.

    The engine itself draws all randomness from explicit ``torch.Generator`` objects; seeding the global RNGs
    only guards third-party code that uses them.
    """
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


def generator(seed: int) -> torch.Generator:
    """A CPU generator: all sampling happens on CPU so that a seed gives the same numbers on every device."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g
