"""Process-wide settings (ml3cli.runtime)."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from ml3cli.runtime import configure, keep_freed_memory

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and minor page faults")


def page_faults_of_one_step() -> int:
    """Minor page faults while 24 blocks of 4 MiB are alive together and then freed, like one meta-step's graph.

    With glibc's defaults every such step faults ~24,500 times (the blocks come from fresh mmap pages or from a
    heap that was trimmed after the previous step)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(1024 * 1024) for _ in range(24)]
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def assert_freed_memory_is_reused(faults: list[int]) -> None:
    """Every step after the first few touches memory it already owns: without reuse each faults ~24,500 times.

    A step can still meet a stray fault or a thousand (another allocation in the process between two steps moves
    the heap's top), so the bound is on the typical step and, loosely, on the worst one."""
    later = sorted(faults[3:])
    assert later[len(later) // 2] < 100, faults
    assert later[-1] < 24_576 // 4, faults


@linux_only
def test_a_repeated_step_reuses_freed_memory_without_page_faults():
    if not keep_freed_memory():
        pytest.skip("not glibc")
    assert_freed_memory_is_reused([page_faults_of_one_step() for _ in range(8)])


@linux_only
def test_configure_sets_threads_and_keeps_freed_memory():
    threads = torch.get_num_threads()
    try:
        configure(1, seed=3)
        assert torch.get_num_threads() == 1
        assert_freed_memory_is_reused([page_faults_of_one_step() for _ in range(8)])
    finally:
        torch.set_num_threads(threads)
