"""Issue 10 options of the model-free task: the reward input R of M_φ (``loss_reward``), the reward-to-go task loss
(``advantage: to_go``) and the scaled state M_φ sees (``loss_state_scale``)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

from ml3cli.errors import ML3Error
from ml3cli.metaloss import MetaLoss
from ml3cli.runtime import generator
from ml3cli.tasks import make_task
from ml3cli.tasks.mfrl import MFRLBatch, reward_input

pytest.importorskip("gymnasium")

REWARD = torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 1.5], [4.0, -1.0, 0.0]], dtype=torch.float64)  # [E=3, T=3]


def test_return_input_is_the_normalised_episode_return_on_every_step():
    returns = torch.tensor([3.0, 2.0, 3.0], dtype=torch.float64)
    centred = returns - returns.mean()
    expected = (centred / centred.pow(2).mean().sqrt()).unsqueeze(-1).expand(3, 3)
    torch.testing.assert_close(reward_input(REWARD, "return"), expected)


def test_to_go_input_is_the_reward_to_go_centred_per_step_and_scaled_to_unit_rms():
    to_go = torch.tensor([[3.0, 2.0, 0.0], [2.0, 1.5, 1.5], [3.0, -1.0, 0.0]], dtype=torch.float64)  # by hand
    centred = to_go - to_go.mean(0)
    got = reward_input(REWARD, "to_go")
    torch.testing.assert_close(got, centred / centred.pow(2).mean().sqrt())
    torch.testing.assert_close(got.mean(0), torch.zeros(3, dtype=torch.float64))  # no signal shared by all episodes
    assert float(got.pow(2).mean()) == pytest.approx(1.0)
    # the reward's scale does not reach M_φ (the paper's reward has 1/(d + 0.001) spikes)
    torch.testing.assert_close(reward_input(100 * REWARD + 7, "to_go"), got)


@pytest.mark.parametrize("mode", ["return", "to_go"])
def test_the_option_adds_the_input_and_the_meta_loss_sees_it(mode):
    plain = make_task("reacher_goal_mf", {"hidden": [8], "episodes": 2, "horizon": 4})
    task = make_task("reacher_goal_mf", {"hidden": [8], "episodes": 2, "horizon": 4, "loss_reward": mode})
    assert [i.name for i in plain.loss_inputs_spec] == ["s", "a", "mu", "sigma", "g"]
    assert [i.name for i in task.loss_inputs_spec] == ["s", "a", "mu", "sigma", "g", "R"]
    gen = generator(0)
    batch, theta = task.sample_tasks(2, gen), task.init_theta(2, gen)
    batch = task.collect(theta, batch, gen, "inner")
    inputs = vmap(task.loss_inputs)(theta, batch)
    assert inputs["R"].shape == (2, 8, 1)
    torch.testing.assert_close(inputs["R"][1, :, 0], reward_input(batch.reward[1], mode).reshape(-1))
    loss = MetaLoss(task.loss_inputs_spec, (8,))
    assert loss.net[0].in_features == 10 + 2 + 2 + 2 + 2 + 1
    flipped = dict(inputs, R=-inputs["R"])
    assert not torch.equal(vmap(loss.as_loss_fn())(inputs), vmap(loss.as_loss_fn())(flipped))


def test_reward_input_needs_two_episodes():
    with pytest.raises(ML3Error, match="episodes"):
        make_task("reacher_goal_mf", {"episodes": 1, "loss_reward": "to_go"})
    with pytest.raises(ML3Error, match="loss_reward"):
        make_task("reacher_goal_mf", {"loss_reward": "advantage"})


def test_to_go_task_loss_gradient_is_the_causal_reinforce_estimator(float64):
    """``advantage: to_go``: ∇_θ' L_T = −(1/E) Σ_τ Σ_t A_t ∇ log π_θ'(a_t|s_t), A_t the centred, normalised
    reward-to-go, computed one sample at a time with torch.distributions; the value stays the negated metric."""
    task = make_task("reacher_goal_mf", {"hidden": [8], "episodes": 2, "task_loss_episodes": 3, "advantage": "to_go"})
    theta = {k: v[0] for k, v in task.init_theta(1, generator(0)).items()}
    g = generator(1)
    batch = MFRLBatch(
        goal=torch.tensor([0.1, -0.1]),
        obs=torch.randn(3, 3, 10, generator=g),
        action=torch.randn(3, 3, 2, generator=g),
        reward=REWARD,
        distance=torch.full((3, 3), 0.1),
        start_distance=torch.full((3,), 0.2),
    )
    advantage = reward_input(REWARD, "to_go")
    expected = {k: torch.zeros_like(v) for k, v in theta.items()}
    for e in range(3):
        for t in range(3):
            params = {k: v.clone().requires_grad_() for k, v in theta.items()}
            mu, sigma = functional_call(task.optimizee, params, (batch.obs[e, t],))
            log_prob = torch.distributions.Normal(mu, sigma).log_prob(batch.action[e, t]).sum()
            for k, d in zip(params, torch.autograd.grad(log_prob, list(params.values())), strict=True):
                expected[k] -= advantage[e, t] * d / 3
    got = grad(task.task_loss)(theta, batch)
    for k in theta:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-9)
    assert float(task.task_loss(theta, batch)) == pytest.approx(0.3)


def test_loss_state_scale_scales_what_m_phi_sees_but_not_the_policy():
    scale = [1, 1, 1, 1, 10, 10, 0.1, 0.1, 10, 10]
    options = {"hidden": [8], "episodes": 2, "horizon": 4}
    plain = make_task("reacher_goal_mf", options)
    task = make_task("reacher_goal_mf", options | {"loss_state_scale": scale})
    gen = generator(0)
    batch, theta = task.sample_tasks(2, gen), task.init_theta(2, gen)
    batch = task.collect(theta, batch, gen, "inner")
    raw, scaled = vmap(plain.loss_inputs)(theta, batch), vmap(task.loss_inputs)(theta, batch)
    torch.testing.assert_close(scaled["s"], raw["s"] * torch.tensor(scale))
    torch.testing.assert_close(scaled["g"], raw["g"] * 10)  # the goal's features are observation entries 4 and 5
    for name in ("a", "mu", "sigma"):
        torch.testing.assert_close(scaled[name], raw[name])
    with pytest.raises(ML3Error, match="loss_state_scale"):
        make_task("reacher_goal_mf", options | {"loss_state_scale": [1.0, 2.0]})
