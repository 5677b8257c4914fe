"""Scale-out: meta-training in several processes with torch.distributed gives the φ of one process,
and ``--seeds/--jobs`` runs one meta-training per seed in parallel processes with a table across seeds."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import TINY_RECIPE, run_cli, run_main, write_recipe
from safetensors.torch import load_file

from ml3cli.commands.meta_train import parse_seeds
from ml3cli.distributed import Shard
from ml3cli.errors import ML3Error


def recipe(tmp_path, tasks: int = 4, steps: int = 12):
    data = copy.deepcopy(TINY_RECIPE)
    data["outer"].update(tasks=tasks, steps=steps)
    data["inner"]["steps"] = 2
    return write_recipe(tmp_path / "tiny.yaml", data)


def test_two_processes_give_the_phi_of_one(tmp_path, monkeypatch, capsys):
    """Same seed, same total task batch: `--nproc 2` (torchrun, gloo on 127.0.0.1) ends at the φ of a single
    process within float tolerance; rank 0 alone writes the artifact and rank 1 logs to its own file."""
    path = recipe(tmp_path)
    one = run_main(monkeypatch, capsys, "meta-train", path, "--out", tmp_path / "one.safetensors", "-q", cwd=tmp_path)
    assert one.code == 0, one.output
    two = run_cli("meta-train", path, "--out", tmp_path / "two.safetensors", "--nproc", "2", "-q", cwd=tmp_path)
    assert two.code == 0, two.output
    assert "process 0 of 2: tasks (0, 2)" in two.output
    assert "process 1 of 2: tasks (2, 4)" in (tmp_path / "two.rank1.log").read_text()
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not (tmp_path / "two.rank1.safetensors").exists()


def test_a_task_that_collects_data_gives_the_phi_of_one_process(tmp_path, monkeypatch, capsys):
    """Model-free reacher (rollouts on MuJoCo between inner steps): every process simulates the whole batch from
    the gathered θ, so the random stream is the single process's and 2 processes end at its φ."""
    data = {
        "name": "tiny_mfrl",
        "task": "reacher_goal_mf",
        "task_options": {"hidden": [8], "episodes": 1, "task_loss_episodes": 2, "horizon": 5},
        "seed": 0,
        "threads": 1,
        "meta_loss": {"hidden": [8, 8], "activation": "relu", "output": "softplus"},
        "inner": {"lr": 0.5, "steps": 2, "task_loss_at": "every"},
        "outer": {"lr": 1e-2, "steps": 3, "tasks": 4},
        "meta_test": {"task": "reacher_goal_mf", "tasks": 1, "seeds": 1, "steps": 1},
        "log_every": 2,
    }
    path = write_recipe(tmp_path / "tiny_mfrl.yaml", data)
    one = run_main(monkeypatch, capsys, "meta-train", path, "--out", tmp_path / "one.safetensors", "-q", cwd=tmp_path)
    assert one.code == 0, one.output
    two = run_cli("meta-train", path, "--out", tmp_path / "two.safetensors", "--nproc", "2", "-q", cwd=tmp_path)
    assert two.code == 0, two.output
    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_an_uneven_split_is_refused_naming_the_field():
    with pytest.raises(ML3Error, match=r"outer.tasks \(3\) must be a multiple of the number of processes \(2\)"):
        Shard(rank=0, world=2).bounds(3)
    assert Shard(rank=2, world=3).bounds(9) == (6, 9)


@pytest.mark.parametrize(
    "spec, seeds", [("0-4", [0, 1, 2, 3, 4]), ("0,3,7", [0, 3, 7]), ("2", [2]), ("0-2,9,1", [0, 1, 2, 9])]
)
def test_seed_specs(spec, seeds):
    assert parse_seeds(spec) == seeds


@pytest.mark.parametrize("spec", ["", "a", "3-1", "-1", "0-1000000"])
def test_bad_seed_specs_are_refused(spec):
    with pytest.raises(ML3Error, match="--seeds"):
        parse_seeds(spec)


def test_seeds_in_parallel_jobs_match_single_runs(tmp_path, monkeypatch, capsys):
    """`--seeds 0-1 --jobs 2`: one artifact per seed, bit-identical to `--seed s` run alone, and a summary."""
    path = recipe(tmp_path, tasks=2, steps=8)
    swept = run_cli(
        "meta-train", path, "--out", tmp_path / "sweep.safetensors", "--seeds", "0-1", "--jobs", "2", cwd=tmp_path
    )
    assert swept.code == 0, swept.output
    assert "mean ± sd" in swept.output
    summary = json.loads((tmp_path / "sweep-seeds.json").read_text())
    assert [run["seed"] for run in summary["runs"]] == [0, 1]
    assert all(run["exit"] == 0 and run["learned"] > 0 for run in summary["runs"])
    alone = run_main(
        monkeypatch,
        capsys,
        "meta-train",
        path,
        "--seed",
        "1",
        "--out",
        tmp_path / "alone.safetensors",
        "-q",
        cwd=tmp_path,
    )
    assert alone.code == 0, alone.output
    a, b = load_file(tmp_path / "sweep-seed1.safetensors"), load_file(tmp_path / "alone.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not all(torch.equal(a[name], load_file(tmp_path / "sweep-seed0.safetensors")[name]) for name in a)


def test_seeds_cannot_be_combined_with_seed(tmp_path, monkeypatch, capsys):
    path = recipe(tmp_path)
    result = run_main(monkeypatch, capsys, "meta-train", path, "--seeds", "0-1", "--seed", "3", cwd=tmp_path)
    assert result.code == 2 and "--seeds runs whole meta-trainings" in result.output


def test_a_failed_seed_is_named_with_its_log_and_the_others_still_finish(tmp_path):
    """`--seeds 0,1`: seed 0's run is refused at once (another run holds its artifact); seed 1 still meta-trains
    and writes its artifact, and the command exits 2 naming seed 0 and its log."""
    from ml3cli import files

    path = recipe(tmp_path, tasks=2, steps=4)
    with files.exclusive_output(tmp_path / "run-seed0.safetensors"):
        result = run_cli(
            "meta-train", path, "--out", tmp_path / "run.safetensors", "--seeds", "0,1", "--jobs", "2", cwd=tmp_path
        )
    assert result.code == 2, result.output
    assert "seed(s) 0 (exit 2, see" in result.output and "run-seed0.log" in result.output
    assert "being written by another run" in (tmp_path / "run-seed0.log").read_text()
    assert (tmp_path / "run-seed1.safetensors").is_file() and not (tmp_path / "run-seed0.safetensors").exists()
