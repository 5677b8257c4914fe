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


def test_more_threads_than_cores_are_named_with_the_count_that_fits(monkeypatch):
    from ml3cli import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    assert runtime.oversubscription(2) is None and runtime.oversubscription(1, processes=2) is None
    assert "3 threads is more than the 2 CPU cores" in runtime.oversubscription(3)
    assert "use --threads 1 or fewer" in runtime.oversubscription(2, processes=2)
    assert "4 processes × 1 threads" in runtime.oversubscription(1, processes=4)


def test_commands_warn_before_oversubscribing_the_cores(tmp_path, monkeypatch, capsys):
    """meta-train with more threads than cores, or --seeds with more jobs × threads than cores, says so on stderr
    before any work; within the cores it says nothing."""
    from helpers import TINY_RECIPE, run_main, write_recipe

    from ml3cli import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    recipe = write_recipe(tmp_path / "r.yaml", {**TINY_RECIPE, "outer": {**TINY_RECIPE["outer"], "steps": 2}})
    threads = torch.get_num_threads()
    try:
        three = run_main(
            monkeypatch, capsys, "meta-train", recipe, "--threads", "3", "-q", "--out", "a.safetensors", cwd=tmp_path
        )
        assert three.code == 0 and "3 threads is more than the 2 CPU cores" in three.stderr
        one = run_main(
            monkeypatch, capsys, "meta-train", recipe, "--threads", "2", "-q", "--out", "b.safetensors", cwd=tmp_path
        )
        assert one.code == 0 and "CPU cores" not in one.stderr
    finally:
        torch.set_num_threads(threads)
    from ml3cli.launchers import LocalLauncher

    def launched(self, runs, on_finished):  # the warning must come before any process starts: stop the sweep here
        raise SystemExit(7)

    monkeypatch.setattr(LocalLauncher, "run_all", launched)
    sweep = run_main(
        monkeypatch, capsys, "meta-train", recipe, "--seeds", "0-2", "--jobs", "3", "--out", "c.safetensors",
        cwd=tmp_path,
    )  # fmt: skip
    assert sweep.code == 7 and "3 processes × 1 threads is more than the 2 CPU cores" in sweep.stderr
