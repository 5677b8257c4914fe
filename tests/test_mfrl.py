"""Model-free RL (paper 4.1.3): the goal environments, the rollouts, the REINFORCE task loss and a tiny
meta-training run on ReacherGoal."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import REPO
from torch.func import functional_call, grad

from ml3cli.engine import learned_loss_fn, meta_train
from ml3cli.errors import ML3Error
from ml3cli.evaluate import train_curve
from ml3cli.recipes import load_recipe, recipe_from_dict
from ml3cli.rl import gaussian_log_prob, reinforce_surrogate, trajectory_advantage
from ml3cli.runtime import generator
from ml3cli.tasks import make_task
from ml3cli.tasks.mfrl import MFRLBatch

gymnasium = pytest.importorskip("gymnasium")


def check(env) -> None:
    from gymnasium.utils.env_checker import check_env

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unbounded observation Box is gymnasium's own
        check_env(env, skip_render_check=True)


# -- environments -----------------------------------------------------------------------------------------------
def test_reacher_goal_passes_check_env_and_takes_the_requested_goal():
    from ml3cli.envs.reacher_goal_mf import ReacherGoalMFEnv, make_reacher_goal_mf

    env = ReacherGoalMFEnv()
    check(env)
    obs, info = env.reset(seed=3, options={"goal": (0.1, -0.05)})
    np.testing.assert_allclose(obs[4:6], [0.1, -0.05])  # the goal is part of the observation
    assert info["distance"] == pytest.approx(np.linalg.norm(obs[8:10]))
    again, _ = env.reset(seed=3, options={"goal": (0.1, -0.05)})
    np.testing.assert_array_equal(obs, again)
    drawn, _ = env.reset(seed=4)
    assert np.linalg.norm(drawn[4:6]) < 0.2
    with pytest.raises(ValueError, match="goal"):
        env.reset(options={"goal": (1.0, 2.0, 3.0)})
    limited = make_reacher_goal_mf()
    limited.reset(seed=0)
    ends = [limited.step(np.zeros(2))[3] for _ in range(50)]
    assert ends[-1] and not any(ends[:-1])


def test_reacher_goal_reward_matches_the_formula_on_hand_made_states():
    """R_g = −d + 1/(d + 0.001) − |a|₁ with d from the arm's forward kinematics (links 0.1 m and 0.11 m)."""
    from ml3cli.envs.reacher_goal_mf import ReacherGoalMFEnv

    env = ReacherGoalMFEnv()
    env.reset(seed=0)
    for q1, q2, goal, action in [
        (0.0, 0.0, (0.21, 0.1), (0.0, 0.0)),
        (0.5, -1.0, (-0.1, 0.05), (0.3, -0.7)),
        (2.0, 1.5, (0.0, 0.15), (2.0, -3.0)),  # outside [−1, 1]: the applied (clipped) action is charged
    ]:
        env.set_state(np.array([q1, q2, *goal]), np.zeros(4))
        tip = np.array([0.1 * math.cos(q1) + 0.11 * math.cos(q1 + q2), 0.1 * math.sin(q1) + 0.11 * math.sin(q1 + q2)])
        d = float(np.linalg.norm(tip - np.array(goal)))
        reward, info = env._get_rew(np.array(action))
        expected = -d + 1 / (d + 0.001) - float(np.abs(np.clip(action, -1, 1)).sum())
        assert info["distance"] == pytest.approx(d, abs=1e-9)
        assert reward == pytest.approx(expected, rel=1e-9)
    env.reset(seed=1, options={"goal": (0.0, 0.2)})
    _, reward, _, _, info = env.step(np.array([0.5, 0.5]))  # the step's reward is the formula at the new state
    assert reward == pytest.approx(-info["distance"] + 1 / (info["distance"] + 0.001) - 1.0)


