"""PPO's objective against hand-computed values (ratios, clipping, GAE, value clipping) and its trainer."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from ml3cli.baselines.ppo import (
    ObservationNormalizer,
    PPOConfig,
    RewardScaler,
    clipped_surrogate,
    episodes_per_update,
    gae,
    normalize,
    ppo_loss,
    train_ppo,
    value_loss,
)
from ml3cli.evaluate import train_curve
from ml3cli.runtime import generator
from ml3cli.tasks import make_task
from ml3cli.tasks.mfrl import likelihood


def test_gae_matches_a_hand_computation(float64):
    """Three steps, γ = 0.9, λ = 0.5, the episode ends after the last step (no bootstrap):
    δ₂ = 3 − 0.5 = 2.5, δ₁ = 2 + 0.9·0.5 − 1 = 1.45, δ₀ = 1 + 0.9·1 − 2 = −0.1;
    Â₂ = 2.5, Â₁ = 1.45 + 0.45·2.5 = 2.575, Â₀ = −0.1 + 0.45·2.575 = 1.05875."""
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[2.0, 1.0, 0.5]])
    advantages, returns = gae(rewards, values, gamma=0.9, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[1.05875, 2.575, 2.5]]))
    torch.testing.assert_close(returns, advantages + values)
    # λ = 1 gives the discounted return minus the value; λ = 0 the one-step TD error
    mc, _ = gae(rewards, values, gamma=0.9, lam=1.0)
    torch.testing.assert_close(mc[0, 0], torch.tensor(1 + 0.9 * 2 + 0.81 * 3 - 2.0))
    td, _ = gae(rewards, values, gamma=0.9, lam=0.0)
    torch.testing.assert_close(td, torch.tensor([[-0.1, 1.45, 2.5]]))


def test_clipped_surrogate_matches_a_hand_computation(float64):
    """r = (0.5, 1, 1.5), Â = (1, −1, 2), ε = 0.2: min(0.5, 0.8) = 0.5; min(−1, −1) = −1; min(3, 2.4) = 2.4;
    L = −(0.5 − 1 + 2.4)/3. With a negative advantage the clip bounds from the other side: r = 0.5, Â = −1 gives
    min(−0.5, −0.8) = −0.8."""
    old = torch.log(torch.tensor([0.2, 0.3, 0.4]))
    new = old + torch.log(torch.tensor([0.5, 1.0, 1.5]))
    advantage = torch.tensor([1.0, -1.0, 2.0])
    assert float(clipped_surrogate(new, old, advantage, 0.2)) == pytest.approx(-(0.5 - 1 + 2.4) / 3)
    low = torch.log(torch.tensor([0.5]))
    assert float(clipped_surrogate(low, torch.zeros(1), torch.tensor([-1.0]), 0.2)) == pytest.approx(0.8)
    # the gradient vanishes where the clip is active (r = 1.5 > 1.2 with Â > 0) and not elsewhere
    new = new.clone().requires_grad_()
    clipped_surrogate(new, old, advantage, 0.2).backward()
    assert new.grad[2] == 0 and new.grad[0] != 0 and new.grad[1] != 0


def test_value_loss_matches_a_hand_computation(float64):
    """V = (1, 3), V_old = (0, 3), R̂ = (2, 2.5), ε = 0.2: unclipped (1, 0.25); the clipped prediction (0.2, 3)
    gives (3.24, 0.25); ½ mean max = ½ (3.24 + 0.25)/2."""
    value, old, ret = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 3.0]), torch.tensor([2.0, 2.5])
    assert float(value_loss(value, old, ret, 0.2)) == pytest.approx(0.5 * (3.24 + 0.25) / 2)
    assert float(value_loss(value, old, ret, 0.2, clipped=False)) == pytest.approx(0.5 * (1 + 0.25) / 2)


def test_ppo_loss_combines_the_terms(float64):
    config = PPOConfig(ent_coef=0.01, vf_coef=0.5, clip_coef=0.2)
    log_prob, old = torch.tensor([0.1, -0.2, 0.0]), torch.tensor([0.0, 0.0, 0.0])
    advantage = torch.tensor([1.0, -2.0, 4.0])
    value, old_value, ret = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.1, 2.0, 2.0]), torch.tensor([0.0, 2.0, 5.0])
    entropy = torch.tensor([1.5, 1.5, 1.5])
    a = (advantage - advantage.mean()) / advantage.std()
    assert a.std() == pytest.approx(1.0)
    torch.testing.assert_close(normalize(advantage), a, atol=1e-7, rtol=0)
    expected = clipped_surrogate(log_prob, old, a, 0.2) - 0.01 * 1.5 + 0.5 * value_loss(value, old_value, ret, 0.2)
    got = ppo_loss(log_prob, old, advantage, value, old_value, ret, entropy, config)
    torch.testing.assert_close(got, expected, atol=1e-7, rtol=0)
    # by hand: ratios e^0.1, e^−0.2, 1 against the normalised advantages
    r = [math.exp(0.1), math.exp(-0.2), 1.0]
    terms = [min(ri * ai, min(max(ri, 0.8), 1.2) * ai) for ri, ai in zip(r, a.tolist(), strict=True)]
    assert float(clipped_surrogate(log_prob, old, a, 0.2)) == pytest.approx(-sum(terms) / 3)


def test_reward_scaler_divides_by_the_running_std_of_the_discounted_return(float64):
    scaler = RewardScaler(2, gamma=0.5)
    rewards = torch.tensor([[[1.0, 1.0, 1.0]], [[2.0, 0.0, 0.0]]])  # two tasks, one episode of three steps
    scaled = scaler(rewards)
    discounted = np.array([[1.0, 1.5, 1.75], [2.0, 1.0, 0.5]])
    # the prior (count 1e-4, mean 0, var 1) barely weighs against three samples
    var = discounted.var(1)
    np.testing.assert_allclose(scaled.numpy(), rewards.numpy() / np.sqrt(var + 1e-8)[:, None, None], rtol=1e-3)


def test_observation_normalizer_tracks_the_running_mean_and_variance_per_task(float64):
    """Gymnasium's NormalizeObservation: the prior (count 1e-4, mean 0, var 1) barely weighs against the samples,
    every task keeps its own statistics, outputs are clipped to ±clip, and evaluation does not update them."""
    normalizer = ObservationNormalizer(2, 1, clip=10.0)
    first = torch.tensor([[[1.0], [3.0]], [[10.0], [10.0]]])  # two tasks, two episodes, one feature
    out = normalizer(first)
    torch.testing.assert_close(normalizer.mean.squeeze(-1), torch.tensor([2.0, 10.0]), rtol=1e-4, atol=0)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([-1.0, 1.0]), rtol=1e-3, atol=0)  # var 1 of (1, 3)
    assert float(normalizer.var[1]) < 0.01 and float(out[1].abs().max()) < 0.1  # a constant input: near 0
    second = torch.tensor([[[5.0], [5.0]], [[10.0], [10.0]]])
    normalizer(second)
    every = torch.tensor([1.0, 3.0, 5.0, 5.0])
    torch.testing.assert_close(normalizer.mean[0, 0], every.mean(), rtol=1e-4, atol=0)
    torch.testing.assert_close(normalizer.var[0, 0], every.var(unbiased=False), rtol=1e-3, atol=0)
    assert len(normalizer.seen) == 2  # what the policy acted on while training
    normalizer.training = False
    state = (normalizer.mean.clone(), normalizer.var.clone())
    normalizer(torch.full((2, 2, 1), 100.0))
    assert torch.equal(normalizer.mean, state[0]) and torch.equal(normalizer.var, state[1])
    assert len(normalizer.seen) == 2
    # far outside the statistics: clipped to ±10
    assert torch.equal(normalizer(torch.full((2, 1, 1), 1e6))[0], torch.full((1, 1), 10.0))


def test_an_update_rolls_out_cleanrls_2048_samples_in_whole_episodes():
    reacher = make_task("reacher_goal_mf", {"horizon": 50})
    assert episodes_per_update(reacher, PPOConfig()) == 41  # 2,050 samples
    assert episodes_per_update(reacher, PPOConfig(steps_per_update=None)) == reacher.options.episodes
    ant = make_task("ant_goal", {"horizon": 100})
    assert episodes_per_update(ant, PPOConfig()) == 21


def test_train_ppo_is_deterministic_and_shaped():
    task = make_task("reacher_goal_mf", {"hidden": [8], "episodes": 2, "task_loss_episodes": 2, "horizon": 10})
    gen = generator(0)
    batch, theta = task.sample_tasks(2, gen), task.init_theta(2, gen)
    state = gen.get_state()
    config = PPOConfig(steps_per_update=30, num_minibatches=4, update_epochs=2)
    first = train_ppo(task, theta, batch, 3, gen, config)
    gen.set_state(state)
    second = train_ppo(task, theta, batch, 3, gen, config)
    assert first.performance.shape == (4, 2) and first.samples_per_update == 30
    np.testing.assert_array_equal(first.performance, second.performance)
    assert any(not torch.equal(first.theta[k], theta[k]) for k in theta)  # PPO moved the policy
    # every rollout is counted: 3 updates × 3 episodes and 4 evaluations × 2 episodes, 10 steps each, 2 goals, twice
    assert task.environment_samples == 2 * 2 * 10 * (3 * 3 + 4 * 2)
    # paired with the learned loss's meta-test: the same evaluation rollout before the first update, exactly so
    # without the observation normaliser (with it, the policy sees obs / sqrt(1 + 1e-8) clipped to ±10, and a
    # clipped joint velocity changes the rollout)
    gen.set_state(state)
    _, extras = train_curve(task, lambda inputs: likelihood(**inputs), theta, batch, 0.1, 1, report=True, gen=gen)
    gen.set_state(state)
    raw = train_ppo(task, theta, batch, 1, gen, dataclasses.replace(config, normalize_obs=False))
    np.testing.assert_array_equal(raw.performance[0], extras["performance"][0].numpy())
