"""Per-joint torque normalisation of the inverse-dynamics tasks (``normalize_torques``): the loss sees û_j / s_j
and u_j / s_j with s_j from the meta-train split's training torques; the hand-written losses and the metric keep
their meaning in N·m."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import RECIPES, run_main, write_recipe

from ml3cli.evaluate import evaluate
from ml3cli.losses import builtin_loss
from ml3cli.runtime import generator
from ml3cli.tasks import make_task

TINY = {"trajectories": 2, "held_out_trajectories": 1, "samples": 40, "points": 16, "query_points": 16, "hidden": [8]}


@pytest.fixture(params=["inverse_dynamics_reacher", "inverse_dynamics_sawyer"])
def tasks(request, tmp_path):
    options = {**TINY, "cache_dir": str(tmp_path)}
    plain = make_task(request.param, options)
    scaled = make_task(request.param, {**options, "normalize_torques": True})
    return plain, scaled, make_task(request.param, {**options, "normalize_torques": True, "split": "meta_test"})


def test_scales_are_the_meta_train_torques_std_per_joint_on_both_splits(tasks, tmp_path):
    plain, scaled, test_split = tasks
    torques = plain.train_pool["u"].double().numpy()  # the meta-train split's training samples [N, dof]
    np.testing.assert_allclose(scaled.torque_scales.numpy(), torques.std(axis=0), rtol=1e-6)
    assert torch.equal(test_split.torque_scales, scaled.torque_scales)  # not the meta-test split's own
    assert not torch.allclose(test_split.train_pool["u"].std(0), scaled.torque_scales)
    assert torch.equal(plain.torque_scales, torch.ones(plain.dof))
    assert scaled.provenance() == {"torque_scales": [float(s) for s in scaled.torque_scales]}
    assert plain.provenance() == {}


def test_the_loss_sees_normalised_torques_and_the_hand_written_losses_keep_newton_metres(tasks):
    plain, scaled, _ = tasks
    gen = generator(3)
    batch = scaled.sample_tasks(1, gen)
    theta = {k: v[0] for k, v in scaled.init_theta(1, gen).items()}
    one = type(batch)(*(field[0] for field in batch))
    raw, normed = plain.loss_inputs(theta, one), scaled.loss_inputs(theta, one)
    s = scaled.torque_scales.reshape(-1, 1)
    torch.testing.assert_close(normed["u_pred"] * s, raw["u_pred"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normed["u_true"] * s, raw["u_true"], rtol=1e-6, atol=1e-6)
    for name in ("torque_mse", "l1", "huber"):
        torch.testing.assert_close(
            scaled.builtin_losses[name](**normed), plain.builtin_losses[name](**raw), rtol=1e-5, atol=1e-5
        )
    per_joint = (((raw["u_pred"] - raw["u_true"]) / s) ** 2).reshape(len(raw["u_pred"]), -1).sum(-1).mean()
    torch.testing.assert_close(scaled.builtin_losses["normalized_mse"](**normed), per_joint, rtol=1e-5, atol=1e-6)
    assert scaled.task_loss(theta, one) == plain.task_loss(theta, one)  # the metric is in N·m either way
    assert list(scaled.builtin_losses)[0] == "torque_mse"  # the baseline is still the paper's


def test_torque_mse_trains_the_same_with_or_without_normalisation(tasks):
    plain, scaled, _ = tasks
    curves = [evaluate(task, [builtin_loss(task, "torque_mse", 1e-3)], 2, 2, 5)[0] for task in (plain, scaled)]
    np.testing.assert_allclose(curves[1].values, curves[0].values, rtol=1e-4)


def test_meta_train_records_the_scales_in_the_artifact(tmp_path, monkeypatch, capsys):
    import yaml

    from ml3cli.artifacts import read_info

    data = yaml.safe_load((RECIPES / "inverse_dynamics_sawyer.yaml").read_text())
    for options in (data["task_options"], data["meta_test"]["task_options"]):
        options.update(TINY, cache_dir=str(tmp_path), normalize_torques=True)
    data["meta_test"].update(tasks=1, seeds=1, steps=3)
    data.update(log_every=1, checkpoint_every=0)
    data["outer"].update(steps=2, tasks=2)
    data["inner"].update(steps=2)
    recipe = write_recipe(tmp_path / "r.yaml", data)
    result = run_main(monkeypatch, capsys, "meta-train", recipe, "--out", "a.safetensors", "-q", cwd=tmp_path)
    assert result.code == 0, result.output
    info = read_info(tmp_path / "a.safetensors")
    settings = make_task("inverse_dynamics_sawyer", {**TINY, "cache_dir": str(tmp_path), "normalize_torques": True})
    assert info["metrics"]["task_data"]["torque_scales"] == [float(s) for s in settings.torque_scales]
    assert info["recipe"]["task_options"]["normalize_torques"] is True