def test_ant_goal_passes_check_env_and_its_reward_matches_the_formula():
    from ml3cli.envs.ant_goal import AntGoalEnv

    env = AntGoalEnv()
    check(env)
    obs, info = env.reset(seed=0, options={"goal": (0.0, -2.0)})
    assert obs.shape == (31,)  # 29 without contact forces, torso x, y included, then the goal
    np.testing.assert_allclose(obs[-2:], [0.0, -2.0])
    np.testing.assert_allclose(obs[:2], env.data.qpos[:2])
    drawn, _ = env.reset(seed=1)
    assert np.linalg.norm(drawn[-2:]) == pytest.approx(2.0)
    qpos = env.init_qpos.copy()
    qpos[:2] = (1.0, 0.0)
    env.reset(seed=2, options={"goal": (2.0, 0.0)})
    env.set_state(qpos, env.init_qvel)
    reward, info = env._get_rew(np.full(8, 0.5))
    assert info["distance"] == pytest.approx(1.0)
    assert reward == pytest.approx(-1.0 + 5 / 1.25 - 4.0)


# -- rollouts and the task loss -----------------------------------------------------------------------------------
def tiny_reacher(**options):
    base = {"hidden": [8], "episodes": 2, "task_loss_episodes": 3, "horizon": 6}
    return make_task("reacher_goal_mf", base | options)


def test_a_diverged_policy_records_nan_instead_of_a_reset_robot(capfd):
    """θ with a NaN in the last layer: its episodes record NaN distances and rewards (so a learning-rate search
    scores the rate as diverged), MuJoCo is never handed a NaN control (it would warn, reset the robot and report
    the rest pose's distance), and the other task's episodes are untouched."""
    task = tiny_reacher()
    gen = generator(0)
    batch, theta = task.sample_tasks(2, gen), task.init_theta(2, gen)
    state = gen.get_state()
    healthy = task.collect(theta, batch, gen, "inner")
    last_bias = [name for name in theta if name.endswith("bias")][-1]
    theta[last_bias] = theta[last_bias].clone()
    theta[last_bias][1] = math.nan
    gen.set_state(state)
    broken = task.collect(theta, batch, gen, "inner")
    assert torch.isnan(broken.distance[1]).all() and torch.isnan(broken.reward[1]).all()
    assert torch.equal(broken.distance[0], healthy.distance[0]) and torch.equal(broken.reward[0], healthy.reward[0])
    captured = capfd.readouterr()
    assert "Nan, Inf or huge value" not in captured.out + captured.err


def test_collect_rolls_out_every_task_reproducibly():
    task = tiny_reacher()
    gen = generator(0)
    batch, theta = task.sample_tasks(2, gen), task.init_theta(2, gen)
    state = gen.get_state()
    inner = task.collect(theta, batch, gen, "inner")
    measured = task.collect(theta, batch, gen, "task_loss")
    assert inner.obs.shape == (2, 2, 6, 10) and inner.action.shape == (2, 2, 6, 2)
    assert measured.reward.shape == (2, 3, 6) and measured.start_distance.shape == (2, 3)
    torch.testing.assert_close(inner.obs[:, :, 0, 4:6], batch.goal[:, None].expand(2, 2, 2))  # each task its goal
    assert not torch.equal(inner.action[:, 0], inner.action[:, 1])  # episodes differ
    gen.set_state(state)
    again = task.collect(theta, batch, gen, "inner")
    for a, b in zip(inner, again, strict=True):
        assert torch.equal(a, b)
    # every simulator step is counted: 2 goals × (2 + 3 + 2 episodes) × 6 steps
    assert task.environment_samples == 2 * (2 + 3 + 2) * 6
    # the rewards are the paper's formula of the recorded distances and the applied actions
    expected = -inner.distance + 1 / (inner.distance + 0.001) - inner.action.clamp(-1, 1).abs().sum(-1)
    torch.testing.assert_close(inner.reward, expected, rtol=1e-5, atol=1e-4)


def one_task_batch(float_dtype=torch.float64) -> MFRLBatch:
    g = generator(1)
    E, T = 3, 2
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=float_dtype)  # noqa: E731
    return MFRLBatch(
        goal=torch.tensor([0.1, -0.1], dtype=float_dtype),
        obs=rand(E, T, 10),
        action=rand(E, T, 2),
        reward=torch.tensor([[1.0, 2.0], [0.5, 0.0], [4.0, -1.0]], dtype=float_dtype),
        distance=torch.tensor([[0.2, 0.1], [0.3, 0.3], [0.05, 0.05]], dtype=float_dtype),
        start_distance=torch.full((E,), 0.25, dtype=float_dtype),
    )


