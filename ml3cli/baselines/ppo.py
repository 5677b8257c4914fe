"""PPO, the model-free baseline of the paper's figure 4a–b (Schulman et al., 2017), on the same rollouts as ML³.

The objective is written here as pure functions (tested against hand-computed values in ``tests/test_ppo.py``):

    r_t(θ)   = π_θ(a_t|s_t) / π_θold(a_t|s_t)
    L_clip   = −mean_t min(r_t Â_t, clip(r_t, 1 − ε, 1 + ε) Â_t)                       (clipped surrogate)
    δ_t      = r_t + γ V(s_{t+1}) − V(s_t),  Â_t = Σ_l (γλ)^l δ_{t+l}                  (GAE; episode ends are terminal)
    L_V      = ½ mean_t max((V − R̂)², (V_old + clip(V − V_old, −ε, ε) − R̂)²)           (clipped value loss)
    L        = L_clip − c_H · entropy + c_V · L_V

The setup is the whole of CleanRL's ``ppo_continuous_action.py`` (vwxyzjn/cleanrl): Adam 3e-4 (eps 1e-5) annealed
linearly to 0 over the run's updates (pass the run's whole budget as ``updates``), γ 0.99, λ 0.95, 2,048 samples
per update in 32 minibatches, 10 epochs, clip 0.2 (also on the value), entropy 0, value weight 0.5, gradient norm
0.5, advantages normalised per minibatch, a separate 64-64 tanh critic with CleanRL's orthogonal init, and its
environment wrappers: observations normalised by their running mean and variance and clipped to ±10
(``NormalizeObservation``, ``TransformObservation``), rewards scaled by the running std of the discounted return
and clipped to ±10 (``NormalizeReward``, ``TransformReward``). Episodes are whole here (the task's ``horizon``), so
an update rolls out ⌈2048 / horizon⌉ episodes per goal (ReacherGoal: 41 × 50 = 2,050 samples); the policy is the
task's (same architecture and θ₀ as the learned loss's), fed the normalised observation. ``steps_per_update=None``
uses the task's own ``episodes × horizon`` instead (the learned loss's samples per update).

:func:`train_ppo` trains one policy per goal of a task batch at once: θ and the critic's ψ are stacked on a task
axis, the per-task losses are summed (the tasks share no parameter, and Adam is element-wise, so this equals
independent runs) and the gradient norm is clipped per task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ml3cli.rl import gaussian_entropy, gaussian_log_prob, performance
from ml3cli.tasks.base import Theta
from ml3cli.tasks.mfrl import MFRLBatch, ModelFreeRL


@dataclass(frozen=True)
class PPOConfig:
    """PPO's settings (defaults: CleanRL's ``ppo_continuous_action.py``)."""

    lr: float = 3e-4  #: Adam's learning rate
    adam_eps: float = 1e-5  #: Adam's ε
    anneal_lr: bool = True  #: decay the learning rate linearly to 0 over the updates (the run's whole budget)
    steps_per_update: int | None = 2048  #: samples per goal per update (whole episodes: ⌈this / horizon⌉ of them)
    gamma: float = 0.99  #: discount γ
    gae_lambda: float = 0.95  #: GAE's λ
    update_epochs: int = 10  #: passes over each rollout
    num_minibatches: int = 32  #: minibatches per epoch (CleanRL: 2048 samples in minibatches of 64)
    clip_coef: float = 0.2  #: ε of the clipped surrogate (and of the value clipping)
    clip_vloss: bool = True  #: clip the value loss as well
    ent_coef: float = 0.0  #: c_H, weight of the entropy bonus
    vf_coef: float = 0.5  #: c_V, weight of the value loss
    max_grad_norm: float = 0.5  #: clip each task's gradient to this global norm
    norm_adv: bool = True  #: normalise advantages per minibatch
    normalize_reward: bool = True  #: scale rewards by the running std of the discounted return
    clip_reward: float | None = 10.0  #: clip the scaled rewards to ± this (None: no clipping)
    normalize_obs: bool = True  #: normalise observations by their running mean and variance
    clip_obs: float | None = 10.0  #: clip the normalised observations to ± this (None: no clipping)
    value_hidden: tuple[int, ...] = (64, 64)  #: the critic's hidden widths (tanh)


# -- the objective (pure functions) ---------------------------------------------------------------------------
def gae(rewards: Tensor, values: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over episodes ``[..., T]`` that end (terminally) after step T − 1.

    Returns ``(advantages, returns)`` with returns = advantages + values (the critic's regression targets).
    """
    steps = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(steps)):
        next_value = values[..., t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[..., t] + gamma * next_value - values[..., t]
        running = delta + gamma * lam * running
        advantages[..., t] = running
    return advantages, advantages + values


def clipped_surrogate(log_prob: Tensor, old_log_prob: Tensor, advantage: Tensor, clip: float) -> Tensor:
    """L_clip = −mean min(r Â, clip(r, 1 − ε, 1 + ε) Â), r = exp(log π − log π_old)."""
    ratio = (log_prob - old_log_prob).exp()
    return -torch.min(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage).mean()


def value_loss(value: Tensor, old_value: Tensor, returns: Tensor, clip: float, clipped: bool = True) -> Tensor:
    """½ mean max((V − R̂)², (V_old + clip(V − V_old, −ε, ε) − R̂)²), or ½ mean (V − R̂)² unclipped."""
    unclipped = (value - returns) ** 2
    if not clipped:
        return 0.5 * unclipped.mean()
    bounded = old_value + (value - old_value).clamp(-clip, clip)
    return 0.5 * torch.max(unclipped, (bounded - returns) ** 2).mean()


def normalize(advantage: Tensor) -> Tensor:
    """(Â − mean) / (std + 1e-8), std with Bessel's correction (as CleanRL)."""
    return (advantage - advantage.mean()) / (advantage.std() + 1e-8)


def ppo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantage: Tensor,
    value: Tensor,
    old_value: Tensor,
    returns: Tensor,
    entropy: Tensor,
    config: PPOConfig,
) -> Tensor:
    """L = L_clip − c_H · mean entropy + c_V · L_V for one minibatch of one task."""
    if config.norm_adv:
        advantage = normalize(advantage)
    policy = clipped_surrogate(log_prob, old_log_prob, advantage, config.clip_coef)
    critic = value_loss(value, old_value, returns, config.clip_coef, config.clip_vloss)
    return policy - config.ent_coef * entropy.mean() + config.vf_coef * critic


