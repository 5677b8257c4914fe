"""The launchers of ``ml3 reproduce``'s meta-trainings (ml3cli.launchers): local processes, or a Ray cluster
(here a local one of 2 workers). A run made on Ray must land where the local one would, with the same φ."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import TINY_RECIPE, run_main, write_recipe
from safetensors.numpy import load_file

from ml3cli.artifacts import read_info
from ml3cli.errors import ML3Error
from ml3cli.launchers import LocalLauncher, RayLauncher, Run, launcher_for

COMPANIONS = (".safetensors", ".curves.csv", ".curves.png", ".checkpoint.safetensors", ".log")


def tiny_runs(tmp_path, folder: str) -> list[Run]:
    recipe = write_recipe(tmp_path / "tiny.yaml", {**TINY_RECIPE, "outer": {**TINY_RECIPE["outer"], "steps": 6}})
    return [
        Run(
            ("meta-train", str(recipe), "--seed", str(seed), "--quiet"),
            tmp_path / folder / f"tiny-seed{seed}.safetensors",
        )
        for seed in (0, 1)
    ]


def test_runs_on_a_two_worker_ray_cluster_land_where_local_runs_do_with_the_same_phi(tmp_path):
    """Each run's artifact, curves, checkpoint and log come back to the paths it names, φ bit-identical to the
    local run's; a failed run is reported with its output and leaves no artifact."""
    pytest.importorskip("ray")
    local, remote = tiny_runs(tmp_path, "local"), tiny_runs(tmp_path, "ray")
    broken = Run(("meta-train", str(tmp_path / "missing.yaml"), "--quiet"), tmp_path / "x" / "a.safetensors")
    seen = []
    done_here = LocalLauncher(jobs=2).run_all(local, seen.append)
    done_there = RayLauncher(jobs=2).run_all([*remote, broken], seen.append)
    assert [f.code for f in done_here + done_there] == [0, 0, 0, 0, 2] and len(seen) == 5
    assert [f.run for f in done_there] == [*remote, broken]  # in the order given, whatever order they finished in
    for here, there in zip(local, remote, strict=True):
        for suffix in COMPANIONS:
            assert there.artifact.with_name(there.artifact.stem + suffix).is_file(), suffix
        phi_here, phi_there = load_file(here.artifact), load_file(there.artifact)
        assert phi_here.keys() == phi_there.keys()
        assert all((phi_here[k] == phi_there[k]).all() for k in phi_here)
        assert read_info(here.artifact)["recipe"] == read_info(there.artifact)["recipe"]
    first, second = (load_file(run.artifact) for run in local)
    assert any((first[k] != second[k]).any() for k in first)  # the two seeds learned different losses
    assert "wrote" in remote[0].log.read_text()
    assert "missing.yaml" in broken.log.read_text() and not broken.artifact.exists()


def test_launcher_choices_are_checked_in_one_line(tmp_path, monkeypatch, capsys):
    assert isinstance(launcher_for("local", 3, None), LocalLauncher)
    assert launcher_for("ray", 2, "auto") == RayLauncher(2, "auto")
    with pytest.raises(ML3Error, match="--launcher 'slurm': expected local or ray"):
        launcher_for("slurm", 1, None)
    with pytest.raises(ML3Error, match="--address names a Ray cluster: add --launcher ray"):
        launcher_for("local", 1, "auto")
    result = run_main(monkeypatch, capsys, "reproduce", "sine_reference", "--launcher", "slurm", cwd=tmp_path)
    assert result.code == 2 and "expected local or ray" in result.stderr and not (tmp_path / "artifacts").exists()


def test_without_ray_installed_the_extra_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if it were not installed
    with pytest.raises(ML3Error, match=r"needs Ray: pip install 'ml3cli\[ray\]'"):
        RayLauncher().run_all(tiny_runs(tmp_path, "x"), lambda _: None)


@pytest.mark.slow
def test_reproduce_on_ray_writes_the_results_of_the_local_run(tmp_path):
    """`ml3 reproduce sine_reference --quick` with --launcher ray (a local cluster of 2) and with --jobs 2: the
    same comparisons, verdict and meta-training records but for wall times and where they ran."""

    def reproduce(*flags: str) -> dict:
        folder = tmp_path / flags[-1]
        folder.mkdir()
        command = [
            sys.executable,
            "-m",
            "ml3cli",
            "reproduce",
            "sine_reference",
            "--quick",
            "--out-dir",
            "out",
            *flags[:-1],
        ]
        subprocess.run(command, cwd=folder, check=True, capture_output=True)
        return json.loads((folder / "out" / "results.json").read_text())

    local = reproduce("--jobs", "2", "local")
    on_ray = reproduce("--launcher", "ray", "--jobs", "2", "ray")
    assert on_ray["launcher"] == "ray" and local["launcher"] == "local"
    strip = lambda records: [{k: v for k, v in r.items() if "seconds" not in k} for r in records]  # noqa: E731
    assert strip(on_ray["comparisons"]) == strip(local["comparisons"]) and on_ray["verdict"] == local["verdict"]
    assert strip(on_ray["meta_train"]) == strip(local["meta_train"])