@pytest.mark.parametrize("mode", ["return", "baseline", "normalized"])
def test_task_loss_gradient_is_the_reinforce_estimator(float64, mode):
    """∇_θ' L_T = −(1/E) Σ_τ A(τ) Σ_t ∇ log π_θ'(a_t|s_t), computed here with torch.distributions, one sample at a
    time; the value of L_T is the negated metric, mean_τ Σ_t d_t."""
    task = tiny_reacher(advantage=mode)
    theta = {k: v[0] for k, v in task.init_theta(1, generator(0)).items()}
    batch = one_task_batch()
    returns = torch.tensor([3.0, 0.5, 3.0])
    advantage = {
        "return": returns,
        "baseline": returns - 13 / 6,
        "normalized": (returns - 13 / 6) / math.sqrt(((returns - 13 / 6) ** 2).mean()),
    }[mode]
    torch.testing.assert_close(trajectory_advantage(returns, mode), advantage, atol=1e-6, rtol=0)
    expected = {k: torch.zeros_like(v) for k, v in theta.items()}
    for e in range(3):
        for t in range(2):
            params = {k: v.clone().requires_grad_() for k, v in theta.items()}
            mu, sigma = functional_call(task.optimizee, params, (batch.obs[e, t],))
            log_prob = torch.distributions.Normal(mu, sigma).log_prob(batch.action[e, t]).sum()
            for k, g in zip(params, torch.autograd.grad(log_prob, list(params.values())), strict=True):
                expected[k] -= advantage[e] * g / 3
    got = grad(task.task_loss)(theta, batch)
    for k in theta:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-9)
    assert float(task.task_loss(theta, batch)) == pytest.approx((0.3 + 0.6 + 0.1) / 3)
    metrics = task.report_metrics(theta, batch)
    assert float(metrics["performance"]) == pytest.approx(-(0.3 + 0.6 + 0.1) / 3)
    assert float(metrics["return"]) == pytest.approx(6.5 / 3)


def test_surrogate_and_log_prob_by_hand(float64):
    """log N(a; μ, σ) by hand for one 2-D sample, and the surrogate's sign: a positive advantage lowers the loss
    when the action gets likelier."""
    a, mu, sigma = torch.tensor([0.5, -1.0]), torch.tensor([0.0, -1.0]), torch.tensor([0.5, 2.0])
    expected = (-0.5 * 1.0 - math.log(0.5) - 0.5 * math.log(2 * math.pi)) + (
        -math.log(2.0) - 0.5 * math.log(2 * math.pi)
    )
    assert float(gaussian_log_prob(a, mu, sigma)) == pytest.approx(expected)
    log_prob = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss = reinforce_surrogate(log_prob, torch.tensor([2.0]))
    assert float(loss.detach()) == pytest.approx(6.0)
    loss.backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([[-2.0, -2.0]]))


def test_options_are_validated():
    with pytest.raises(ML3Error, match="task_options.advantage"):
        make_task("reacher_goal_mf", {"advantage": "gae"})
    with pytest.raises(ML3Error, match="task_loss_episodes"):
        make_task("reacher_goal_mf", {"task_loss_episodes": 1})
    with pytest.raises(ML3Error, match="goal_radius"):
        make_task("ant_goal", {"goal_radius": [1.0, 2.0]})


def test_recipes_load():
    for path in ("recipes/mfrl_reacher.yaml", "recipes/mfrl_ant.yaml", "recipes/mfrl_ant_small.yaml"):
        recipe = load_recipe(REPO / path)
        assert recipe.inner.task_loss_at == "every"


# -- a tiny meta-training run -----------------------------------------------------------------------------------
TINY_MFRL = {
    "name": "tiny_mfrl",
    "task": "reacher_goal_mf",
    "task_options": {"hidden": [16], "init_log_std": -0.5, "episodes": 2, "task_loss_episodes": 4, "horizon": 30},
    "seed": 0,
    "threads": 1,
    "meta_loss": {"hidden": [16, 16], "activation": "relu", "output": "softplus"},
    "inner": {"lr": 0.5, "steps": 2, "task_loss_at": "every"},
    "outer": {"lr": 1e-2, "steps": 40, "tasks": 4},
    "meta_test": {"task": "reacher_goal_mf", "tasks": 1, "seeds": 1, "steps": 5},
    "log_every": 5,
}


