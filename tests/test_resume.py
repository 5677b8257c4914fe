"""Checkpoints and exact resume: the full outer-loop state survives a file round trip, a run stopped at
any outer step and resumed gives φ bit-identical to the uninterrupted run, SIGINT/SIGTERM write a checkpoint and
exit 130/143 with the resume command, SIGKILL never leaves a half-written file under a final name, and a checkpoint
of another recipe is refused naming the field.
"""

from __future__ import annotations

import copy
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_RECIPE, run_cli, run_main, write_recipe
from rich.console import Console
from safetensors.torch import load_file

from ml3cli import checkpoints
from ml3cli.artifacts import load_loss
from ml3cli.checkpoints import MetaTrainState, batch_type_of, load_checkpoint, save_checkpoint
from ml3cli.commands.meta_train import run_meta_train
from ml3cli.engine import meta_train
from ml3cli.errors import ML3Error, RunInterrupted
from ml3cli.recipes import checkpoint_path_for, recipe_from_dict, recipe_to_dict
from ml3cli.tasks import make_task

#: how many stop-at-k / resume cycles were compared bit for bit in this session (reported by the last test).
CYCLES: list[str] = []


class Stop(Exception):
    pass


def tiny(steps: int = 12, **sections) -> dict:
    data = copy.deepcopy(TINY_RECIPE)
    data["outer"]["steps"] = steps
    data["log_every"] = 3
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return data


def frequency_recipe(steps: int = 8) -> dict:
    data = tiny(steps, task="sine_frequency", task_loss={"weight": 1.0, "extra": {"param_distance": 0.5}})
    data["task_options"] = {"points": 8, "query_points": 8}
    data["meta_test"] = {"task": "sine_frequency", "task_options": {"points": 8, "query_points": 8}, "steps": 5}
    return data


