"""The real systems of the model-based experiment: gymnasium conformance, MuJoCo stepping, kinematics, and the
batched rollouts of the tasks against the environments stepped one at a time."""

from __future__ import annotations

import warnings

import mujoco
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from ml3cli.envs.mujoco_models import reacher_model
from ml3cli.envs.pointmass import PointmassGoalEnv, pointmass_step
from ml3cli.envs.reacher import ReacherGoalEnv, fingertip
from ml3cli.runtime import generator
from ml3cli.tasks import make_task


@pytest.mark.parametrize("env_cls", [PointmassGoalEnv, ReacherGoalEnv])
def test_check_env_passes(env_cls):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # check_env reports most problems as warnings
        # unbounded observations are right here (positions and speeds have no limit), as in gymnasium's own MuJoCo envs
        warnings.filterwarnings("ignore", message=".*Box observation space (minimum|maximum) value is .*infinity")
        check_env(env_cls(), skip_render_check=True)


@pytest.mark.parametrize("env_cls", [PointmassGoalEnv, ReacherGoalEnv])
def test_reset_seeds_the_goal_and_truncates_at_the_horizon(env_cls):
    env = env_cls()
    a, _ = env.reset(seed=3)
    b, _ = env.reset(seed=3)
    c, _ = env.reset(seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a[4:], c[4:])
    angle = np.degrees(np.arctan2(a[5], a[4]))
    assert -45 <= angle <= 45
    env.reset(seed=0, options={"goal": [0.1, 0.0]})
    done = [env.step(env.action_space.sample())[3] for _ in range(env.horizon)]
    assert done == [False] * (env.horizon - 1) + [True]


def test_reacher_step_matches_mujoco_stepped_by_hand():
    env = ReacherGoalEnv()
    env.reset(seed=0, options={"start": [0.3, -0.7, 1.0, -2.0], "goal": [0.1, 0.05]})
    model = reacher_model()
    data = mujoco.MjData(model)
    data.qpos[:] = [0.3, -0.7, 0.1, 0.05]
    data.qvel[:] = [1.0, -2.0, 0.0, 0.0]
    rng = np.random.default_rng(0)
    for _ in range(20):
        action = rng.uniform(-0.3, 0.3, 2)  # beyond ±max_action too: both must clip to the same control
        obs, reward, *_ = env.step(action)
        data.ctrl[:] = np.clip(action, -env.arm.max_action, env.arm.max_action)
        for _ in range(env.arm.frame_skip):
            mujoco.mj_step(model, data)
        np.testing.assert_allclose(obs[:4], np.concatenate([data.qpos[:2], data.qvel[:2]]), rtol=0, atol=1e-12)
        mujoco.mj_forward(model, data)
        tip = data.body("fingertip").xpos[:2]
        assert reward == pytest.approx(-np.linalg.norm(tip - [0.1, 0.05]), abs=1e-9)
    assert abs(obs[0] - 0.3) > 0.01  # the arm moved


def test_fingertip_kinematics_match_mujoco():
    model = reacher_model()
    data = mujoco.MjData(model)
    rng = np.random.default_rng(1)
    for _ in range(10):
        q = rng.uniform(-3, 3, 2)
        data.qpos[:2] = q
        mujoco.mj_forward(model, data)
        ours = fingertip(torch.tensor(q, dtype=torch.float64)).numpy()
        np.testing.assert_allclose(ours, data.body("fingertip").xpos[:2], atol=1e-12)


def test_pointmass_step_integrates_constant_acceleration():
    state = torch.zeros(4, dtype=torch.float64)
    for _ in range(10):
        state = pointmass_step(state, torch.tensor([0.5, 5.0], dtype=torch.float64), dt=0.1, damping=0.0)
    # semi-implicit Euler: v_n = n a dt, x_n = a dt² n(n+1)/2; the y action is clipped to 1
    np.testing.assert_allclose(state.numpy(), [0.5 * 0.01 * 55, 1.0 * 0.01 * 55, 0.5, 1.0], atol=1e-12)


@pytest.mark.parametrize("name,env_cls", [("pointmass_goal", PointmassGoalEnv), ("reacher_goal", ReacherGoalEnv)])
def test_task_rollouts_equal_the_environment(name, env_cls):
    """The batched rollout the tasks collect is the environment stepped one step at a time with the same policy."""
    task = make_task(name, {"system": "real", "horizon": 12})
    gen = generator(0)
    batch = task.sample_tasks(2, gen)
    theta = task.init_theta(2, gen)
    states = task.collect(theta, batch, gen, "inner").states
    env = env_cls(horizon=12)
    for i in range(2):
        obs, _ = env.reset(options={"goal": batch.goal[i].numpy(), "start": batch.start[i].numpy()})
        one = {k: v[i] for k, v in theta.items()}
        for t in range(12):
            action = task.act(one, torch.tensor(obs[:4], dtype=torch.float32), batch.goal[i]).detach().numpy()
            obs, *_ = env.step(action)
            np.testing.assert_allclose(obs[:4], states[i, t + 1].numpy(), rtol=1e-4, atol=1e-4)


def test_the_dynamics_model_fits_even_when_called_under_no_grad():
    """An evaluation runs under ``torch.no_grad``; a task that fits its model there (``ml3 compare --task
    reacher_goal`` without meta-training) must still fit it, not fail inside autograd."""
    from ml3cli.envs.dynamics_model import DynamicsModel

    model = DynamicsModel(2, 1, hidden=(8,))
    states = torch.randn(4, 6, 2, generator=generator(0))
    model.add(states, torch.randn(4, 5, 1, generator=generator(1)))
    with torch.no_grad():
        loss = model.fit(generator(2), steps=5)
    assert np.isfinite(loss) and model.fitted


def test_a_diverged_policy_on_the_real_reacher_gives_nan_states(capfd):
    """θ with a NaN: its rollout on MuJoCo's arm is NaN from the first step (MuJoCo would reset the arm on a NaN
    control and report its rest pose), the other task's rollout is untouched, MuJoCo prints no warning."""
    task = make_task("reacher_goal", {"system": "real", "horizon": 12})
    gen = generator(0)
    batch, theta = task.sample_tasks(2, gen), task.init_theta(2, gen)
    healthy = task.collect(theta, batch, gen, "inner").states
    name = [n for n in theta if n.endswith("bias")][-1]
    theta[name] = theta[name].clone()
    theta[name][1] = float("nan")
    broken = task.collect(theta, batch, gen, "inner").states
    assert torch.isnan(broken[1, 1:]).all() and torch.equal(broken[1, 0], healthy[1, 0])
    np.testing.assert_allclose(broken[0].numpy(), healthy[0].numpy())
    captured = capfd.readouterr()
    assert "Nan, Inf or huge value" not in captured.out + captured.err