def held_out_performance(task, loss_fn, lr: float, steps: int, seed: int) -> np.ndarray:
    """Performance of ``loss_fn`` trained policies on held-out goals, ``[steps + 1]`` (mean over the goals)."""
    gen = generator(seed)
    batch, theta = task.sample_tasks(4, gen), task.init_theta(4, gen)
    _, extras = train_curve(task, loss_fn, theta, batch, lr, steps, report=True, gen=gen)
    return extras["performance"].mean(1).numpy()


def test_tiny_meta_training_learns_a_loss_that_improves_held_out_goals():
    """Algorithm 4 end to end at a fixed seed: after meta-training, SGD on the learned loss alone (algorithm 5)
    improves the metric on goals never seen in meta-training, and more than the untrained loss does."""
    recipe = recipe_from_dict(copy.deepcopy(TINY_MFRL))
    task = make_task(recipe.task, recipe.task_options)
    untrained = meta_train(recipe_from_dict(TINY_MFRL | {"outer": TINY_MFRL["outer"] | {"steps": 1}}), task).metaloss
    result = meta_train(recipe, task)
    assert len(result.curves) >= 2
    phi = {k: v.detach() for k, v in result.metaloss.named_parameters()}
    phi0 = {k: v.detach() for k, v in untrained.named_parameters()}
    # measured on more evaluation episodes than meta-training used, to see through the rollout noise
    test_task = make_task(recipe.task, dict(recipe.task_options) | {"task_loss_episodes": 8})
    learned = held_out_performance(test_task, learned_loss_fn(result.metaloss, phi), 0.5, 10, seed=12345)
    before = held_out_performance(test_task, learned_loss_fn(untrained, phi0), 0.5, 10, seed=12345)
    assert learned[0] == before[0]  # same goals, same θ₀, same first rollout
    gain = learned[-3:].mean() - learned[0]  # measured at seed 0: about +1.1 (Σ_t −d_t over 30 steps)
    assert gain > 0.5, learned
    assert gain > before[-3:].mean() - before[0] + 0.5, (learned, before)  # untrained: about −0.1


def test_meta_training_resumes_bit_for_bit(tmp_path):
    """The rollouts draw only from the engine's generator, so a run stopped after outer step 2 and resumed from its
    checkpoint file ends with exactly the φ of the uninterrupted run (the long ant recipe relies on this)."""
    from ml3cli.checkpoints import batch_type_of, load_checkpoint, save_checkpoint, validate_state
    from ml3cli.recipes import recipe_to_dict

    data = copy.deepcopy(TINY_MFRL)
    data["task_options"] |= {"hidden": [8], "horizon": 5}
    data["outer"] |= {"steps": 4, "tasks": 2}
    recipe = recipe_from_dict(data)
    full = meta_train(recipe, make_task(recipe.task, recipe.task_options))
    path = tmp_path / "stop.checkpoint.safetensors"

    class Stop(Exception):
        pass

    def on_state(step, snapshot):
        if step == 2:
            save_checkpoint(path, snapshot(), recipe_to_dict(recipe), tmp_path / "a.safetensors")
            raise Stop

    with pytest.raises(Stop):
        meta_train(recipe, make_task(recipe.task, recipe.task_options), on_state=on_state)
    task = make_task(recipe.task, recipe.task_options)
    loaded = load_checkpoint(path, batch_type_of(task))
    validate_state(loaded, recipe, task)
    resumed = meta_train(recipe, task, resume=loaded.state)
    for name, value in full.metaloss.state_dict().items():
        assert torch.equal(value, resumed.metaloss.state_dict()[name]), name


def test_phi_does_not_depend_on_how_often_the_run_logs():
    """The logged L_T and M_φ at θ₀ roll out from a generator of the seed and the outer step, not from the
    training generator: logging every outer step or only the first and last gives bit-identical φ."""
    data = copy.deepcopy(TINY_MFRL)
    data["task_options"] |= {"hidden": [8], "horizon": 5, "episodes": 1, "task_loss_episodes": 2}
    data["outer"] |= {"steps": 4, "tasks": 2}
    phis = []
    for log_every in (1, 1000):
        recipe = recipe_from_dict(data | {"log_every": log_every})
        phis.append(meta_train(recipe, make_task(recipe.task, recipe.task_options)).metaloss.state_dict())
    for name, value in phis[0].items():
        assert torch.equal(value, phis[1][name]), name