def assert_same_phi(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype
        assert torch.equal(a[name], b[name]), name


def without_time(curves: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time/seconds"} for row in curves]


def stopped_at(recipe, task, k: int, tmp_path: Path) -> Path:
    """Run until outer step k, write its checkpoint through the file format, and stop (as an interrupt would)."""
    path = tmp_path / f"stop{k}.checkpoint.safetensors"

    def on_state(step, snapshot):
        if step == k:
            save_checkpoint(path, snapshot(), recipe_to_dict(recipe), tmp_path / "a.safetensors")
            raise Stop

    with pytest.raises(Stop):
        meta_train(recipe, task, on_state=on_state)
    return path


# -- engine level ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, stops",
    [
        (tiny(12), [1, 5, 11, 12]),
        (tiny(12, inner={"steps": 2, "reset_every": 6}, outer={"grad_clip": 0.5}), [1, 2, 3, 7]),
        (frequency_recipe(8), [3]),
        (tiny(12, outer={"lr_schedule": "cosine"}), [1, 6]),
    ],
    ids=["sine", "sine-reset-clip", "sine_frequency", "sine-cosine-lr"],
)
def test_resume_from_any_step_is_bit_identical(tmp_path, data, stops):
    """Stop at outer step k, save and load the checkpoint file, resume: φ, Adam's moments and the curves
    (without wall time) equal the uninterrupted run's exactly (torch.equal)."""
    recipe = recipe_from_dict(data)
    task = make_task(recipe.task, recipe.task_options)
    finals: list[MetaTrainState] = []
    full = meta_train(recipe, task, on_state=lambda s, snap: finals.append(snap()) if s == recipe.outer.steps else None)
    for k in stops:
        loaded = load_checkpoint(stopped_at(recipe, task, k, tmp_path), batch_type_of(task))
        assert loaded.state.step == k and loaded.recipe == recipe_to_dict(recipe)
        checkpoints.validate_state(loaded, recipe, task)
        resumed_final: list[MetaTrainState] = []
        resumed = meta_train(
            recipe,
            task,
            resume=loaded.state,
            on_state=lambda s, snap, out=resumed_final: out.append(snap()) if s == recipe.outer.steps else None,
        )
        assert_same_phi(full.metaloss.state_dict(), resumed.metaloss.state_dict())
        assert without_time(full.curves) == without_time(resumed.curves)
        a, b = finals[0], (resumed_final[0] if resumed_final else loaded.state)  # k = steps: no step left
        assert torch.equal(a.generator, b.generator) and a.age == b.age
        for index, entry in a.optimizer["state"].items():
            for key, value in entry.items():
                assert torch.equal(value, b.optimizer["state"][index][key]), (index, key)
        CYCLES.append(f"engine {recipe.task} k={k}")


def test_state_round_trip_keeps_every_field(tmp_path):
    """MetaTrainState → file → MetaTrainState: every tensor equal, batch rebuilt as the task's NamedTuple."""
    recipe = recipe_from_dict(tiny(4))
    task = make_task(recipe.task, recipe.task_options)
    states: list[MetaTrainState] = []
    meta_train(recipe, task, on_state=lambda s, snap: states.append(snap()) if s == 3 else None)
    state = states[0]
    path = save_checkpoint(tmp_path / "c.checkpoint.safetensors", state, recipe_to_dict(recipe), "x.safetensors")
    back = load_checkpoint(path, batch_type_of(task)).state
    assert (back.step, back.age, back.curves, back.seconds) == (state.step, state.age, state.curves, state.seconds)
    assert_same_phi(state.phi, back.phi)
    assert_same_phi(state.theta, back.theta)
    assert type(back.batch) is type(state.batch)
    assert all(torch.equal(x, y) for x, y in zip(state.batch, back.batch, strict=True))
    assert torch.equal(state.generator, back.generator)
    assert back.optimizer["param_groups"] == [{**g, "betas": list(g["betas"])} for g in state.optimizer["param_groups"]]


def test_checkpoint_is_not_a_loss_artifact(tmp_path):
    """A checkpoint has its own format name; load_loss refuses it and says how to continue it."""
    recipe = recipe_from_dict(tiny(3))
    task = make_task(recipe.task, recipe.task_options)
    path = stopped_at(recipe, task, 2, tmp_path)
    with pytest.raises(ML3Error, match="checkpoint, not a loss artifact.*--resume"):
        load_loss(path)


# -- CLI level, in process ------------------------------------------------------------------------------------
def interrupt_at(monkeypatch, k: int, signum: int) -> None:
    """Make the next run_meta_train send itself ``signum`` during outer step k."""
    import ml3cli.commands.meta_train as meta_train_command

    real = meta_train_command.meta_train

    def patched(recipe, task, on_step=None, **kwargs):
        def on_step_and_signal(step, record):
            if step == k:
                os.kill(os.getpid(), signum)
            on_step(step, record)

        return real(recipe, task, on_step=on_step_and_signal, **kwargs)

    monkeypatch.setattr(meta_train_command, "meta_train", patched)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_writes_checkpoint_and_resume_matches(tmp_path, monkeypatch, capsys, signum, code):
    """SIGINT/SIGTERM in outer step k: that step finishes, a checkpoint at step k is written, the CLI exits
    130/143 and prints the exact resume command; running it gives an artifact bit-identical to the uninterrupted
    run (whose default checkpoint_every is off for this length, so the signal path alone wrote it)."""
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny(10, checkpoint_every=0))
    reference = run_meta_train(recipe_from_dict(tiny(10, checkpoint_every=0)), tmp_path / "ref.safetensors",
                               Console(quiet=True), quiet=True)  # fmt: skip

    interrupt_at(monkeypatch, 4, signum)
    out = tmp_path / "run" / "x.safetensors"
    result = run_main(monkeypatch, capsys, "meta-train", recipe_path, "--out", out, "--quiet", cwd=tmp_path)
    assert result.code == code, result.output
    assert "Traceback" not in result.output
    checkpoint = checkpoint_path_for(out)
    assert f"checkpoint at outer step 4 kept at {checkpoint}" in result.stderr
    command = result.stderr.split("resume with: ", 1)[1].strip()
    assert command == shlex.join(
        ["ml3", "meta-train", str(recipe_path), "--out", str(out), "--quiet", "--resume", str(checkpoint)]
    )
    assert not out.exists()
    monkeypatch.undo()

    result = run_main(monkeypatch, capsys, *shlex.split(command)[1:], cwd=tmp_path)
    assert result.code == 0, result.output
    assert "resuming from" not in result.stdout  # --quiet
    assert_same_phi(load_file(reference), load_file(out))
    assert not checkpoint.exists()  # checkpoint_every: 0 keeps no end-of-run checkpoint; the interrupt's is spent
    CYCLES.append(f"cli {signal.Signals(signum).name}")


