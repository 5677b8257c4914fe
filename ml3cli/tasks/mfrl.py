"""Model-free RL with a learned loss (paper, sections 3.2.2 and 4.1.3, algorithms 4 and 5, appendices A and C).

Data sheet
    Tasks: ``reacher_goal_mf`` (gymnasium's Reacher-v5, goal per task in a disc of reachable positions) and
    ``ant_goal`` (gymnasium's Ant-v5, goal on a circle around the start); see ``ml3cli/envs/``. A task is a goal g.
    Optimizee: a Gaussian policy π_θ(a|s) = N(μ_θ(s), diag σ_θ²): an MLP mean (tanh, ``hidden``) and a learned,
    state-independent log σ, initialised as CleanRL's PPO (orthogonal, gain √2, mean head gain 0.01). The policy,
    its log-probability, the REINFORCE pieces, the rollouts and the metric are :mod:`ml3cli.rl`'s, shared with PPO.
    Data: ``collect`` rolls out the current policy of every task on the real simulator (``episodes`` episodes of
    ``horizon`` steps; actions a = μ + σ ε, ε from the engine's generator, clipped to [−1, 1] by the simulator).
    Loss inputs (appendix A): per sampled step, the state s, the sampled action a, the policy's μ_θ(s) and σ_θ, and
    the goal g: M_φ(s, a, μ, σ, g) (μ and σ rather than π(a|s): the paper found them to work better).
    Options (all off by default): ``loss_reward`` adds a normalised return / reward-to-go input R (the
    paper's algorithm 4 hands R_i to the update); ``loss_state_scale`` rescales the s and g that M_φ sees
    (ReacherGoal's raw goal offsets are ~0.1 m beside joint velocities of ~10 rad/s); ``advantage: to_go`` is
    the causal, per-step REINFORCE task loss (less variance than the trajectory return).
    Inner step: one SGD step on M_φ over the latest rollout (the minibatch is the whole rollout), then a new rollout.
    Task loss (equations 7–8): the REINFORCE surrogate −mean_τ [A(τ) Σ_t log π_θ'(a_t|s_t)] on a fresh rollout,
    A(τ) = R_g(τ) − b (``advantage``: raw return, minus the mean return over the rollout's episodes, or that
    divided by their standard deviation). Its VALUE is replaced by the negated performance metric (a "magic box":
    value + surrogate − stop_gradient(surrogate)), so the meta-training curves and ``ml3 meta-test`` show the
    paper's metric while ∇_θ' is exactly the REINFORCE estimator. With ``inner.task_loss_at: every`` L_T is the
    mean over the inner steps (algorithm 4).
    Metric (appendix C): ReacherGoal the trajectory sum of negative distances Σ_t −d_t, AntGoal the trajectory sum
    of (initial − current) distances Σ_t (d_0 − d_t), each averaged over the evaluation episodes; ``report_metrics``
    gives it as ``performance`` (higher is better) with the mean return R_g(τ) as ``return``.
    Built-in loss: ``likelihood`` (−log π(a|s) of the own samples, no reward signal) only fills the engine's
    baseline slot; the model-free baseline is PPO (``ml3cli/baselines/ppo.py``, ``ml3 reproduce mfrl``).
    Environment samples: every simulator step of every rollout (``collect`` for the inner steps and for the task
    loss, and PPO's rollouts through :meth:`ModelFreeRL.rollout`) adds to ``environment_samples``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from pydantic import Field, PositiveInt, field_validator, model_validator
from torch import Tensor, nn
from torch.func import functional_call

from ml3cli.errors import ML3Error
from ml3cli.metaloss import LossInput
from ml3cli.rl import (
    AdvantageMode,
    EnvPool,
    EnvSpec,
    GaussianPolicy,
    Rollout,
    gaussian_log_prob,
    magic_box,
    performance,
    reinforce_surrogate,
    stacked_policy,
    trajectory_advantage,
)
from ml3cli.tasks.base import Task, TaskOptions, Theta

RewardInput = Literal["none", "return", "to_go"]


# -- the environments -----------------------------------------------------------------------------------------
# The simulator's module is imported when the task is built (a missing simulator is refused before any work),
# its environments are made when rollouts need them.
def _reacher_spec(options: Any) -> EnvSpec:
    from ml3cli.envs.reacher_goal_mf import ReacherGoalMFBatch, ReacherGoalMFEnv

    return EnvSpec(10, 2, ReacherGoalMFEnv, "neg_distance", batch=ReacherGoalMFBatch)


def _ant_spec(options: Any) -> EnvSpec:
    from ml3cli.envs.ant_goal import AntGoalBatch, AntGoalEnv

    radius = options.goal_radius[1]
    return EnvSpec(31, 8, lambda: AntGoalEnv(goal_radius=radius), "distance_gain", (29, 30), AntGoalBatch)


# -- the task family ------------------------------------------------------------------------------------------
class MFRLBatch(NamedTuple):
    """Goals and the latest rollout; shapes with the task axis ``n`` (``sample_tasks`` fills the rollout with
    zeros of the ``episodes`` shape: :meth:`ModelFreeRL.collect` replaces it before any use)."""

    goal: Tensor  # [n, 2]
    obs: Tensor  # [n, E, T, obs_dim]
    action: Tensor  # [n, E, T, act_dim]
    reward: Tensor  # [n, E, T]
    distance: Tensor  # [n, E, T]
    start_distance: Tensor  # [n, E]


def _check_radius(value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if not 0 <= low <= high:
        raise ValueError(f"expected 0 <= low <= high, got {value}")
    return value


class MFRLOptions(TaskOptions):
    """Settings shared by the model-free RL tasks."""

    hidden: list[PositiveInt] = Field([64, 64], description="hidden widths of the policy's mean (tanh)")
    init_log_std: float = Field(0.0, description="initial log σ of the Gaussian policy (CleanRL: 0)")
    episodes: PositiveInt = Field(4, description="episodes per inner update (samples per update: episodes × horizon)")
    task_loss_episodes: PositiveInt = Field(4, description="episodes of the rollout the task loss is measured on")
    horizon: PositiveInt = Field(50, description="steps per episode")
    advantage: AdvantageMode = Field(
        "normalized",
        description="A(τ) in the REINFORCE task loss: return, baseline (minus mean), normalized, or to_go (per "
        "step: the reward-to-go minus its mean over the episodes at that step, normalised; less variance)",
    )
    loss_reward: RewardInput = Field(
        "none",
        description="a reward signal for M_φ (an input R per sample): none (appendix A's M_φ(s, a, μ, σ, g)), "
        "return (the normalised return of the sample's episode) or to_go (the normalised reward-to-go)",
    )
    loss_state_scale: list[float] | None = Field(
        None,
        description="per-feature factors for the state s and the goal g that M_φ sees (s: one per observation "
        "feature, g: the factors of the observation's goal features), so that its inputs are O(1); "
        "the policy still sees the raw observation. None: unscaled",
    )

    @model_validator(mode="after")
    def _baseline_needs_episodes(self):
        if self.advantage != "return" and self.task_loss_episodes < 2:
            raise ValueError(f"advantage {self.advantage!r} needs task_loss_episodes >= 2 (a mean over episodes)")
        if self.loss_reward != "none" and self.episodes < 2:
            raise ValueError(f"loss_reward {self.loss_reward!r} needs episodes >= 2 (it is normalised over episodes)")
        return self


class ReacherGoalOptions(MFRLOptions):
    goal_radius: tuple[float, float] = Field(
        (0.05, 0.2), description="goals uniform in the annulus r ∈ [low, high] m around the base (reach 0.21)"
    )
    horizon: PositiveInt = Field(50, le=1000, description="steps per episode (gymnasium's Reacher: 50)")

    _radius = field_validator("goal_radius")(_check_radius)


class AntGoalOptions(MFRLOptions):
    goal_radius: tuple[float, float] = Field(
        (2.0, 2.0), description="goals on the circle(s) r ∈ [low, high] m around the start (paper: a circle)"
    )
    horizon: PositiveInt = Field(200, description="steps per episode")
    sim_threads: PositiveInt = Field(
        1,
        le=256,
        description="threads that step a rollout's ants in MuJoCo (the same numbers for any count); more than 1 "
        "pays only where cores are idle: on a shared 2-core machine it gained nothing measurable (docs/speed.md)",
    )

    _radius = field_validator("goal_radius")(_check_radius)

    @model_validator(mode="after")
    def _one_circle(self):
        if self.goal_radius[0] != self.goal_radius[1]:
            raise ValueError("goal_radius: the ant's goals lie on one circle, give [r, r]")
        return self


def policy_loss_inputs(obs_dim: int, act_dim: int) -> tuple[LossInput, ...]:
    """M_φ(s, a, μ, σ, g): one row per sampled step (appendix A)."""
    return (
        LossInput("s", obs_dim, "state s_t"),
        LossInput("a", act_dim, "sampled action a_t"),
        LossInput("mu", act_dim, "policy mean μ_θ(s_t)"),
        LossInput("sigma", act_dim, "policy standard deviation σ_θ"),
        LossInput("g", 2, "goal g"),
    )


REWARD_INPUT = LossInput("R", 1, "the sample's normalised return or reward-to-go (option loss_reward)")


def reward_input(reward: Tensor, mode: RewardInput) -> Tensor:
    """The reward signal M_φ sees per sample, ``[E, T]`` from the rollout's rewards ``[E, T]`` of ONE task.

    Why: without it M_φ(s, a, μ, σ, g) is a fixed function of the policy, and SGD on it converges to the policy
    that minimises it, however good that is; with it the loss can weigh its samples by how well they did (as a
    policy gradient does), so training can go on improving on new goals. ``return``: A(τ) of the sample's episode,
    (R − mean R) / std R over the rollout's episodes (the task loss's ``normalized`` advantage); ``to_go``: the
    reward-to-go Σ_{t' ≥ t} r_t' minus its mean over the episodes at the same t, divided by the std of that over
    all samples (normalised, so that M_φ sees O(1) values whatever the reward's scale).
    """
    if mode == "return":
        return trajectory_advantage(reward.sum(-1), "normalized").unsqueeze(-1).expand_as(reward)
    to_go = reward.flip(-1).cumsum(-1).flip(-1)
    centred = to_go - to_go.mean(0, keepdim=True)
    return centred / (centred.pow(2).mean().sqrt() + 1e-8)


def likelihood(s: Tensor, a: Tensor, mu: Tensor, sigma: Tensor, g: Tensor, R: Tensor | None = None) -> Tensor:
    """−mean log π(a|s): maximum likelihood of the policy's own samples, a reference with no reward signal."""
    return -gaussian_log_prob(a, mu, sigma).mean()


class ModelFreeRL(Task):
    """Goal-conditioned model-free RL on a gymnasium simulator (shared by ReacherGoal and AntGoal)."""

    summary = "model-free RL: Gaussian policy, REINFORCE task loss on real rollouts (paper 4.1.3)"
    metric = "Σ_t d_t (gradient: REINFORCE)"
    builtin_losses = {"likelihood": likelihood}
    collects_data: ClassVar[bool] = True
    spec_factory: ClassVar[Callable[[Any], EnvSpec]]

    def __init__(self, options: TaskOptions | None = None, device: torch.device | str = "cpu"):
        options = options if options is not None else self.Options()
        self.spec = type(self).spec_factory(options)
        super().__init__(options, device)
        self.pool = EnvPool(self.spec, threads=getattr(self.options, "sim_threads", 1))
        scale = self.options.loss_state_scale
        if scale is not None and len(scale) != self.spec.obs_dim:
            raise ML3Error(
                f"task_options.loss_state_scale: {len(scale)} factors given, the observation has {self.spec.obs_dim}"
            )
        self._state_scale = None if scale is None else torch.tensor(scale, device=self.device)

    @classmethod
    def inputs_for(cls, options: TaskOptions) -> tuple[LossInput, ...]:
        if getattr(options, "loss_reward", "none") == "none":
            return cls.loss_inputs_spec
        return (*cls.loss_inputs_spec, REWARD_INPUT)

    def build_optimizee(self) -> nn.Module:
        return GaussianPolicy(self.spec.obs_dim, self.spec.act_dim, self.options.hidden, self.options.init_log_std)

    def policy(self, theta: Theta, obs: Tensor) -> tuple[Tensor, Tensor]:
        """(μ_θ(s), σ_θ) for ONE task."""
        return functional_call(self.optimizee, theta, (obs,))

    def sample_goals(self, n: int, generator: torch.Generator) -> Tensor:
        low, high = self.options.goal_radius
        angle = 2 * math.pi * torch.rand(n, generator=generator)
        # uniform over the annulus' area: r² uniform in [low², high²]
        radius = (low**2 + (high**2 - low**2) * torch.rand(n, generator=generator)).sqrt()
        return torch.stack([radius * angle.cos(), radius * angle.sin()], -1)

    def sample_tasks(self, n: int, generator: torch.Generator) -> MFRLBatch:
        o, s = self.options, self.spec
        zeros = lambda *shape: torch.zeros(n, o.episodes, *shape, device=self.device)  # noqa: E731
        return MFRLBatch(
            self.sample_goals(n, generator).to(self.device),
            zeros(o.horizon, s.obs_dim),
            zeros(o.horizon, s.act_dim),
            zeros(o.horizon),
            zeros(o.horizon),
            zeros(),
        )

    def rollout(
        self,
        theta: Theta,
        goals: Tensor,
        episodes: int,
        generator: torch.Generator,
        observe: Callable[[Tensor], Tensor] | None = None,
    ) -> Rollout:
        """``episodes`` episodes of every task's policy (θ with a leading task axis) on the simulator; the policy
        sees ``observe(obs[n, E, obs_dim])`` where given (PPO's observation normalisation), the returned rollout
        holds the raw observations. Every simulator step is counted in ``environment_samples``."""
        batched = stacked_policy(self.optimizee, theta)  # vmap(self.policy)(theta, ·) without vmap's overhead
        policy = batched if observe is None else (lambda obs: batched(observe(obs)))
        self.environment_samples += goals.shape[0] * episodes * self.options.horizon
        return self.pool.rollout(policy, goals, episodes, self.options.horizon, generator)

    def collect(self, theta: Theta, batch: MFRLBatch, generator: torch.Generator, purpose: str) -> MFRLBatch:
        episodes = self.options.episodes if purpose == "inner" else self.options.task_loss_episodes
        data = self.rollout(theta, batch.goal, episodes, generator)
        return batch._replace(**{k: v.to(self.device) for k, v in data._asdict().items()})

    def loss_inputs(self, theta: Theta, task: MFRLBatch) -> dict[str, Tensor]:
        s = task.obs.reshape(-1, task.obs.shape[-1])
        a = task.action.reshape(-1, task.action.shape[-1])
        mu, sigma = self.policy(theta, s)
        g = task.goal.expand(s.shape[0], 2)
        if self._state_scale is not None:  # raw, the goal offsets (~0.1 m) vanish beside the velocities (~10 rad/s)
            s = s * self._state_scale.to(s.dtype)
            g = g * self._state_scale[list(self.spec.goal_features)].to(g.dtype)
        inputs = {"s": s, "a": a, "mu": mu, "sigma": sigma, "g": g}
        if self.options.loss_reward != "none":
            inputs["R"] = reward_input(task.reward, self.options.loss_reward).reshape(-1, 1)
        return inputs

    def log_prob(self, theta: Theta, task: MFRLBatch) -> Tensor:
        """log π_θ(a_t|s_t) ``[E, T]`` of the rollout's actions."""
        mu, sigma = self.policy(theta, task.obs)
        return gaussian_log_prob(task.action, mu, sigma)

    def task_loss(self, theta: Theta, task: MFRLBatch) -> Tensor:
        if self.options.advantage == "to_go":  # causality: a_t is credited only with the rewards after it
            advantage = reward_input(task.reward, "to_go")
        else:
            advantage = trajectory_advantage(task.reward.sum(-1), self.options.advantage)
        surrogate = reinforce_surrogate(self.log_prob(theta, task), advantage)
        value = -performance(task.distance, task.start_distance, self.spec.metric).mean()
        return magic_box(value, surrogate)

    def report_metrics(self, theta: Theta, task: MFRLBatch) -> dict[str, Tensor]:
        return {
            "performance": performance(task.distance, task.start_distance, self.spec.metric).mean(),
            "return": task.reward.sum(-1).mean(),
        }


class ReacherGoalMF(ModelFreeRL):
    """ReacherGoal (paper, appendix C): 2-link arm, goal per task, R_g = −d + 1/(d + 0.001) − |a|."""

    name = "reacher_goal_mf"
    summary = "ReacherGoal model-free: Gaussian policy on gymnasium's Reacher, REINFORCE task loss (paper 4.1.3)"
    Options = ReacherGoalOptions
    spec_factory = staticmethod(_reacher_spec)
    loss_inputs_spec = policy_loss_inputs(10, 2)


class AntGoal(ModelFreeRL):
    """AntGoal (paper, appendix C): quadruped runs to a goal on a circle, R_g = −d + 5/(d + 0.25) − |a|."""

    name = "ant_goal"
    summary = "AntGoal model-free: Gaussian policy on gymnasium's Ant, REINFORCE task loss (paper 4.1.3)"
    metric = "Σ_t (d_t − d_0) (gradient: REINFORCE)"
    Options = AntGoalOptions
    spec_factory = staticmethod(_ant_spec)
    loss_inputs_spec = policy_loss_inputs(31, 8)