# -- the critic and reward scaling ----------------------------------------------------------------------------
class ValueNet(nn.Module):
    """V_ψ(s): an MLP (tanh) with CleanRL's critic init (orthogonal, gain √2, output gain 1)."""

    def __init__(self, obs_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, 1))
        with torch.no_grad():
            for layer in layers:
                if isinstance(layer, nn.Linear):
                    nn.init.orthogonal_(layer.weight, 1.0 if layer is layers[-1] else math.sqrt(2))
                    layer.bias.zero_()
        self.net = nn.Sequential(*layers)

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(obs).squeeze(-1)


class RewardScaler:
    """Gymnasium's ``NormalizeReward`` for a batch of tasks: r / sqrt(Var[discounted return] + 1e-8), per task, with
    the variance's running estimate updated from every step of every episode (episodes start from a zero return)."""

    def __init__(self, n: int, gamma: float):
        self.gamma = gamma
        self.count = np.full(n, 1e-4)
        self.mean = np.zeros(n)
        self.var = np.ones(n)

    def __call__(self, rewards: Tensor) -> Tensor:
        """``rewards[n, E, T]`` → scaled rewards of the same shape (updates the running statistics first)."""
        r = rewards.double().cpu().numpy()
        discounted = np.zeros_like(r)
        running = np.zeros(r.shape[:-1])
        for t in range(r.shape[-1]):
            running = self.gamma * running + r[..., t]
            discounted[..., t] = running
        flat = discounted.reshape(r.shape[0], -1)
        batch_mean, batch_var, batch_count = flat.mean(1), flat.var(1), flat.shape[1]
        delta = batch_mean - self.mean
        total = self.count + batch_count
        self.mean = self.mean + delta * batch_count / total
        m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
        self.var, self.count = m2 / total, total
        scale = torch.as_tensor(1 / np.sqrt(self.var + 1e-8), dtype=rewards.dtype)
        return rewards * scale.view(-1, *([1] * (rewards.ndim - 1)))


