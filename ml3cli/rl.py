"""Reinforcement-learning primitives shared by the RL tasks and the RL baselines.

The model-free tasks (:mod:`ml3cli.tasks.mfrl`) and PPO (:mod:`ml3cli.baselines.ppo`) train the same policies on
the same rollouts and measure them with the same metric; everything they share lives here, so that neither
depends on the other:

* the policy: :class:`GaussianPolicy` π_θ(a|s) = N(μ_θ(s), diag σ_θ²), :func:`gaussian_log_prob`,
  :func:`gaussian_entropy`, :func:`stacked_policy` (the policies of many tasks at once, for rollouts);
* REINFORCE (paper, equations 7–8): :func:`trajectory_advantage`, :func:`reinforce_surrogate`, :func:`magic_box`;
* rollouts on gymnasium simulators: :class:`EnvSpec`, :class:`EnvPool` (stepping the environments together
  through a batch class where the spec has one), :class:`Rollout`;
* the paper's performance metric (appendix C): :func:`performance`.

Nothing here knows a task, a loss or a baseline: only torch, numpy and a gymnasium-style ``reset``/``step``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


# -- the policy -----------------------------------------------------------------------------------------------
class GaussianPolicy(nn.Module):
    """π_θ(a|s) = N(μ_θ(s), diag σ_θ²): MLP mean, state-independent learned log σ (CleanRL's PPO actor).

    ``forward(obs[..., obs_dim])`` returns ``(mu[..., act_dim], sigma[..., act_dim])``.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], init_log_std: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim
        for h in hidden:
            linear = nn.Linear(width, h)
            _orthogonal(linear, math.sqrt(2))
            layers += [linear, nn.Tanh()]
            width = h
        head = nn.Linear(width, act_dim)
        _orthogonal(head, 0.01)  # near-zero initial mean: every policy starts close to "do nothing"
        self.mean = nn.Sequential(*layers, head)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init_log_std)))

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """(μ_θ(s), σ_θ) for observations ``[..., obs_dim]``, σ broadcast to μ's shape."""
        mu = self.mean(obs)
        return mu, self.log_std.exp().expand_as(mu)


def stacked_policy(policy: GaussianPolicy, theta: dict[str, Tensor]) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """``obs [n, E, obs_dim] -> (mu, sigma) [n, E, act_dim]`` for θ with a leading task axis ``n``: the same
    numbers as ``vmap(lambda θ, s: functional_call(policy, θ, (s,)))(theta, obs)``, bit for bit, for rollouts.

    Why: a rollout calls the policy once per time step, and ``vmap`` with ``functional_call`` costs ~0.8 ms of
    Python per call (swapping θ into the module, flattening pytrees), ten times the arithmetic of the small MLP.
    This runs the kernels that ``vmap`` lowers each layer to (``bmm`` with the transposed weights, then the bias
    added; tanh; exp of log σ), without that overhead (``tests/test_mujoco_batch.py`` compares the two). Not for
    gradients: a rollout takes no gradient through the policy.
    """
    # per layer, once per rollout: (W^T [n, in, out], b [n, 1, out]) of a linear layer, or the activation
    layers: list[tuple[Tensor, Tensor] | nn.Module] = [
        (theta[f"mean.{name}.weight"].transpose(1, 2), theta[f"mean.{name}.bias"].unsqueeze(1))
        if isinstance(layer, nn.Linear)
        else layer
        for name, layer in policy.mean.named_children()
    ]
    sigma = theta["log_std"].exp().unsqueeze(1)  # [n, 1, act_dim]

    def forward(obs: Tensor) -> tuple[Tensor, Tensor]:
        x = obs
        for layer in layers:
            if isinstance(layer, tuple):
                weight_t, bias = layer
                x = torch.bmm(x, weight_t) + bias
            else:
                x = layer(x)
        return x, sigma.expand_as(x)

    return forward


def _orthogonal(linear: nn.Linear, gain: float) -> None:
    with torch.no_grad():
        nn.init.orthogonal_(linear.weight, gain)
        linear.bias.zero_()


