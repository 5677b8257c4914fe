"""The step-size ratio: how much larger a learned loss's steps are than the baseline's at the same rate, so that a
win at one shared learning rate can be told apart from a learned step size."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import TINY_RECIPE, run_main, write_recipe

from ml3cli.engine.inner_optimizers import Momentum
from ml3cli.evaluate import NamedLoss, draw_tasks, step_size_ratio
from ml3cli.losses import builtin_loss
from ml3cli.tasks import make_task
from ml3cli.tasks.sine import ShiftedSineOptions, ShiftedSineRegression

OPTIONS = TINY_RECIPE["meta_test"]["task_options"]


@pytest.mark.parametrize("factor", [0.25, 3.0])
def test_a_multiple_of_the_baseline_has_that_ratio_everywhere(factor):
    task = make_task("sine_shifted", OPTIONS)
    mse = builtin_loss(task, "mse", 0.01)
    scaled = NamedLoss("scaled", lambda inputs: factor * mse.fn(inputs), 0.01)
    ratio = step_size_ratio(task, scaled, mse, tasks=3, seeds=2, steps=4)
    assert ratio.points == 3 * 2 * 4
    assert ratio.mean == pytest.approx(factor, rel=1e-5) and ratio.low == pytest.approx(factor, rel=1e-5)


def test_a_learned_step_scale_multiplies_the_ratio():
    """A learned_lr loss steps α·scale·∇ℓ: the ratio is of the steps, so the scale is in it."""
    task = make_task("sine_shifted", OPTIONS)
    mse = builtin_loss(task, "mse", 0.01)
    scaled = NamedLoss("scaled", lambda inputs: (mse.fn(inputs), torch.tensor(1.5)), 0.01)
    assert step_size_ratio(task, scaled, mse, tasks=2, seeds=1, steps=3).mean == pytest.approx(1.5, rel=1e-6)


def test_the_ratio_follows_the_learned_loss_own_trajectory():
    """Measured where the learned loss trains θ (at its own rate): a loss that is MSE near θ₀ but steeper once θ
    has moved shows a ratio that grows with the steps."""
    task = make_task("sine_shifted", OPTIONS)
    mse = builtin_loss(task, "mse", 0.05)
    early = step_size_ratio(task, mse, mse, tasks=2, seeds=1, steps=1).mean
    assert early == pytest.approx(1.0)
    theta_moves = NamedLoss("sq", lambda inputs: mse.fn(inputs) ** 2, 0.05)
    one, many = (step_size_ratio(task, theta_moves, mse, 2, 1, n) for n in (1, 30))
    assert one.points == 2 and many.points == 60 and one.mean != pytest.approx(many.mean)


def test_meta_train_records_it_and_inspect_and_compare_report_it(tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", TINY_RECIPE)
    assert run_main(monkeypatch, capsys, "meta-train", recipe, "--out", "a.safetensors", cwd=tmp_path).code == 0
    from ml3cli.artifacts import read_info

    recorded = read_info(tmp_path / "a.safetensors")["metrics"]["meta_test"]["step_size_ratio"]
    assert recorded["points"] > 0 and recorded["seed"] == 0 and recorded["low"] <= recorded["mean"]
    shown = run_main(monkeypatch, capsys, "inspect", "a.safetensors", cwd=tmp_path)
    assert "its steps along the meta-test:" in shown.stdout and "× mse's at the same rate" in shown.stdout
    result = run_main(
        monkeypatch, capsys, "compare", "--loss", "a.safetensors", "--loss", "mse", "--task", "sine_shifted",
        "--num-seeds", "1", "--tasks", "2", "--steps", "3", "--out-dir", "cmp", cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    document = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert set(document["step_size_ratio"]) == {"a"} and document["step_size_ratio"]["a"]["baseline"] == "mse"


def test_tune_inner_lr_meta_trains_and_meta_tests_at_the_baselines_validation_rate(tmp_path, monkeypatch, capsys):
    """--tune-inner-lr: the baseline's rate chosen on validation tasks of the meta-test family (tune_lr, the same
    search as compare --tune-baseline-lr) becomes inner.lr and meta_test.lr, recorded in the artifact; with --seeds
    every seed's process gets that number, not a search of its own."""
    from ml3cli.artifacts import read_info
    from ml3cli.evaluate import tune_lr
    from ml3cli.recipes import recipe_from_dict

    data = {**TINY_RECIPE, "outer": {**TINY_RECIPE["outer"], "steps": 3}}
    recipe_path = write_recipe(tmp_path / "r.yaml", data)
    recipe = recipe_from_dict(data)
    test = recipe.meta_test
    task = make_task(test.task, test.task_options)
    expected, _ = tune_lr(
        task, builtin_loss(task, "mse", recipe.inner.lr), recipe.inner.lr, test.tasks, test.seeds, test.steps
    )
    assert expected != recipe.inner.lr  # the test would not tell the tuned rate from the recipe's

    result = run_main(
        monkeypatch, capsys, "meta-train", recipe_path, "--tune-inner-lr", "-q", "--out", "a.safetensors", cwd=tmp_path
    )
    assert result.code == 0, result.output
    assert f"tuned inner lr: mse ends lowest at {expected:.4g}" in " ".join(result.stdout.split())
    recorded = read_info(tmp_path / "a.safetensors")["recipe"]
    assert recorded["inner"]["lr"] == expected and recorded["meta_test"]["lr"] == expected

    sweep = run_main(
        monkeypatch,
        capsys,
        "meta-train",
        recipe_path,
        "--tune-inner-lr",
        "--seeds",
        "0-1",
        "--out",
        "s.safetensors",
        cwd=tmp_path,
    )
    assert sweep.code == 0, sweep.output
    assert sweep.stdout.count("tuned inner lr") == 1  # once, here; the seeds' processes get the number
    for seed in (0, 1):
        assert read_info(tmp_path / f"s-seed{seed}.safetensors")["recipe"]["inner"]["lr"] == expected