class ObservationNormalizer:
    """Gymnasium's ``NormalizeObservation`` (then ``TransformObservation`` clipping) for a batch of tasks: per task,
    (s − mean) / sqrt(var + 1e-8) clipped to ± ``clip``, the running mean and variance (prior: count 1e-4, mean 0,
    var 1) updated with every observation the policy sees while training. ``training=False`` (the evaluation
    rollouts) uses the statistics without updating them. ``seen`` keeps the normalised observations of the current
    training rollout, ``[n, E, obs_dim]`` per time step, which are what the policy acted on."""

    def __init__(self, n: int, obs_dim: int, clip: float | None):
        self.clip = clip
        self.count = torch.full((n, 1), 1e-4, dtype=torch.float64)
        self.mean = torch.zeros(n, obs_dim, dtype=torch.float64)
        self.var = torch.ones(n, obs_dim, dtype=torch.float64)
        self.training = True
        self.seen: list[Tensor] = []

    def __call__(self, obs: Tensor) -> Tensor:
        """``obs[n, E, obs_dim]`` → normalised observations of the same shape and dtype."""
        x = obs.double()
        if self.training:
            batch_mean, batch_var, batch_count = x.mean(1), x.var(1, unbiased=False), x.shape[1]
            delta = batch_mean - self.mean
            total = self.count + batch_count
            self.mean = self.mean + delta * batch_count / total
            m2 = self.var * self.count + batch_var * batch_count + delta**2 * self.count * batch_count / total
            self.var, self.count = m2 / total, total
        out = (x - self.mean.unsqueeze(1)) / (self.var.unsqueeze(1) + 1e-8).sqrt()
        if self.clip is not None:
            out = out.clamp(-self.clip, self.clip)
        out = out.to(obs.dtype)
        if self.training:
            self.seen.append(out)
        return out


# -- the trainer ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PPOResult:
    """``performance[update, task]`` and ``returns[update, task]`` measured before update 0 … after the last one
    (on fresh evaluation rollouts, as the learned loss's meta-test), and the samples each update consumed."""

    performance: np.ndarray
    returns: np.ndarray
    samples_per_update: int
    theta: Theta


def init_value(task: ModelFreeRL, n: int, hidden: tuple[int, ...], generator: torch.Generator) -> Theta:
    """``n`` critics' parameters ψ stacked on a leading axis, each initialised from ``generator``."""
    draws = []
    for _ in range(n):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (), generator=generator)))
            module = ValueNet(task.spec.obs_dim, hidden)
        draws.append({k: v.detach() for k, v in module.named_parameters()})
    return {k: torch.stack([d[k] for d in draws]) for k in draws[0]}


def _clip_per_task(params: list[Tensor], max_norm: float) -> None:
    """Scale the gradients of each task (leading axis) to at most ``max_norm`` in global norm."""
    squares = sum(p.grad.reshape(p.shape[0], -1).pow(2).sum(1) for p in params)
    scale = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(scale.view(-1, *([1] * (p.ndim - 1))))


def episodes_per_update(task: ModelFreeRL, config: PPOConfig) -> int:
    """Whole episodes per goal in one PPO update: ⌈steps_per_update / horizon⌉, or the task's own ``episodes``."""
    if config.steps_per_update is None:
        return task.options.episodes
    return max(2, math.ceil(config.steps_per_update / task.options.horizon))


