"""Failures a long run meets: an unwritable output, a full disk mid-run, two writers of one artifact, divergence.

Each must end in one clear line (exit code 2) that says what was kept, and never leave a half-written file under
a final name.
"""

from __future__ import annotations

import copy
import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from helpers import REPO, TINY_RECIPE, run_main, write_recipe

from ml3cli import load_loss
from ml3cli.checkpoints import batch_type_of, load_checkpoint
from ml3cli.tasks import make_task


def tiny_recipe() -> dict:
    return copy.deepcopy(TINY_RECIPE)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_unwritable_output_is_refused_before_the_first_outer_step(tmp_path, monkeypatch, capsys):
    """An --out under a regular file (a folder that cannot exist) is reported before any work, exit 2."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe() | {"checkpoint_every": 1})
    started = []
    import ml3cli.commands.meta_train as meta_train_command

    real = meta_train_command.meta_train
    monkeypatch.setattr(meta_train_command, "meta_train", lambda *a, **k: started.append(1) or real(*a, **k))
    result = run_main(
        monkeypatch, capsys, "meta-train", recipe, "--out", blocker / "x.safetensors", "--quiet", cwd=tmp_path
    )
    assert result.code == 2
    assert "cannot write to" in result.stderr and str(blocker) in result.stderr
    assert "Traceback" not in result.output and not started


def test_full_disk_at_a_checkpoint_reports_what_was_kept(tmp_path, monkeypatch, capsys):
    """ENOSPC while replacing the second checkpoint: exit 2 naming the file, the first checkpoint intact,
    no temp file left, no artifact written."""
    data = tiny_recipe() | {"checkpoint_every": 2}
    data["outer"]["steps"] = 8
    recipe = write_recipe(tmp_path / "r.yaml", data)
    out = tmp_path / "out" / "tiny.safetensors"
    checkpoint = out.with_suffix(".checkpoint.safetensors")
    real_replace = os.replace
    calls = []

    def replace(src, dst, *args, **kwargs):
        if str(dst) == str(checkpoint):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    result = run_main(monkeypatch, capsys, "meta-train", recipe, "--out", out, "--quiet", cwd=tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert result.code == 2, result.output
    assert "No space left on device" in result.stderr and "previous file there is unchanged" in result.stderr
    assert "Traceback" not in result.output
    kept = load_checkpoint(checkpoint, batch_type_of(make_task("sine", data["task_options"])))
    assert kept.state.step == 2
    assert not out.exists() and leftovers(out.parent) == []


WRITER = textwrap.dedent(
    """
    import sys, torch
    from ml3cli import MetaLoss, save_loss
    from ml3cli.tasks.sine import SineRegression
    torch.manual_seed(int(sys.argv[2]))
    loss = MetaLoss(SineRegression.loss_inputs_spec, (64, 64))
    for i in range(40):
        save_loss(sys.argv[1], loss, {"task": "sine", "writer": int(sys.argv[2])})
    """
)


def test_two_writers_of_one_artifact_leave_one_complete_file(tmp_path):
    """Two processes overwrite the same artifact 40 times each, concurrently: the result is one writer's
    complete file (checksum valid, tensors equal to that writer's), and no temp file remains."""
    path = tmp_path / "shared.safetensors"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(seed)], env=env, cwd=tmp_path) for seed in (1, 2)
    ]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    loaded = load_loss(path)
    writer = loaded.info["writer"]
    torch.manual_seed(writer)
    from ml3cli import MetaLoss
    from ml3cli.tasks.sine import SineRegression

    expected = MetaLoss(SineRegression.loss_inputs_spec, (64, 64)).state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    assert leftovers(tmp_path) == []


def test_divergence_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """A run that diverges after its first step exits 2 with the step, a hint, and the kept checkpoint."""
    data = tiny_recipe() | {"checkpoint_every": 1}
    data["outer"].update(lr=1e30, steps=10)
    recipe = write_recipe(tmp_path / "r.yaml", data)
    out = tmp_path / "tiny.safetensors"
    result = run_main(monkeypatch, capsys, "meta-train", recipe, "--out", out, "--quiet", cwd=tmp_path)
    assert result.code == 2, result.output
    assert "diverged at outer step" in result.stderr and "lower inner.lr or outer.lr" in result.stderr
    checkpoint = out.with_suffix(".checkpoint.safetensors")
    assert f"kept at {checkpoint}" in result.stderr.replace("\n", "")
    kept = load_checkpoint(checkpoint, batch_type_of(make_task("sine", data["task_options"])))
    assert all(torch.isfinite(v).all() for v in kept.state.phi.values())
    assert not out.exists()


def test_a_finished_run_keeps_its_end_of_run_checkpoint(tmp_path, monkeypatch, capsys):
    """With checkpoint_every > 0 the checkpoint of the last outer step stays beside the artifact."""
    data = tiny_recipe() | {"checkpoint_every": 4}
    data["outer"]["steps"] = 6
    recipe = write_recipe(tmp_path / "r.yaml", data)
    out = tmp_path / "tiny.safetensors"
    result = run_main(monkeypatch, capsys, "meta-train", recipe, "--out", out, "--quiet", cwd=tmp_path)
    assert result.code == 0, result.output
    kept = load_checkpoint(
        out.with_suffix(".checkpoint.safetensors"), batch_type_of(make_task("sine", data["task_options"]))
    )
    assert kept.state.step == 6
    assert all(torch.equal(kept.state.phi[k], v) for k, v in load_loss(out).state_dict().items())