def test_bare_resume_uses_the_default_checkpoint(tmp_path, monkeypatch, capsys):
    """`ml3 meta-train RECIPE --resume` (no value) continues from ARTIFACT.checkpoint.safetensors."""
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny(6, checkpoint_every=0))
    reference = run_meta_train(recipe_from_dict(tiny(6)), tmp_path / "ref.safetensors", Console(quiet=True), True)
    interrupt_at(monkeypatch, 2, signal.SIGINT)
    out = tmp_path / "x.safetensors"
    assert run_main(monkeypatch, capsys, "meta-train", recipe_path, "--out", out, "-q", cwd=tmp_path).code == 130
    monkeypatch.undo()
    result = run_main(monkeypatch, capsys, "meta-train", recipe_path, "--out", out, "--resume", cwd=tmp_path)
    assert result.code == 0, result.output
    assert "resuming from" in result.stdout and "at outer step 2 of 6" in result.stdout
    assert_same_phi(load_file(reference), load_file(out))


def test_resume_refuses_another_recipe_naming_the_field(tmp_path, monkeypatch, capsys):
    """A checkpoint written with another outer.lr (or seed) is refused with exit 2 naming the field; a
    different output path (the `artifact` field) is allowed."""
    recipe = recipe_from_dict(tiny(4))
    task = make_task(recipe.task, recipe.task_options)
    path = stopped_at(recipe, task, 2, tmp_path)
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny(4))
    for extra, field in ((["--set", "outer.lr=0.01"], "outer.lr"), (["--seed", "5"], "seed")):
        result = run_main(monkeypatch, capsys, "meta-train", recipe_path, *extra, "--resume", path, "-q", cwd=tmp_path)
        assert result.code == 2, result.output
        assert f"field `{field}`" in result.stderr and "cannot resume" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    result = run_main(
        monkeypatch, capsys, "meta-train", recipe_path, "--set", "artifact=elsewhere.safetensors",
        "--resume", path, "-q", cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    assert (tmp_path / "elsewhere.safetensors").is_file()


def test_resume_without_a_checkpoint_is_a_user_error(tmp_path, monkeypatch, capsys):
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny(4))
    result = run_main(monkeypatch, capsys, "meta-train", recipe_path, "--resume", "-q", cwd=tmp_path)
    assert result.code == 2 and "no checkpoint at" in result.stderr, result.output


def test_interrupt_before_any_checkpoint_is_reported(tmp_path):
    """RunInterrupted without a checkpoint says so and keeps the exit code 128 + signal."""
    err = RunInterrupted(signal.SIGTERM, None, None)
    assert err.exit_code == 143 and "no checkpoint" in str(err)


# -- real signals, in a subprocess ----------------------------------------------------------------------------
#: `ml3 ...` with a pause after every outer step: φ is the same, but the run lasts long enough that each signal
#: lands while it trains (however busy the machine), so that no phase can be skipped by a run that ended first
SLOWED_ML3 = textwrap.dedent(
    """
    import sys, time
    sys.argv = ["/usr/local/bin/ml3", *sys.argv[1:]]  # the console script: ml3cli guards its start-up
    import ml3cli
    import ml3cli.commands.meta_train as command
    real = command.meta_train
    def slowed(recipe, task, on_step=None, **kwargs):
        def on_step_slowly(step, record):
            time.sleep(0.1)
            if on_step is not None:
                on_step(step, record)
        return real(recipe, task, on_step=on_step_slowly, **kwargs)
    command.meta_train = slowed
    from ml3cli.entry import main
    main()
    """
)


