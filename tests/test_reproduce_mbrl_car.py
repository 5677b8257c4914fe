"""``ml3 reproduce mbrl`` and ``ml3 reproduce mountain_car``: the baseline hook of the fair comparison (one baseline
per meta-train seed), environment samples counted exactly, and a tiny end-to-end run of each experiment."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from rich.console import Console
from torch.func import grad, vmap

from ml3cli.commands.options import ReproduceOptions
from ml3cli.commands.reproduce import reproduce
from ml3cli.evaluate import evaluate
from ml3cli.experiments import REPRODUCIBLE, experiment
from ml3cli.experiments.protocol import VERDICTS, Baseline, Context, compare_losses, validate_results
from ml3cli.functional import vmap_batch_size
from ml3cli.losses import builtin_loss
from ml3cli.tasks import make_task

#: sine_reference shrunk to seconds (as tests/test_reproduce.py)
TINY_SINE = (
    "outer.steps=3",
    "task_options.hidden=[8]",
    "meta_test.task_options.hidden=[8]",
    "meta_test.steps=5",
    "meta_loss.hidden=[8]",
)


def test_both_experiments_are_declared_in_the_papers_order():
    names = list(REPRODUCIBLE)
    assert names.index("mnist_binary") < names.index("mbrl") < names.index("mountain_car")
    assert experiment("mbrl").recipes == ("mbrl_pointmass", "mbrl_reacher")
    assert experiment("mountain_car").recipes == ("mountain_car_shaped", "mountain_car")


def test_vmap_batch_size_sees_through_vmap_and_grad():
    seen = []

    def f(x):
        seen.append(vmap_batch_size(x))
        return (x**2).sum()

    x = torch.randn(5, 3)
    f(x)
    vmap(f)(x)
    vmap(grad(f))(x)
    vmap(vmap(f))(torch.randn(4, 5, 3))
    assert seen == [1, 5, 5, 20]


@pytest.mark.parametrize(
    "name,options,per_update,horizon",
    [
        # the car is stepped for the loss inputs, the task loss and the report metrics of every update
        ("mountain_car", {"loss_gradient": "dynamics"}, 3, 35),
        # the real system is rolled out for the update's data and for the measurement
        ("pointmass_goal", {"system": "real"}, 2, 30),
    ],
)
def test_tasks_count_every_environment_step(name, options, per_update, horizon):
    task = make_task(name, options)
    tasks, seeds, steps = 3, 2, 4
    evaluate(task, [builtin_loss(task, "final_distance", 0.1)], tasks, seeds, steps)
    # per update ``per_update`` rollouts, and the measurement after the last one
    assert task.environment_samples == seeds * tasks * (steps * per_update + per_update - 1) * horizon


@pytest.fixture
def tiny_sine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = dataclasses.replace(experiment("sine_reference"), quick=TINY_SINE, quick_eval={"tasks": 2, "seeds": 2})
    return exp, ReproduceOptions(quick=True, meta_seeds=2, jobs=2, out_dir=tmp_path / "out")


def test_a_baseline_per_meta_train_seed_is_tuned_tested_and_paired_per_seed(tiny_sine):
    """make(m) is called once per meta-train seed; with the built-in loss for every seed the per-seed numbers are
    the default baseline's, row by row, so the pairing is by (meta-train seed, test seed)."""
    exp, options = tiny_sine
    asked = []

    def run(context: Context) -> list[dict]:
        default = compare_losses(context, "sine_reference")

        def make(meta_seed):
            asked.append(meta_seed)
            test = context.recipe("sine_reference").meta_test
            task = make_task(test.task, test.task_options)
            return task, builtin_loss(task, "mse", 1.0).fn

        per_seed = compare_losses(context, "sine_reference", baseline=Baseline("mse, per seed", make, True))
        return [default, per_seed]

    document = reproduce(dataclasses.replace(exp, run=run), options, Console(quiet=True))
    validate_results(document, "results.json")
    default, per_seed = document["comparisons"]
    assert asked == [0, 1]
    assert per_seed["baseline"] == "mse, per seed"
    assert set(per_seed["lr"]["baseline_tuned"]) == {"0", "1"}
    for kind in ("fixed", "tuned"):
        rows = np.array(per_seed["final"][f"baseline_{kind}"])
        assert rows.shape == (2, 2)  # meta-train seeds × test seeds
        assert np.allclose(rows, np.array(default["final"][f"baseline_{kind}"])[None, :])
        assert per_seed["curves"][f"baseline@{kind}"] == pytest.approx(default["curves"][f"baseline@{kind}"])
        assert per_seed["curves"]["baseline1@" + kind] == pytest.approx(default["curves"][f"baseline@{kind}"])
    assert per_seed["same_lr"] == pytest.approx(default["same_lr"])
    assert per_seed["tuned"] == pytest.approx(default["tuned"])
    assert "environment_samples" not in default["extra"]  # a supervised task spends no environment samples
    assert document["environment_samples"] == {"meta_train": 0, "meta_test": 0}