def gaussian_log_prob(action: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    """log N(a; μ, diag σ²), summed over the last (action) axis."""
    return (-0.5 * ((action - mu) / sigma) ** 2 - sigma.log() - 0.5 * LOG_2PI).sum(-1)


def gaussian_entropy(sigma: Tensor) -> Tensor:
    """Entropy of N(·, diag σ²), summed over the last axis."""
    return (sigma.log() + 0.5 * (1.0 + LOG_2PI)).sum(-1)


# -- REINFORCE (equations 7–8) ----------------------------------------------------------------------------------
AdvantageMode = Literal["return", "baseline", "normalized", "to_go"]


def trajectory_advantage(returns: Tensor, mode: AdvantageMode) -> Tensor:
    """A(τ) per episode from the returns R_g(τ) ``[E]``: R, R − mean R, or (R − mean R) / std R (variance reduction;
    the mean over the same episodes is the usual, slightly biased, batch baseline)."""
    if mode == "return":
        return returns
    centred = returns - returns.mean()
    if mode == "baseline":
        return centred
    return centred / (returns.std(unbiased=False) + 1e-8)


def reinforce_surrogate(log_prob: Tensor, advantage: Tensor) -> Tensor:
    """−mean_τ [A(τ) Σ_t log π(a_t|s_t)] for ``log_prob[E, T]`` and per-episode ``advantage[E]`` (no gradient
    flows into A): its gradient is the REINFORCE estimator −mean_τ A(τ) Σ_t ∇ log π(a_t|s_t). A per-step
    ``advantage[E, T]`` (reward-to-go) gives −mean_τ Σ_t A_t log π(a_t|s_t)."""
    if advantage.shape == log_prob.shape:
        return -(advantage.detach() * log_prob).sum(-1).mean()
    return -(advantage.detach() * log_prob.sum(-1)).mean()


def magic_box(value: Tensor, surrogate: Tensor) -> Tensor:
    """A scalar whose value is ``value`` and whose gradient is ∇ ``surrogate``."""
    return value.detach() + surrogate - surrogate.detach()


# -- the environments -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EnvSpec:
    """What the task needs to know about one goal-conditioned simulator."""

    obs_dim: int
    act_dim: int
    make: Callable[[], Any]  # a fresh gymnasium env (no time limit: the collector steps exactly ``horizon``)
    metric: Literal["neg_distance", "distance_gain"]
    goal_features: tuple[int, int] = (4, 5)  # where the goal (x, y) sits in the observation (its scale for g)
    # steps reset envs together, the same trajectories as their ``step`` (:class:`ml3cli.envs.mujoco_batch.MujocoBatch`)
    batch: Callable[..., Any] | None = None


# -- rollouts -------------------------------------------------------------------------------------------------
class Rollout(NamedTuple):
    """Episodes of every task's policy; shapes with the task axis ``n``, ``E`` episodes of ``T`` steps."""

    obs: Tensor  # [n, E, T, obs_dim]  s_t
    action: Tensor  # [n, E, T, act_dim]  a_t as sampled (before the simulator's clipping)
    reward: Tensor  # [n, E, T]  R_g(s_{t+1}, a_t)
    distance: Tensor  # [n, E, T]  d after step t
    start_distance: Tensor  # [n, E]  d at the reset


class EnvPool:
    """Gymnasium environments for ``n × E`` parallel episodes, stepped together with one batched policy call per
    time step (gymnasium's vector envs would step them in the same Python loop, without the batching).

    Where the spec has a ``batch`` class and ``batched`` is on, the environments are reset through gymnasium and
    then stepped by it, all at once (the same trajectories, without gymnasium's Python per step; on ``threads``
    threads when more than 1 and the batch class is threaded); otherwise each through its gymnasium ``step``.
    """

    def __init__(self, spec: EnvSpec, batched: bool = True, threads: int = 1):
        self.spec = spec
        self.envs: list[Any] = []
        self.batched = batched and spec.batch is not None
        self.threads = threads
        self.threaded = self.batched and getattr(spec.batch, "threaded", False) and self.threads > 1
        self._executor = ThreadPoolExecutor(self.threads, "ml3-sim") if self.threaded else None

    def rollout(
        self,
        policy: Callable[[Tensor], tuple[Tensor, Tensor]],
        goals: Tensor,
        episodes: int,
        horizon: int,
        gen: torch.Generator,
    ) -> Rollout:
        """Roll out ``policy(obs[n, E, obs_dim]) -> (mu, sigma)`` for ``episodes`` episodes per goal ``goals[n, 2]``.

        All randomness comes from ``gen``: one reset seed per episode, then ε ~ N(0, I) per step. The simulator
        gets the action clipped to its action space (what MuJoCo's ctrlrange does to it anyway). An episode whose
        action is not finite (a diverged θ) is not stepped further and records NaN rewards and distances from
        there: MuJoCo would reset the robot and report the distance of its rest pose, a finite number that a
        learning-rate search could take for a result.
        """
        n = goals.shape[0]
        count = n * episodes
        while len(self.envs) < count:
            self.envs.append(self.spec.make())
        dtype = torch.get_default_dtype()
        seeds = torch.randint(0, 2**31 - 1, (count,), generator=gen).tolist()
        goal_np = goals.detach().cpu().double().numpy()
        obs = np.empty((count, self.spec.obs_dim))
        start = np.empty(count)
        for j, env in enumerate(self.envs[:count]):
            obs[j], info = env.reset(seed=seeds[j], options={"goal": goal_np[j // episodes]})
            start[j] = info["distance"]
        observations, actions = [], []
        rewards = np.empty((count, horizon))
        distances = np.empty((count, horizon))
        diverged = np.zeros(count, dtype=bool)
        space = self.envs[0].action_space
        batch = self.spec.batch(self.envs[:count], self.threads, self._executor) if self.batched else None
        for t in range(horizon):
            state = torch.as_tensor(obs, dtype=dtype).reshape(n, episodes, -1)
            with torch.no_grad():
                mu, sigma = policy(state)
                action = mu + sigma * torch.randn(mu.shape, generator=gen, dtype=dtype)
            observations.append(state)
            actions.append(action)
            action_np = action.reshape(count, -1).double().numpy()
            diverged |= ~np.isfinite(action_np).all(axis=1)
            applied = np.clip(action_np, space.low, space.high)
            if batch is not None:
                obs, rewards[:, t], distances[:, t] = batch.step(applied, ~diverged)
                rewards[diverged, t] = distances[diverged, t] = np.nan
                continue
            for j, env in enumerate(self.envs[:count]):
                if diverged[j]:
                    rewards[j, t] = distances[j, t] = np.nan
                    continue
                obs[j], rewards[j, t], _, _, info = env.step(applied[j])
                distances[j, t] = info["distance"]
        as_tensor = lambda a: torch.as_tensor(a, dtype=dtype).reshape(n, episodes, *a.shape[1:])  # noqa: E731
        return Rollout(
            torch.stack(observations, 2),
            torch.stack(actions, 2),
            as_tensor(rewards),
            as_tensor(distances),
            as_tensor(start),
        )


def performance(distance: Tensor, start_distance: Tensor, metric: str) -> Tensor:
    """The paper's performance metric per episode (higher is better): Σ_t −d_t, or Σ_t (d_0 − d_t)."""
    if metric == "neg_distance":
        return -distance.sum(-1)
    return (start_distance.unsqueeze(-1) - distance).sum(-1)
