"""`ml3 landscape` and its pieces: 1-D sweeps, filter-normalised planes, the function view, the slope figure."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from helpers import TINY_RECIPE, run_main

from ml3cli import artifacts
from ml3cli.errors import ML3Error
from ml3cli.evaluate import NamedLoss
from ml3cli.landscape import (
    _with_entry,
    filter_normalized_direction,
    landscape_1d,
    parse_param,
    plane_coordinates,
    slope_toward_target,
    slope_toward_target_2d,
    task_slice,
    theta_slice,
)
from ml3cli.runtime import generator
from ml3cli.tasks import make_task

FREQ_OPTIONS = {"points": 16, "query_points": 16}


@pytest.fixture(scope="module")
def sine_artifact(tmp_path_factory):
    """A tiny learned loss for the `sine` task family (a second or two)."""
    from rich.console import Console

    from ml3cli.commands.meta_train import run_meta_train
    from ml3cli.recipes import recipe_from_dict

    folder = tmp_path_factory.mktemp("sine")
    recipe = recipe_from_dict({**TINY_RECIPE, "outer": {**TINY_RECIPE["outer"], "steps": 5}})
    return run_meta_train(recipe, folder / "tiny.safetensors", Console(quiet=True), quiet=True)


@pytest.fixture(scope="module")
def freq_artifact(tmp_path_factory):
    """A tiny learned loss for `sine_frequency`."""
    from rich.console import Console

    from ml3cli.commands.meta_train import run_meta_train
    from ml3cli.recipes import recipe_from_dict

    folder = tmp_path_factory.mktemp("freq")
    data = {
        "name": "freq", "task": "sine_frequency", "task_options": FREQ_OPTIONS, "threads": 1,
        "meta_loss": {"hidden": [8, 8], "activation": "elu", "output": "linear"},
        "inner": {"lr": 1.0, "steps": 1, "reset_every": 2}, "outer": {"lr": 3e-3, "steps": 4, "tasks": 2},
        "task_loss": {"weight": 0.0, "extra": {"param_distance": 1.0}},
        "meta_test": {"task": "sine_frequency", "task_options": FREQ_OPTIONS, "tasks": 2, "seeds": 1, "steps": 2},
    }  # fmt: skip
    return run_meta_train(recipe_from_dict(data), folder / "freq.safetensors", Console(quiet=True), quiet=True)


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# -- the figure of merit --------------------------------------------------------------------------------------
def test_slope_fraction_is_one_on_a_convex_quadratic():
    values = np.linspace(-7, 7, 141)
    for target in (-3.3, 0.0, 2.05, 6.9):
        slopes = 2 * (values - target)  # d/dθ (θ − target)²
        assert slope_toward_target(values, slopes, target) == 1.0
    alphas = betas = np.linspace(-1, 1, 21)
    a, b = np.meshgrid(alphas, betas, indexing="ij")
    target = (0.3, -0.45)
    grid = (a - target[0]) ** 2 + 3 * (b - target[1]) ** 2
    assert slope_toward_target_2d(alphas, betas, grid, target) == 1.0


def test_slope_fraction_counts_wrong_and_flat_points():
    values = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    slopes = np.array([-1.0, 1.0, 0.0, 1.0, 0.0])  # toward, away, (target, left out), toward, flat
    assert slope_toward_target(values, slopes, 0.0) == pytest.approx(0.5)
    assert math.isnan(slope_toward_target(np.array([0.0]), np.array([1.0]), 0.0))


def test_slope_fraction_is_below_one_on_the_sine_mse_landscape():
    task = make_task("sine_frequency")
    mse = NamedLoss("mse", lambda inputs: task.builtin_losses["mse"](**inputs), 1.0)
    view = landscape_1d(task, [mse], n_tasks=3, seed=0, param=None, low=-7, high=7, points=141)
    fractions = view.slope_fractions()["mse"]
    assert all(f < 0.8 for f in fractions)
    # the MSE landscape is zero exactly at the target and its slope there is zero
    assert view.target_source == "θ*"


def test_sweep_values_and_slopes_match_direct_evaluation():
    task = make_task("sine_frequency", FREQ_OPTIONS)
    quad = NamedLoss("quad", lambda inputs: ((inputs["y_pred"] - inputs["y_true"]) ** 2).sum(), 1.0)
    view = landscape_1d(task, [quad], n_tasks=2, seed=3, param="omega", low=-2, high=2, points=5)
    batch = task.sample_tasks(2, generator(3))
    for k in range(2):
        one = task_slice(batch, k)
        for g, value in enumerate(view.values):
            theta = {"omega": torch.tensor([float(value)], requires_grad=True)}
            loss = quad.fn(task.loss_inputs(theta, one))
            (slope,) = torch.autograd.grad(loss, theta["omega"])
            assert view.losses["quad"][k, g] == pytest.approx(float(loss.detach()), rel=1e-5)
            assert view.slopes["quad"][k, g] == pytest.approx(float(slope), rel=1e-4, abs=1e-5)
        assert view.targets[k] == pytest.approx(float(one.frequency))


# -- θ helpers and the plane ----------------------------------------------------------------------------------
def test_parse_param_and_with_entry():
    theta = {"w": torch.zeros(2, 3), "b": torch.zeros(1)}
    assert parse_param("w:4", theta) == ("w", 4)
    assert parse_param("b", theta) == ("b", 0)
    assert parse_param(None, {"omega": torch.zeros(1)}) == ("omega", 0)
    for bad, message in [(None, "--param is needed"), ("v", "no parameter"), ("w", "NAME:INDEX"),
                         ("w:x", "integer"), ("w:6", "out of range")]:  # fmt: skip
        with pytest.raises(ML3Error, match=message):
            parse_param(bad, theta)
    changed = _with_entry(theta, "w", 4, torch.tensor(7.0))
    assert changed["w"][1, 1] == 7.0 and changed["w"].sum() == 7.0 and theta["w"].sum() == 0


def test_filter_normalised_directions():
    task = make_task("sine", {"hidden": [8, 8]})
    theta = theta_slice(task.init_theta(1, generator(0)), 0)
    d = filter_normalized_direction(theta, generator(1))
    for name, w in theta.items():
        if w.dim() <= 1:
            assert torch.count_nonzero(d[name]) == 0
        else:
            torch.testing.assert_close(d[name].norm(dim=1), w.norm(dim=1))
    d2 = filter_normalized_direction(theta, generator(2))
    point = {k: theta[k] + 0.25 * d[k] - 0.5 * d2[k] for k in theta}
    alpha, beta = plane_coordinates(theta, d, d2, point)
    assert (alpha, beta) == pytest.approx((0.25, -0.5), abs=1e-4)
    with pytest.raises(ML3Error, match="use --mode 1d"):
        filter_normalized_direction({"omega": torch.tensor([0.1])}, generator(0))


# -- the command ----------------------------------------------------------------------------------------------
def test_cli_1d_writes_png_and_csv_matching_the_loss(monkeypatch, capsys, tmp_path, freq_artifact):
    out = tmp_path / "ls"
    result = run_main(
        monkeypatch, capsys, "landscape", "--loss", freq_artifact, "--loss", "mse", "--range", "-7", "7",
        "--points", "29", "--tasks", "2", "--seed", "5", "--out-dir", out, "--json", tmp_path / "s.json",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    assert "slope points toward the target" in result.stdout.replace("\n", " ")
    png = (out / "landscape.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_csv(out / "landscape.csv")
    assert len(rows) == 2 * 29
    task = make_task("sine_frequency", FREQ_OPTIONS)
    module = artifacts.load_loss(freq_artifact)
    batch = task.sample_tasks(2, generator(5))
    for row in rows[::7]:
        one = task_slice(batch, int(row["task"]))
        theta = {"omega": torch.tensor([float(row["omega"])])}
        inputs = task.loss_inputs(theta, one)
        assert float(row["freq"]) == pytest.approx(float(module(**inputs)), rel=1e-5, abs=1e-6)
        assert float(row["mse"]) == pytest.approx(float(task.builtin_losses["mse"](**inputs)), rel=1e-5, abs=1e-7)
        assert float(row["target"]) == pytest.approx(float(one.frequency))
    summary = json.loads((tmp_path / "s.json").read_text())
    assert set(summary["losses"]) == {"freq", "mse"}
    assert len(summary["losses"]["mse"]["slope_toward_target"]) == 2


def test_cli_2d_on_the_sine_regression_artifact(monkeypatch, capsys, tmp_path, sine_artifact):
    out = tmp_path / "plane"
    result = run_main(
        monkeypatch, capsys, "landscape", "--loss", sine_artifact, "--mode", "2d", "--points", "7",
        "--span", "0.5", "--seed", "2", "--out-dir", out, cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    assert (out / "landscape.png").read_bytes()[:4] == b"\x89PNG"
    rows = read_csv(out / "landscape.csv")
    assert len(rows) == 49 and {"alpha", "beta", "tiny", "mse", "task_loss"} <= set(rows[0])
    # recompute one grid point directly: the same seed gives the same task, θ₀ and directions
    info = artifacts.read_info(sine_artifact)
    task = make_task(info["test_task"], info["recipe"]["meta_test"]["task_options"])
    gen = generator(2)
    batch = task_slice(task.sample_tasks(1, gen), 0)
    theta = theta_slice(task.init_theta(1, gen), 0)
    d1, d2 = filter_normalized_direction(theta, gen), filter_normalized_direction(theta, gen)
    module = artifacts.load_loss(sine_artifact)
    for row in (rows[0], rows[24], rows[40]):
        a, b = float(row["alpha"]), float(row["beta"])
        point = {k: theta[k] + a * d1[k] + b * d2[k] for k in theta}
        inputs = task.loss_inputs(point, batch)
        assert float(row["tiny"]) == pytest.approx(float(module(**inputs)), rel=1e-4)
        assert float(row["mse"]) == pytest.approx(float(task.builtin_losses["mse"](**inputs)), rel=1e-4)
    assert "slope toward target" in result.stdout


def test_cli_2d_centres_the_plane_on_a_trained_theta(monkeypatch, capsys, tmp_path):
    """`--center-steps N`: the plane lies around θ after N SGD steps (here with MSE at lr 0.05), not around θ₀: the
    loss at its centre is that of θ trained by hand with plain autograd, and lower than at θ₀."""
    options = {"hidden": [4], "points": 8, "query_points": 8}
    flags = [item for key, value in options.items() for item in ("--task-option", f"{key}={value}")]
    centre = {}
    for steps in (0, 5):
        out = tmp_path / f"c{steps}"
        result = run_main(
            monkeypatch, capsys, "landscape", "--loss", "mse", "--task", "sine_shifted", "--mode", "2d", "--points", "3",
            "--center-steps", steps, "--lr", "0.05", *flags, "--out-dir", out, "-q", cwd=tmp_path,
        )  # fmt: skip
        assert result.code == 0, result.output
        (row,) = [r for r in read_csv(out / "landscape.csv") if float(r["alpha"]) == float(r["beta"]) == 0]
        centre[steps] = float(row["mse"])
    assert json.loads((out / "landscape.json").read_text())["center"] == "θ after 5 SGD steps with mse (lr 0.05)"
    task = make_task("sine_shifted", options)
    mse = task.builtin_losses["mse"]
    gen = generator(0)
    batch = task_slice(task.sample_tasks(1, gen), 0)
    theta = theta_slice(task.init_theta(1, gen), 0)
    assert centre[0] == pytest.approx(float(mse(**task.loss_inputs(theta, batch))), rel=1e-5)
    for _ in range(5):
        at = {name: value.detach().requires_grad_() for name, value in theta.items()}
        grads = torch.autograd.grad(mse(**task.loss_inputs(at, batch)), list(at.values()))
        theta = {name: at[name].detach() - 0.05 * g for name, g in zip(at, grads, strict=True)}
    assert centre[5] == pytest.approx(float(mse(**task.loss_inputs(theta, batch))), rel=1e-5)
    assert centre[5] < centre[0]


def test_cli_function_view(monkeypatch, capsys, tmp_path, freq_artifact):
    out = tmp_path / "fn"
    result = run_main(
        monkeypatch, capsys, "landscape", "--loss", freq_artifact, "--loss", "mse", "--mode", "function",
        "--fix", "x=0.5", "--points", "9", "--range", "-1", "1", "--out-dir", out, cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    rows = read_csv(out / "landscape.csv")
    assert len(rows) == 81
    module = artifacts.load_loss(freq_artifact)
    for row in rows[::10]:
        yp, yt = float(row["y_pred"]), float(row["y_true"])
        assert float(row["x"]) == 0.5
        assert float(row["mse"]) == pytest.approx((yp - yt) ** 2, abs=1e-6)
        expected = module.pointwise(torch.tensor([[0.5]]), torch.tensor([[yp]]), torch.tensor([[yt]]))
        assert float(row["freq"]) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert (out / "landscape.png").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "3d"], "--mode '3d'"),
        (["--param", "nope"], "no parameter 'nope'"),
        (["--range", "2", "1"], "LOW < HIGH"),
        (["--points", "1"], "at least 3"),
        (["--mode", "2d"], "no weight matrices"),
        (["--mode", "function", "--axes", "y_pred"], "expected two loss inputs"),
        (["--mode", "function", "--axes", "y_pred,q"], "'q' is not a loss input"),
        (["--mode", "function", "--fix", "x=abc"], "NAME=NUMBER"),
        (["--mode", "function", "--fix", "y_pred=1"], "axes of the plot"),
        (["--task-option", "frequency_range=[3,1]"], "frequency_range"),
        (["--task-option", "bogus=1"], "bogus"),
        (["--loss", "nothing.safetensors"], "nothing.safetensors': no such file"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(monkeypatch, capsys, tmp_path, args, message):
    base = ["landscape", "--task", "sine_frequency", "--points", "5", "--tasks", "1", "--out-dir", tmp_path / "o"]
    if "--loss" not in args:
        base += ["--loss", "mse"]
    result = run_main(monkeypatch, capsys, *base, *args, cwd=tmp_path)
    assert result.code == 2, result.output
    assert message in result.stderr.replace("\n", " ")
    assert "Traceback" not in result.stderr


def test_cli_needs_a_task_without_artifacts(monkeypatch, capsys, tmp_path):
    result = run_main(monkeypatch, capsys, "landscape", "--loss", "mse", cwd=tmp_path)
    assert result.code == 2 and "give --task" in result.stderr


def test_task_option_pins_the_target(monkeypatch, capsys, tmp_path):
    result = run_main(
        monkeypatch, capsys, "landscape", "--task", "sine_frequency", "--loss", "mse", "--task-option",
        "frequency_range=[2.5,2.5]", "--tasks", "2", "--points", "15", "--json", tmp_path / "s.json",
        "--out-dir", tmp_path / "o", cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["targets"] == [2.5, 2.5]