def train_ppo(
    task: ModelFreeRL,
    theta: Theta,
    batch: MFRLBatch,
    updates: int,
    generator: torch.Generator,
    config: PPOConfig | None = None,
) -> PPOResult:
    """Train one policy per goal of ``batch`` from ``theta`` (leading task axis) with PPO for ``updates`` updates
    (the learning rate anneals to 0 over them: they are the run's whole budget).

    Each update rolls out :func:`episodes_per_update` episodes per goal with the task's own rollout code;
    performance is measured before the first and after every update on ``task_loss_episodes`` fresh episodes
    (the observation statistics frozen), as ``ml3 meta-test`` measures the learned loss. All randomness (rollouts,
    critic init, minibatch order) comes from ``generator``; the draws up to the first training rollout are the
    same as :func:`ml3cli.evaluate.train_curve`'s, so both start from the same evaluation rollout (exactly so
    without ``normalize_obs``; with it, θ₀ acts on obs / sqrt(1 + 1e-8) clipped to ±10, and an observation beyond
    ±10, such as the ant's joint velocities, changes the rollout).
    """
    config = config or PPOConfig()
    n = batch.goal.shape[0]
    theta = {k: v.detach().clone().requires_grad_() for k, v in theta.items()}
    critic = ValueNet(task.spec.obs_dim, config.value_hidden)
    # the critic draws from a copy of the generator, so that PPO's rollouts see the same randomness as the learned
    # loss's meta-test from the same state (the first evaluation rollout is the same)
    critic_generator = torch.Generator()
    critic_generator.set_state(generator.get_state())
    psi = {k: v.requires_grad_() for k, v in init_value(task, n, config.value_hidden, critic_generator).items()}
    params = list(theta.values()) + list(psi.values())
    optimizer = torch.optim.Adam(params, lr=config.lr, eps=config.adam_eps)
    scaler = RewardScaler(n, config.gamma) if config.normalize_reward else None
    normalizer = ObservationNormalizer(n, task.spec.obs_dim, config.clip_obs) if config.normalize_obs else None
    policy = vmap(task.policy)
    values_of = vmap(lambda psi, obs: functional_call(critic, psi, (obs,)))
    episodes = episodes_per_update(task, config)
    samples = episodes * task.options.horizon
    minibatch = math.ceil(samples / config.num_minibatches)
    perf, rets = [], []

    def rollout(count: int, training: bool):
        if normalizer is not None:
            normalizer.training, normalizer.seen = training, []
        with torch.no_grad():
            data = task.rollout({k: v.detach() for k, v in theta.items()}, batch.goal, count, generator, normalizer)
        obs = torch.stack(normalizer.seen, 2) if normalizer is not None and training else data.obs
        return data, obs

    def measure() -> None:
        data, _ = rollout(task.options.task_loss_episodes, training=False)
        perf.append(performance(data.distance, data.start_distance, task.spec.metric).mean(-1).numpy())
        rets.append(data.reward.sum(-1).mean(-1).numpy())

    for update in range(updates):
        measure()
        if config.anneal_lr:
            for group in optimizer.param_groups:
                group["lr"] = (1.0 - update / updates) * config.lr
        data, seen = rollout(episodes, training=True)
        with torch.no_grad():
            rewards = scaler(data.reward) if scaler is not None else data.reward
            if config.clip_reward is not None:
                rewards = rewards.clamp(-config.clip_reward, config.clip_reward)
            old_values = values_of(psi, seen)  # [n, E, T]
            advantages, returns = gae(rewards, old_values, config.gamma, config.gae_lambda)
            mu, sigma = policy(theta, seen)
            old_log_prob = gaussian_log_prob(data.action, mu, sigma)
        flat = lambda x: x.reshape(n, samples, *x.shape[3:])  # noqa: E731
        obs, action = flat(seen), flat(data.action)
        old_log_prob, advantages, returns, old_values = map(flat, (old_log_prob, advantages, returns, old_values))

        def loss_one(theta, psi, obs, action, old_log_prob, advantage, ret, old_value):
            mu, sigma = task.policy(theta, obs)
            value = functional_call(critic, psi, (obs,))
            log_prob = gaussian_log_prob(action, mu, sigma)
            return ppo_loss(log_prob, old_log_prob, advantage, value, old_value, ret, gaussian_entropy(sigma), config)

        batched_loss = vmap(loss_one)
        for _ in range(config.update_epochs):
            order = torch.randperm(samples, generator=generator)
            for start in range(0, samples, minibatch):
                idx = order[start : start + minibatch]
                if idx.numel() < 2:  # a normalised advantage needs two samples
                    continue
                loss = batched_loss(
                    theta, psi, obs[:, idx], action[:, idx], old_log_prob[:, idx], advantages[:, idx],
                    returns[:, idx], old_values[:, idx],
                ).sum()  # fmt: skip
                optimizer.zero_grad()
                loss.backward()
                _clip_per_task(params, config.max_grad_norm)
                optimizer.step()
    measure()
    return PPOResult(np.stack(perf), np.stack(rets), samples, {k: v.detach() for k, v in theta.items()})
