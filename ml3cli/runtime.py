"""Process-wide settings: threads, device, seeding. Kept in one place so that every entry point agrees."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import random
import re
import sys

import numpy as np
import torch

from ml3cli.errors import ML3Error


def resolve_device(name: str) -> torch.device:
    """Map the recipe/CLI value ``cpu`` | ``cuda`` | ``cuda:N`` | ``auto`` to a torch device (nothing else: torch
    also names devices such as ``meta`` or ``xla`` that no ml3 computation can run on)."""
    if not (isinstance(name, str) and re.fullmatch(r"cpu|auto|cuda(:[0-9]{1,4})?", name)):
        raise ML3Error(f"device {str(name)[:40]!r} is not one ml3 runs on: expected cpu, cuda, cuda:N or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ML3Error(f"device {name!r} was asked for but CUDA is not available here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ML3Error(f"device {name!r} is not a valid device (expected cpu, cuda, cuda:N or auto)") from err


#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: The largest mmap threshold glibc accepts on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the kernel; True if it took effect.

    Every meta-step allocates and frees the same set of tensors (a vmapped batch of 64 sine tasks keeps ~100 MB of
    activations for the outer backward pass). With glibc's defaults, blocks of a few MB come from fresh ``mmap``
    pages and top-of-heap memory is trimmed after every step, so the next step pays a page fault per 4 KiB page it
    touches again: measured 122 → 89 ms per meta-step for 64 tasks × K = 5 (``benchmarks/meta_step.py``, 1 thread).
    Blocks up to 32 MiB now come from the heap, and the heap is never trimmed: the process keeps its peak
    resident memory, which a training process reaches on its first step anyway. A no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trimmed = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    mapped = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    return trimmed == 1 and mapped == 1


def configure(threads: int, seed: int | None = None) -> None:
    """Set the intra-op thread count (small models run far faster on 1 thread), keep freed memory for reuse
    (:func:`keep_freed_memory`) and seed the global RNGs.

    The engine itself draws all randomness from explicit ``torch.Generator`` objects; seeding the global RNGs
    only guards third-party code that uses them.
    """
    keep_freed_memory()
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        warning = oversubscription(threads)
        if warning:
            sys.stderr.write(f"warning: {warning}\n")
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def oversubscription(threads: int, processes: int = 1) -> str | None:
    """What is wrong with ``processes`` runs of ``threads`` intra-op threads each on this machine, or None when
    they fit its cores. More threads than cores do not add speed: they wait for each other (torch's threads
    spin before they sleep), so every step gets slower, up to many times under load."""
    cores = usable_cores()
    if threads * processes <= cores:
        return None
    each = f"{processes} processes × {threads} threads" if processes > 1 else f"{threads} threads"
    return (
        f"{each} is more than the {cores} CPU cores this process may use: every step will be slower; "
        f"use --threads {max(1, cores // processes)} or fewer"
    )


#: the independent random streams of one seed: meta-training draws, validation draws (choosing learning rates) and
#: test draws (the reported numbers)
STREAMS = ("meta_train", "validation", "test")


def stream_seed(purpose: str, seed: int) -> int:
    """The seed of the random stream ``purpose`` (one of :data:`STREAMS`) for the run seed ``seed``.

    The meta-train stream is ``seed`` itself (what recipes record); validation and test seeds are 62-bit hashes of
    (purpose, seed), so a test task is never drawn from the stream that meta-training drew from, nor from the
    validation stream that chose a learning rate.
    """
    if purpose not in STREAMS:
        raise ValueError(f"unknown random stream {purpose!r}; expected one of {STREAMS}")
    if purpose == "meta_train":
        return seed
    return hashed_seed(purpose, seed)


def hashed_seed(purpose: str, seed: int) -> int:
    """A 62-bit seed for the stream ``purpose`` of ``seed``, a hash of the two (streams of neighbouring seeds and of
    different purposes stay apart)."""
    digest = hashlib.sha256(f"ml3/{purpose}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def generator(seed: int) -> torch.Generator:
    """A CPU generator: all sampling happens on CPU so that a seed gives the same numbers on every device."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g