def start_run(recipe_path: Path, out: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, COLUMNS="200", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-c", SLOWED_ML3, "meta-train", str(recipe_path), "--out", str(out), "--quiet", *extra],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_checkpoint_after(step: int, path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until the run ``proc`` has checkpointed an outer step after ``step`` (-1: any); it must still be running."""
    deadline = time.monotonic() + timeout
    while load_checkpoint_step(path) <= step:
        assert proc.poll() is None, ("the run ended before the signal", proc.returncode, proc.communicate())
        assert time.monotonic() < deadline, f"no checkpoint after outer step {step} at {path}"
        time.sleep(0.02)


def test_real_signals_and_sigkill_then_resume_bit_identical(tmp_path):
    """A real `ml3 meta-train` process gets SIGINT, then (resumed) SIGTERM, then (resumed) SIGKILL, each after a
    new checkpoint appeared and while it still trains. SIGINT/SIGTERM exit 130/143 with a resume command; after
    SIGKILL the final names hold only complete files (a checkpoint, no artifact). The last resume completes, and
    its artifact is bit-identical to an uninterrupted run."""
    steps = 60
    data = tiny(steps, checkpoint_every=7, meta_test={"seeds": 1, "tasks": 2})
    recipe_path = write_recipe(tmp_path / "r.yaml", data)
    reference = run_meta_train(recipe_from_dict(data), tmp_path / "ref.safetensors", Console(quiet=True), True)
    out = tmp_path / "run" / "x.safetensors"
    checkpoint = checkpoint_path_for(out)

    proc = start_run(recipe_path, out, tmp_path)
    wait_for_checkpoint_after(-1, checkpoint, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "resume with: ml3 meta-train" in stderr
    first = load_checkpoint(checkpoint, None).state.step
    assert 0 < first < steps and not out.exists()

    proc = start_run(recipe_path, out, tmp_path, "--resume")
    wait_for_checkpoint_after(first, checkpoint, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "resume with:" in stderr and "--resume" in stderr
    second = load_checkpoint(checkpoint, None).state.step
    assert first < second < steps and not out.exists()

    proc = start_run(recipe_path, out, tmp_path, "--resume")
    wait_for_checkpoint_after(second, checkpoint, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    third = load_checkpoint(checkpoint, None).state.step  # a complete checkpoint under the final name
    assert second < third < steps and not out.exists()

    result = run_cli("meta-train", recipe_path, "--out", out, "-q", "--resume", cwd=tmp_path)
    assert result.code == 0, result.output
    assert_same_phi(load_file(reference), load_file(out))
    CYCLES.append(f"subprocess SIGINT@{first}+SIGTERM@{second}+SIGKILL@{third}")
    print(f"\nbit-identical resume cycles compared: {len(CYCLES)} ({', '.join(CYCLES)})")


def load_checkpoint_step(path: Path) -> int:
    try:
        return load_checkpoint(path, None).state.step
    except ML3Error:
        return -1


@pytest.mark.slow
def test_resume_is_bit_identical_after_20_random_kills_from_the_first_instant(tmp_path):
    """A chain of `ml3 meta-train` processes, each stopped by SIGINT, SIGTERM or SIGKILL at a random moment (a
    third of them within the first second: start-up, the resume being read) and continued with --resume where a
    checkpoint exists: never a traceback, and the run that finishes is bit-identical to an uninterrupted one."""
    import random

    steps = 60
    data = tiny(steps, checkpoint_every=3, meta_test={"seeds": 1, "tasks": 2})
    recipe_path = write_recipe(tmp_path / "r.yaml", data)
    reference = run_meta_train(recipe_from_dict(data), tmp_path / "ref.safetensors", Console(quiet=True), True)
    out = tmp_path / "run" / "x.safetensors"
    checkpoint = checkpoint_path_for(out)
    chooser = random.Random(20)
    kills = []
    while len(kills) < 20:
        proc = start_run(recipe_path, out, tmp_path, *(["--resume"] if checkpoint.exists() else []))
        delay = chooser.uniform(0.1, 1.0) if len(kills) % 3 == 0 else chooser.uniform(1.0, 6.0)
        signum = chooser.choice([signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
        time.sleep(delay)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
        assert "Traceback" not in stderr, (delay, signum, stderr[-3000:])
        # SIGTERM before the run installs its handler ends the process as the default action does (no output)
        ended = (0, 130, 143, -signal.SIGKILL, -signal.SIGTERM)
        assert proc.returncode in ended, (delay, signum, proc.returncode, stderr[-500:])
        if proc.returncode == 0:  # it finished before the signal: start the chain again
            out.unlink()
            checkpoint.unlink()
            continue
        kills.append(f"{signal.Signals(signum).name}@{delay:.2f}s→step {load_checkpoint_step(checkpoint)}")
        assert not out.exists()
    result = run_cli("meta-train", recipe_path, "--out", out, "-q", *(["--resume"] if checkpoint.exists() else []),
                     cwd=tmp_path)  # fmt: skip
    assert result.code == 0, result.output
    assert_same_phi(load_file(reference), load_file(out))
    print(f"\n{len(kills)} kills, then bit-identical: {', '.join(kills)}")