def run_tiny(name: str, quick: dict[str, tuple[str, ...]], tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    exp = dataclasses.replace(experiment(name), quick=quick, quick_eval={"tasks": 2, "seeds": 2})
    options = ReproduceOptions(quick=True, meta_seeds=2, jobs=2, out_dir=tmp_path / "out")
    document = reproduce(exp, options, Console(quiet=True))
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    validate_results(written, "results.json")
    assert written["verdict"] in VERDICTS
    assert written["environment_samples"]["meta_train"] > 0 and written["environment_samples"]["meta_test"] > 0
    assert all(record["meta_test_environment_samples"] > 0 for record in written["meta_train"])
    return document


@pytest.mark.slow
def test_mountain_car_quick_run(tmp_path, monkeypatch):
    """About a minute: both recipes against the direct task loss, iLQR, the reach check, shaped − unshaped."""
    tiny = ("outer.steps=3", "meta_test.steps=3", "meta_test.seeds=2", "meta_loss.hidden=[8]")
    document = run_tiny(
        "mountain_car", dict.fromkeys(("mountain_car_shaped", "mountain_car"), tiny), tmp_path, monkeypatch
    )
    shaped, unshaped = document["comparisons"]
    assert shaped["baseline"] == unshaped["baseline"] == "direct task loss"
    assert isinstance(shaped["lr"]["baseline_tuned"], float)  # one direct task loss for every meta-train seed
    ilqr = shaped["extra"]["ilqr"]["iLQR + 1e-6·Σa²"]
    assert ilqr["reached"] == (ilqr["x_T"] >= 0.45) and ilqr["final_distance"] >= 0
    # every (meta-train seed, test seed, task) is checked
    assert shaped["extra"]["reach"]["learned@tuned"]["of"] == 2 * shaped["test_seeds"] * shaped["tasks"]
    assert shaped["extra"]["shaped_vs_unshaped"]["tuned"]["pairs"] == 4
    assert "shaped_vs_unshaped" not in unshaped.get("extra", {})
    # the claim is the shaped loss's; the unshaped one is shown beside it, outside the verdict
    assert (shaped["control"], unshaped["control"]) == (False, True)
    for figure in ("figure.png", "final_distance.png", "trajectories.png"):
        assert (tmp_path / "out" / figure).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_mbrl_quick_run(tmp_path, monkeypatch):
    """A few minutes: each learned loss against the task loss through the P of its own meta-train seed."""
    model = ("task_options.random_rollouts=8", "task_options.fit_steps=50", "task_options.model_hidden=[16]")
    tiny = ("outer.steps=2", "meta_test.steps=2", "meta_test.tasks=2", "meta_test.seeds=1", "meta_loss.hidden=[8]")
    quick = {"mbrl_pointmass": (*model, *tiny), "mbrl_reacher": (*model, *tiny)}
    document = run_tiny("mbrl", quick, tmp_path, monkeypatch)
    for comparison in document["comparisons"]:
        assert comparison["baseline"] == "task loss through P"
        assert set(comparison["lr"]["baseline_tuned"]) == {"0", "1"}  # one P, so one baseline, per seed
        assert np.array(comparison["final"]["baseline_tuned"]).shape == (2, 2)
        region = comparison["extra"]["final_by_region"]
        assert region["goals"] == 4 and 0 <= region["goals_inside"] <= 4
        assert comparison["extra"]["environment_samples"]["test"] > 0
        for figure in (f"final_distance_{comparison['recipe']}.png", f"trajectories_{comparison['recipe']}.png"):
            assert (tmp_path / "out" / figure).read_bytes()[:4] == b"\x89PNG"