# -- the statistics against ratios worked out by hand -----------------------------------------------------------
def target_scaled_mse(task, lr: float) -> NamedLoss:
    """MSE times the mean |y| of the task's targets: its gradient is that many times MSE's at every θ, so the
    ratio of each task is a number read off its data, whatever the trajectory."""
    mse = builtin_loss(task, "mse", lr)
    return NamedLoss("scaled", lambda inputs: mse.fn(inputs) * inputs["y_true"].abs().mean(), lr)


def mean_abs_targets(task, tasks: int, seed: int) -> list[float]:
    _, batch, _ = draw_tasks(task, tasks, "test", seed)
    return batch.y_support.abs().mean(dim=(1, 2)).tolist()


def test_the_ratio_statistics_by_hand_on_the_seeds_asked_for():
    """Seeds 3 and 4 (``seed=3, seeds=2``), two tasks each, one step: four ratios r₀ ≤ … ≤ r₃, each the task's
    mean |y|; the percentiles interpolate linearly (10th at position 0.3, median 1.5, 90th at 2.7)."""
    task = make_task("sine_shifted", OPTIONS)
    ratio = step_size_ratio(task, target_scaled_mse(task, 0.01), builtin_loss(task, "mse", 0.01), 2, 2, 1, seed=3)
    r = sorted(mean_abs_targets(task, 2, 3) + mean_abs_targets(task, 2, 4))
    assert ratio.points == 4 and ratio.mean == pytest.approx(sum(r) / 4, rel=1e-5)
    assert ratio.median == pytest.approx((r[1] + r[2]) / 2, rel=1e-5)
    assert ratio.low == pytest.approx(r[0] + 0.3 * (r[1] - r[0]), rel=1e-5)
    assert ratio.high == pytest.approx(r[2] + 0.7 * (r[3] - r[2]), rel=1e-5)


def test_no_steps_measure_nothing():
    task = make_task("sine_shifted", OPTIONS)
    mse = builtin_loss(task, "mse", 0.01)
    ratio = step_size_ratio(task, mse, mse, tasks=2, seeds=1, steps=0)
    assert ratio.points == 0
    assert all(math.isnan(value) for value in (ratio.mean, ratio.median, ratio.low, ratio.high))


def test_with_momentum_the_ratio_is_still_of_the_gradients():
    task = make_task("sine_shifted", OPTIONS)
    mse = builtin_loss(task, "mse", 0.01)
    scaled = NamedLoss("scaled", lambda inputs: 3.0 * mse.fn(inputs), 0.01)
    ratio = step_size_ratio(task, scaled, mse, tasks=2, seeds=1, steps=3, optimizer=Momentum())
    assert (
        ratio.points == 6 and ratio.low == pytest.approx(3.0, rel=1e-5) and ratio.high == pytest.approx(3.0, rel=1e-5)
    )


class CollectingSine(ShiftedSineRegression):
    """Shifted sines as a task that collects data: each collection, made with the current θ, doubles the targets."""

    collects_data = True

    def __init__(self, options):
        super().__init__(options)
        self.collections = []

    def collect(self, theta, batch, generator, purpose):
        self.collections.append((theta, generator, purpose))
        return batch._replace(y_support=2 * batch.y_support)


def test_a_task_that_collects_data_is_measured_on_the_data_collected_with_the_current_theta():
    task = CollectingSine(ShiftedSineOptions(**OPTIONS))
    ratio = step_size_ratio(task, target_scaled_mse(task, 0.01), builtin_loss(task, "mse", 0.01), 2, 1, 2)
    doubled = [2 * r for r in mean_abs_targets(task, 2, 0)]
    assert ratio.points == 4 and ratio.mean == pytest.approx(sum(doubled) / 2, rel=1e-5)
    assert [purpose for _, _, purpose in task.collections] == ["inner", "inner"]
    assert all(isinstance(generator, torch.Generator) for _, generator, _ in task.collections)
    theta0 = draw_tasks(task, 2, "test", 0)[2]
    first, second = (theta for theta, _, _ in task.collections)
    assert all(torch.equal(first[name], theta0[name]) for name in theta0)
    assert not all(torch.equal(second[name], theta0[name]) for name in theta0)
