"""End to end through the real ``ml3`` entry point (``python -m ml3cli.cli`` in a subprocess): meta-train a tiny
recipe, then meta-test, compare, inspect and list tasks, checking exit codes, files and the JSON they write.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import TINY_RECIPE, run_cli, run_main, write_recipe

from ml3cli.artifacts import load_loss, read_info
from ml3cli.tasks import TASKS

STEPS = TINY_RECIPE["meta_test"]["steps"]
SEEDS = TINY_RECIPE["meta_test"]["seeds"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, object]:
    """`ml3 meta-train tiny.yaml --out x.safetensors --quiet` once for the module: (folder, artifact, result)."""
    folder = tmp_path_factory.mktemp("cli")
    recipe = write_recipe(folder / "tiny.yaml", TINY_RECIPE)
    out = folder / "x.safetensors"
    result = run_cli("meta-train", recipe, "--out", out, "--quiet", cwd=folder)
    return folder, out, result


def test_meta_train_writes_artifact_and_curves(trained):
    """meta-train exits 0 and writes the artifact with its meta-train curves (CSV and PNG) beside it; the
    artifact records task, seed, recipe and meta-test metrics for both the learned loss and the baseline."""
    folder, out, result = trained
    assert result.code == 0, result.output
    assert "Traceback" not in result.output
    assert out.is_file()
    assert (folder / "x.curves.csv").is_file() and (folder / "x.curves.png").is_file()
    assert (folder / "x.curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (folder / "artifacts").exists() and not (folder / "runs").exists()
    # no temp files left behind by the atomic writes
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]

    with (folder / "x.curves.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 10, 20, 30]
    assert all(math.isfinite(float(r["meta/task_loss"])) for r in rows)

    info = read_info(out)
    assert info["task"] == "sine" and info["test_task"] == "sine_shifted" and info["seed"] == 0
    from ml3cli.commands.meta_train import source_commit

    assert info["commit"] == source_commit()  # provenance: the git commit of the code that meta-trained it
    assert info["recipe"]["outer"]["steps"] == TINY_RECIPE["outer"]["steps"]
    final = info["metrics"]["meta_test"]["final"]
    assert set(final) == {"learned", "mse"} and all(math.isfinite(v) for v in final.values())
    assert len(info["metrics"]["meta_test"]["final_per_seed"]["learned"]) == SEEDS
    assert info["architecture"]["hidden"] == TINY_RECIPE["meta_loss"]["hidden"]
    assert "learned" in result.stdout and "mse" in result.stdout


def check_results(document: dict, names: list[str], steps: int, seeds: int) -> None:
    """The results JSON: one entry per loss with per-seed values at every recorded step and their mean."""
    assert document["task"] == "sine_shifted" and document["metric"] == "mse"
    assert document["steps"] == steps
    assert document["recorded_steps"] == list(range(steps + 1))
    assert len(document["seeds"]) == seeds
    assert [loss["name"] for loss in document["losses"]] == names
    for loss in document["losses"]:
        assert len(loss["per_seed"]) == seeds
        for row in loss["per_seed"]:
            assert len(row) == steps + 1 and all(math.isfinite(v) for v in row)
        assert len(loss["mean"]) == steps + 1
        for step in range(steps + 1):
            expected = sum(row[step] for row in loss["per_seed"]) / seeds
            assert loss["mean"][step] == pytest.approx(expected, rel=1e-9)
    # paired design: every loss starts from the same θ₀ on the same tasks
    starts = [loss["per_seed"] for loss in document["losses"]]
    for per_seed in starts[1:]:
        assert [row[0] for row in per_seed] == [row[0] for row in starts[0]]
    assert len(document["paired"]) == len(names) - 1


def check_out_dir(out_dir: Path, document: dict) -> None:
    assert json.loads((out_dir / "results.json").read_text()) == document
    assert (out_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    with (out_dir / "curves.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    losses = document["losses"]
    assert len(rows) == len(losses) * len(document["seeds"]) * (document["steps"] + 1)
    assert {r["loss"] for r in rows} == {loss["name"] for loss in losses}


def test_meta_test(trained, tmp_path):
    """meta-test trains fresh optimizees with the learned loss and the baseline (settings defaulting to the
    artifact's recorded meta-test) and writes results.json, curves.csv, curves.png and the --json copy."""
    _, out, _ = trained
    json_path = tmp_path / "mt.json"
    out_dir = tmp_path / "mt"
    result = run_cli(
        "meta-test", "--loss", out, "--task", "sine_shifted", "--json", json_path, "--out-dir", out_dir,
        "--quiet", cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    document = json.loads(json_path.read_text())
    check_results(document, ["x", "mse"], STEPS, SEEDS)
    check_out_dir(out_dir, document)
    learned, mse = document["losses"]
    assert learned["source"] == str(out) and mse["source"] == "builtin"
    assert learned["lr"] == mse["lr"] == TINY_RECIPE["meta_test"]["lr"]
    # the recorded meta-test at meta-train time used the same seeds and settings: same numbers
    recorded = read_info(out)["metrics"]["meta_test"]["final_per_seed"]
    assert [row[-1] for row in learned["per_seed"]] == pytest.approx(recorded["learned"], rel=1e-5)
    assert [row[-1] for row in mse["per_seed"]] == pytest.approx(recorded["mse"], rel=1e-5)
    assert not (tmp_path / "runs").exists()


def test_compare(trained, tmp_path):
    """compare takes any number of losses: an artifact, mse at the default lr and mse@0.01 at its own lr."""
    _, out, _ = trained
    json_path = tmp_path / "cmp.json"
    out_dir = tmp_path / "cmp"
    result = run_cli(
        "compare", "--task", "sine_shifted", "--loss", out, "--loss", "mse", "--loss", "mse@0.01",
        "--steps", "5", "--seeds", "0-1", "--tasks", "2", "--json", json_path, "--out-dir", out_dir, "--quiet",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    document = json.loads(json_path.read_text())
    check_results(document, ["x", "mse", "mse@0.01"], 5, 2)
    check_out_dir(out_dir, document)
    assert document["tasks"] == 2
    lrs = {loss["name"]: loss["lr"] for loss in document["losses"]}
    assert lrs["mse@0.01"] == 0.01
    assert lrs["mse"] == TINY_RECIPE["meta_test"]["lr"]  # the artifact's recorded meta-test lr
    assert "x" in result.stdout and "mse@0.01" in result.stdout


def test_inspect(trained, tmp_path):
    """inspect prints the task, the loss inputs, the architecture and the recipe."""
    _, out, _ = trained
    result = run_cli("inspect", out, cwd=tmp_path)
    assert result.code == 0, result.output
    text = result.stdout
    assert "task: sine" in text and "sine_shifted" in text
    assert "y_pred[1], y_true[1]" in text
    assert "MLP [8, 8] relu" in text and "output softplus" in text
    n_params = sum(p.numel() for p in load_loss(out).parameters())
    assert f"{n_params} parameters" in text
    assert "recipe:" in text and "meta_loss:" in text and "outer:" in text and "steps: 30" in text


def test_inspect_json(trained, tmp_path):
    """inspect --json prints the metadata document as JSON (the same one read_info returns)."""
    _, out, _ = trained
    result = run_cli("inspect", out, "--json", cwd=tmp_path)
    assert result.code == 0, result.output
    document = json.loads(result.stdout)
    expected = {k: v for k, v in read_info(out).items() if not k.startswith("_")}
    assert document == expected
    assert document["architecture"]["inputs"][0]["name"] == "y_pred"


def test_tasks_lists_every_task(tmp_path):
    """`ml3 tasks` lists every registered task family with its loss inputs."""
    result = run_cli("tasks", cwd=tmp_path)
    assert result.code == 0, result.output
    for name in TASKS:
        # rich may shorten long names in narrow columns; the first characters always show
        assert name[:8] in result.stdout
    assert "y_pred[1]" in result.stdout


def test_divergence_exits_2_with_the_outer_step(tmp_path, monkeypatch, capsys):
    """A diverging meta-train run is a user error: exit 2, one line naming the outer step; no artifact."""
    recipe = write_recipe(tmp_path / "r.yaml", TINY_RECIPE)
    out = tmp_path / "d.safetensors"
    result = run_main(
        monkeypatch, capsys, "meta-train", recipe, "--out", out, "--quiet", "--set", "inner.lr=1e20", cwd=tmp_path
    )
    assert result.code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert "diverged at outer step 1" in result.stderr
    assert not out.exists()


def test_bad_artifact_path_exits_2(trained, tmp_path, monkeypatch, capsys):
    """`--out` must end in .safetensors; a --loss that is neither a builtin nor a file is explained."""
    folder, out, _ = trained
    recipe = folder / "tiny.yaml"
    result = run_main(monkeypatch, capsys, "meta-train", recipe, "--out", tmp_path / "x.pt", cwd=tmp_path)
    assert result.code == 2 and ".safetensors" in result.stderr
    result = run_main(
        monkeypatch, capsys, "compare", "--task", "sine_shifted", "--loss", "nonsense", "--out-dir", tmp_path / "o",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 2 and "neither a built-in loss" in result.stderr
    result = run_main(
        monkeypatch, capsys, "compare", "--task", "sine_shifted", "--loss", "mse@fast", "--out-dir", tmp_path / "o",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 2 and "learning rate" in result.stderr
    result = run_main(
        monkeypatch, capsys, "meta-test", "--loss", out, "--task", "nope", "--out-dir", tmp_path / "o", cwd=tmp_path
    )
    assert result.code == 2 and "unknown task 'nope'" in result.stderr
    assert not (tmp_path / "o").exists()


def test_artifact_saved_by_the_library_without_a_recipe_is_usable(tmp_path, monkeypatch, capsys):
    """An artifact written with ml3cli.save_loss and minimal info (just the task) can be meta-tested and
    inspected (the CLI needs no recipe when the settings come from flags)."""
    from ml3cli import MetaLoss, save_loss
    from ml3cli.tasks.sine import SineRegression

    path = save_loss(tmp_path / "mine.safetensors", MetaLoss(SineRegression.loss_inputs_spec, (8, 8)), {"task": "sine"})
    result = run_main(
        monkeypatch, capsys, "compare", "--task", "sine_shifted", "--loss", path, "--loss", "mse", "--steps", "2",
        "--num-seeds", "1", "--tasks", "2", "--lr", "0.01", "--out-dir", tmp_path / "o", "--quiet", cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    result = run_main(monkeypatch, capsys, "inspect", path, cwd=tmp_path)
    assert result.code == 0, result.output
    assert "sine" in result.stdout


def test_loaded_artifact_reproduces_the_recorded_learned_loss(trained):
    """The artifact's φ, loaded back and meta-tested as meta-train did (its recorded test task, options, tasks,
    seeds, steps and rate), gives the final metric the artifact records per seed; and it is a working loss,
    finite and differentiable w.r.t. predictions."""
    from ml3cli.evaluate import NamedLoss, evaluate
    from ml3cli.recipes import recipe_from_dict
    from ml3cli.tasks import make_task

    _, out, _ = trained
    info = read_info(out)
    recipe, recorded = recipe_from_dict(info["recipe"]), info["metrics"]["meta_test"]
    test = recipe.meta_test
    task = make_task(test.task, test.task_options)
    loss_fn = load_loss(out)
    learned = NamedLoss("learned", loss_fn.as_loss_fn(), recipe.meta_test_lr)
    (curves,) = evaluate(task, [learned], test.tasks, test.seeds, test.steps, recipe.seed)
    assert (recorded["task"], recorded["steps"], recorded["tasks"], recorded["seeds"]) == (
        "sine_shifted", STEPS, TINY_RECIPE["meta_test"]["tasks"], SEEDS,
    )  # fmt: skip
    # the same φ, tasks, θ₀ and single-threaded float32 arithmetic as at meta-train: equal to rounding
    assert list(curves.at(test.steps)) == pytest.approx(recorded["final_per_seed"]["learned"], rel=1e-6, abs=0)
    assert float(curves.at(test.steps).mean()) == pytest.approx(recorded["final"]["learned"], rel=1e-6, abs=0)
    y_pred = torch.zeros(10, 1, requires_grad=True)
    loss = loss_fn(y_pred, torch.ones(10, 1))
    loss.backward()
    assert torch.isfinite(loss) and y_pred.grad is not None and y_pred.grad.abs().sum() > 0


def test_compare_at_chooses_the_table_steps(tmp_path, monkeypatch, capsys):
    args = [
        "compare",
        "--task",
        "sine_shifted",
        "--loss",
        "mse",
        "--tasks",
        "2",
        "--num-seeds",
        "2",
        "--steps",
        "30",
        "-q",
    ]
    shown = run_main(monkeypatch, capsys, *args, "--at", "5,20", cwd=tmp_path)
    assert shown.code == 0, shown.output
    assert "step 5" in shown.output and "step 20" in shown.output and "step 10" not in shown.output
    beyond = run_main(monkeypatch, capsys, *args, "--at", "5,40", cwd=tmp_path)
    assert beyond.code == 2 and "--at 40: beyond the 30 steps" in beyond.output
    bad = run_main(monkeypatch, capsys, *args, "--at", "five", cwd=tmp_path)
    assert bad.code == 2 and "--at 'five'" in bad.output


def test_meta_test_of_a_builtin_loss_is_its_own_baseline(tmp_path, monkeypatch, capsys):
    """`ml3 meta-test --loss mse --task sine`: the built-in is tested once, not refused as a duplicate label."""
    out = tmp_path / "mt"
    args = ("meta-test", "--loss", "mse", "--task", "sine", "--tasks", "2", "--num-seeds", "2", "--steps", "3")
    result = run_main(monkeypatch, capsys, *args, "--out-dir", out, "-q", cwd=tmp_path)
    assert result.code == 0, result.output
    assert [loss["name"] for loss in json.loads((out / "results.json").read_text())["losses"]] == ["mse"]


def test_the_command_line_starts_without_torch():
    """`ml3 --help` must answer at once: the CLI module and the option groups import no torch, numpy or task."""
    import subprocess
    import sys

    code = (
        "import sys, ml3cli.cli; print(sorted(m for m in ('torch', 'numpy', 'ml3cli.tasks.sine') if m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


# -- shipped losses and packaged recipes, by name ---------------------------------------------------------------
def test_meta_test_takes_a_shipped_loss_by_name(tmp_path, monkeypatch, capsys):
    """`ml3 meta-test --loss sine --task sine_shifted`: the shipped loss, with the test settings it recorded."""
    from ml3cli import shipped

    out = tmp_path / "mt"
    args = ("meta-test", "--loss", "sine", "--task", "sine_shifted", "--tasks", "2", "--num-seeds", "1", "--steps", "3")
    result = run_main(monkeypatch, capsys, *args, "--out-dir", out, "-q", cwd=tmp_path)
    assert result.code == 0, result.output
    learned, mse = json.loads((out / "results.json").read_text())["losses"]
    assert (learned["name"], learned["source"], mse["name"]) == ("sine", "shipped:sine", "mse")
    assert learned["lr"] == mse["lr"] == shipped.read_index()["sine"]["headline"]["lr"]


def test_meta_test_runs_the_baseline_at_the_lr_of_the_recorded_meta_test(tmp_path, monkeypatch, capsys):
    """A recipe without meta_test.lr meta-tests both losses at inner.lr (as the RL recipes do): `ml3 meta-test`
    of its artifact does the same, not the baseline at the fallback lr 1e-3."""
    data = {**TINY_RECIPE, "inner": {"lr": 0.01, "steps": 1}, "outer": {"lr": 1e-3, "steps": 2, "tasks": 2}}
    data["meta_test"] = {k: v for k, v in TINY_RECIPE["meta_test"].items() if k != "lr"}
    recipe, artifact, out = write_recipe(tmp_path / "r.yaml", data), tmp_path / "a.safetensors", tmp_path / "mt"
    assert run_main(monkeypatch, capsys, "meta-train", recipe, "--out", artifact, "-q", cwd=tmp_path).code == 0
    args = (
        "meta-test",
        "--loss",
        artifact,
        "--task",
        "sine_shifted",
        "--tasks",
        "1",
        "--num-seeds",
        "1",
        "--steps",
        "2",
    )
    result = run_main(monkeypatch, capsys, *args, "--out-dir", out, "-q", cwd=tmp_path)
    assert result.code == 0, result.output
    assert [loss["lr"] for loss in json.loads((out / "results.json").read_text())["losses"]] == [0.01, 0.01]


def test_a_file_or_a_builtin_wins_over_a_shipped_name(tmp_path, monkeypatch, capsys, trained):
    """`--loss sine` with a file ./sine is the file; `--loss mse` is the built-in, whatever is shipped."""
    from ml3cli.losses import LossSpec

    _, out, _ = trained
    monkeypatch.chdir(tmp_path)
    assert LossSpec("sine").artifact_path("sine_shifted").name == "sine.safetensors"  # the shipped one
    (tmp_path / "sine").write_bytes(out.read_bytes())
    assert LossSpec("sine").artifact_path("sine_shifted") == Path("sine")
    assert LossSpec("mse").artifact_path("sine_shifted") is None
    assert load_loss("sine").info["recipe"]["name"] == "tiny"


def test_load_loss_takes_a_shipped_name(tmp_path, monkeypatch):
    """`load_loss("sine")` in Python: the shipped loss, a working nn.Module at its meta-trained lr."""
    import ml3cli

    monkeypatch.chdir(tmp_path)
    loss_fn = ml3cli.load_loss("sine", expect_inputs=("y_pred", "y_true"))
    assert loss_fn.info["task"] == "sine" and loss_fn.meta_trained_lr == 1e-3
    y_pred = torch.zeros(5, 1, requires_grad=True)
    loss_fn(y_pred, torch.ones(5, 1)).backward()
    assert y_pred.grad.abs().sum() > 0
    assert ml3cli.read_info("sine")["test_task"] == "sine_shifted"
    with pytest.raises(ml3cli.ML3Error, match=r"not a shipped loss: .*sine"):
        ml3cli.load_loss("sinus")


def test_inspect_takes_a_shipped_name_without_torch(tmp_path):
    """`ml3 inspect sine`: the shipped loss, its checksum verified, read without importing torch (the index of shipped
    losses is torch-free)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom ml3cli.cli import main\nsys.argv = ['ml3', 'inspect', 'sine']\ncode = 0\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code or 0\nprint('exit', code, 'torch' in sys.modules)"
    )
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.stdout.strip().splitlines()[-1] == "exit 0 False", proc.stdout[-300:] + proc.stderr
    assert "task: sine" in proc.stdout and "checksum: verified" in proc.stdout


def test_a_missing_artifact_says_what_to_do(tmp_path, monkeypatch, capsys):
    """On a fresh clone `artifacts/sine.safetensors` does not exist yet: one line naming both ways out."""
    args = ("meta-test", "--loss", "artifacts/sine.safetensors", "--task", "sine_shifted", "--out-dir", tmp_path / "o")
    result = run_main(monkeypatch, capsys, *args, cwd=tmp_path)
    assert result.code == 2 and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert "ml3 meta-train recipes/sine.yaml" in result.stderr and "--loss sine" in result.stderr
    assert not (tmp_path / "o").exists()


def test_meta_train_finds_a_packaged_recipe_by_name(tmp_path, monkeypatch, capsys):
    """`ml3 meta-train sine_reference` from a folder without recipes; an unknown name gets the closest one."""
    out = tmp_path / "a.safetensors"
    tiny = ["--set", "outer.steps=2", "--set", "meta_test.tasks=1", "--set", "meta_test.seeds=1"]
    result = run_main(monkeypatch, capsys, "meta-train", "sine_reference", *tiny, "--out", out, "-q", cwd=tmp_path)
    assert result.code == 0, result.output
    assert read_info(out)["recipe"]["name"] == "sine_reference"
    assert read_info(out)["recipe"]["meta_loss"]["hidden"] == [50, 50]
    result = run_main(monkeypatch, capsys, "meta-train", "sine_refrence", "--out", out, cwd=tmp_path)
    assert result.code == 2 and "did you mean 'sine_reference'?" in result.stderr
    assert "`ml3 recipes`" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_landscape_without_options_plots_the_newest_artifact(tmp_path, monkeypatch, capsys, trained):
    """`ml3 landscape` alone: the newest artifact in artifacts/ against its task's hand-written loss (the function
    view: the sine optimizee has many parameters); with no artifact, the shipped sine loss."""
    import os

    _, out, _ = trained
    (tmp_path / "artifacts").mkdir()
    older, newer = tmp_path / "artifacts" / "older.safetensors", tmp_path / "artifacts" / "newer.safetensors"
    for path, when in ((newer, 2_000_000_000), (older, 1_000_000_000)):
        path.write_bytes(out.read_bytes())
        os.utime(path, (when, when))
    (tmp_path / "artifacts" / "newer.checkpoint.safetensors").write_bytes(b"not an artifact")  # never a candidate
    result = run_main(monkeypatch, capsys, "landscape", "--points", "5", cwd=tmp_path)
    assert result.code == 0, result.output
    assert "no --loss given: plotting artifacts/newer.safetensors" in result.stdout
    assert "against mse on sine_shifted" in result.stdout
    (written,) = (tmp_path / "runs" / "landscape" / "sine_shifted").glob("*/landscape.json")  # a new folder per run
    summary = json.loads(written.read_text())
    assert list(summary["losses"]) == ["newer", "mse"]

    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_main(monkeypatch, capsys, "landscape", "--points", "5", cwd=empty)
    assert result.code == 0, result.output
    assert "plotting sine, the shipped loss (no artifact in artifacts/)" in result.stdout
    (written,) = (empty / "runs" / "landscape" / "sine_shifted").glob("*/landscape.json")
    summary = json.loads(written.read_text())
    assert summary["losses"]["sine"]["source"] == "shipped:sine"
