"""Model-based RL with a learned loss: PointmassGoal and ReacherGoal (paper, sections 3.2.1 and 4.1.2, figure 3,
algorithms 3 and 5, appendix B).

Data sheet
    Real system: :mod:`ml3cli.envs.pointmass` (2-D point mass, accelerations ±1, dt 0.1, 30 steps, start at rest
    at the origin) or :mod:`ml3cli.envs.reacher` (gymnasium's Reacher arm in MuJoCo, torques ±0.1 of the ctrl
    range, dt 0.01, 65 steps, start θ = (0, 0.5) at rest). A task is a goal g for the point / the fingertip, drawn
    uniformly in radius and angle from an annulus sector (``goal_radius``, ``goal_angle`` in degrees): meta-train
    on the right quadrant (−45°…45°), meta-test on the whole circle (most goals outside the meta-train region).
    Optimizee: a deterministic policy π_θ(s, g) = max_action · tanh(MLP(s, g)), ``policy_hidden`` tanh layers.
    Dynamics model P (:mod:`ml3cli.envs.dynamics_model`, only with ``system: model``): an ensemble of MLPs on
    (s, a) predicting Δs. At outer step 1 it is fitted on ``random_rollouts`` real rollouts of random actions
    (held for 5 steps) from random states; every ``refit_every`` outer steps it gets real rollouts of the current
    policies (on freshly drawn meta-train goals) and is refitted (algorithm 3, lines 10–11).
    Trajectory τ (``Task.collect``): ``system: model`` rolls π_θ out in P (meta-train, algorithm 3 line 5);
    ``system: real`` rolls it out on the real system (meta-test, algorithm 5: no model, no differentiation
    through a simulator). The states of τ are data; the loss inputs recompute the actions from them.
    ``inputs: relative`` (the recipes' choice) makes M_φ's inputs translation-invariant: the point mass's velocity
    (not its position) and the offset p − g; for the reacher the joint state and the offset in the goal's frame
    (rotated by the goal's angle γ, θ₁ as (cos, sin)(θ₁ − γ)), with the start angle θ₁ drawn per task
    (``start_range``, as the paper's ReacherGoal task distribution: an initial link configuration and a goal).
    Loss inputs (``inputs: absolute``), one row per time step t = 0 … T−1: the state s_t (``state``, 4, velocities scaled), the action
    a_t = π_θ(s_t, g) / max_action (``action``, 2, the only input that depends on θ), the position of the point
    or fingertip (``position``, 2) and the goal (``goal``, 2) in ``position_scale`` units, and the final distance
    of τ (``final_distance``, 1, the same on every row). With ``model_gradient: true`` the ``final_distance`` input
    is instead the final distance of π_θ rolled out in P, differentiable in θ: the model-based baseline.
    Task loss: the final distance ‖p_T − g‖ of a rollout of π_θ: in P and differentiable through P, the policy and
    the inner step (``system: model``), or of the collected real rollout (``system: real``, the meta-test metric).
    Extra terms (meta-train only, in P): ``path_distance`` = mean_t ‖p_t − g‖, ``final_velocity`` = ‖v_T‖ (scaled
    as the state input), ``action_cost`` = mean_t ‖a_t / max_action‖²; the reacher also has ``joint_distance`` =
    ‖q_T − q*‖ and ``joint_path_distance`` = mean_t ‖q_t − q*‖ with q* the joint angles that put the fingertip
    on g (the public reference's reacher task loss is in joint space).
    Hand-written loss: ``final_distance``, the mean of the ``final_distance`` input (the task loss through P with
    ``model_gradient: true``; without it, its gradient is zero: there is no model at meta-test).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt, model_validator
from torch import Tensor, nn
from torch.func import vmap

from ml3cli.envs import pointmass as pm
from ml3cli.envs import reacher as rc
from ml3cli.envs.dynamics_model import DynamicsModel
from ml3cli.metaloss import LossInput
from ml3cli.runtime import generator as make_generator
from ml3cli.tasks.base import Task, TaskOptions, Theta


class GoalBatch(NamedTuple):
    """A batch of goal-reaching tasks; shapes with the leading task axis ``n``."""

    goal: Tensor  # [n, 2]  g
    start: Tensor  # [n, 4]  s_0
    states: Tensor  # [n, T + 1, 4]  the collected trajectory τ (the start repeated until something is collected)


class MBRLOptions(TaskOptions):
    """Settings shared by both goal-reaching tasks (defaults per environment are filled in by the task)."""

    system: Literal["model", "real"] = Field(
        "model", description="roll τ out in the learned model P (meta-train) or on the real system (meta-test)"
    )
    model_gradient: bool = Field(
        False, description="the final_distance input rolls π_θ out in P, differentiable (the model-based baseline)"
    )
    horizon: PositiveInt | None = Field(None, description="T, steps per rollout (default: the environment's)")
    goal_radius: tuple[float, float] | None = Field(None, description="goal distance from the origin [lo, hi]")
    goal_angle: tuple[float, float] = Field((-45.0, 45.0), description="goal angle range in degrees [lo, hi]")
    start: list[float] | None = Field(None, description="s_0 (4 numbers; default: the environment's)")
    start_range: list[NonNegativeFloat] | None = Field(
        None, description="s_0 + U[−r, r] per coordinate, per task (4 numbers; e.g. [3.1416, 0, 0, 0]: any θ₁)"
    )
    policy_hidden: list[PositiveInt] = Field([32, 32], description="π_θ's hidden tanh layers")
    model_hidden: list[PositiveInt] = Field([64, 64], description="P's hidden tanh layers")
    model_members: PositiveInt = Field(1, description="ensemble members of P")
    random_rollouts: PositiveInt = Field(64, description="random-action real rollouts P is first fitted on")
    fit_steps: PositiveInt = Field(2000, description="Adam steps of P's first fit")
    refit_every: NonNegativeInt = Field(100, description="refit P every this many outer steps (0: never)")
    refit_rollouts: PositiveInt = Field(16, description="real rollouts of the current policy added at each refit")
    refit_steps: PositiveInt = Field(300, description="Adam steps of each refit")
    model_seed: int = Field(0, description="seed of P's fit when a task needs P without meta-training")
    position_scale: NonNegativeFloat | None = Field(None, description="positions are fed as p · scale")
    inputs: Literal["absolute", "relative"] = Field(
        "absolute",
        description="M_φ sees (state, action, position, goal, final distance), or, translation-invariant, "
        "(state without the point's position, action, offset p − g, final distance)",
    )

    @model_validator(mode="after")
    def _check(self) -> MBRLOptions:
        if self.goal_radius is not None and not 0 <= self.goal_radius[0] <= self.goal_radius[1]:
            raise ValueError(f"goal_radius must be 0 ≤ lo ≤ hi, got {self.goal_radius}")
        if self.goal_angle[0] > self.goal_angle[1]:
            raise ValueError(f"goal_angle must be lo ≤ hi, got {self.goal_angle}")
        if self.start is not None and len(self.start) != 4:
            raise ValueError(f"start must have 4 numbers (x, y, ẋ, ẏ or θ₁, θ₂, θ̇₁, θ̇₂), got {len(self.start)}")
        if self.start_range is not None and len(self.start_range) != 4:
            raise ValueError(f"start_range must have 4 numbers, got {len(self.start_range)}")
        return self


class GoalPolicy(nn.Module):
    """π_θ(s, g) = max_action · tanh(MLP(s · state_scale, g · position_scale))."""

    def __init__(self, hidden: list[int], max_action: float, state_scale: tuple[float, ...], position_scale: float):
        super().__init__()
        layers: list[nn.Module] = []
        width = 6
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)
        self.max_action = max_action
        self.register_buffer("state_scale", torch.tensor(state_scale), persistent=False)
        self.position_scale = position_scale

    def forward(self, state: Tensor, goal: Tensor) -> Tensor:
        goal = goal.expand(*state.shape[:-1], 2)
        return self.max_action * torch.tanh(
            self.net(torch.cat([state * self.state_scale, goal * self.position_scale], -1))
        )


def final_distance(final_distance: Tensor, **others: Tensor) -> Tensor:
    """The task loss as a hand-written loss: the final distance (the same on every row, so the mean is it)."""
    return final_distance.mean()


class GoalReachingTask(Task):
    """Shared machinery of PointmassGoal and ReacherGoal; subclasses supply the real system."""

    Options = MBRLOptions
    loss_inputs_spec = (
        LossInput("state", 4, "the state s_t of τ (velocities scaled)"),
        LossInput("action", 2, "a_t = π_θ(s_t, g) / max_action"),
        LossInput("position", 2, "the point's / fingertip's position at s_t (position_scale units)"),
        LossInput("goal", 2, "the goal g (position_scale units)"),
        LossInput("final_distance", 1, "‖p_T − g‖ of τ (position_scale units, the same on every row)"),
    )
    relative_inputs_spec = (
        LossInput("state", 2, "the velocity (ẋ, ẏ) of τ at t (point mass) or the joint state (reacher), scaled"),
        LossInput("action", 2, "a_t = π_θ(s_t, g) / max_action"),
        LossInput("offset", 2, "p_t − g in position_scale units"),
        LossInput("final_distance", 1, "‖p_T − g‖ of τ (position_scale units, the same on every row)"),
    )
    metric = "final_distance"
    builtin_losses = {"final_distance": final_distance}
    extra_term_names = ("path_distance", "final_velocity", "action_cost")
    collects_data = True

    # environment constants, set by subclasses
    default_horizon: int
    default_goal_radius: tuple[float, float]
    default_start: tuple[float, float, float, float]
    default_position_scale: float
    max_action: float
    state_scale: tuple[float, float, float, float]

    def __init__(self, options: MBRLOptions | None = None, device: torch.device | str = "cpu"):
        options = options if options is not None else self.Options()
        self.horizon = options.horizon or self.default_horizon
        self.goal_radius = options.goal_radius or self.default_goal_radius
        self.position_scale = options.position_scale or self.default_position_scale
        super().__init__(options, device)
        self.start_state = torch.tensor(options.start or self.default_start, dtype=torch.float32)
        self._scale = torch.tensor(self.state_scale)
        self.model = DynamicsModel(4, 2, tuple(options.model_hidden), options.model_members)

    #: the size of the state input with ``inputs: relative`` (see :meth:`relative_features`)
    relative_state_size = 4

    @classmethod
    def inputs_for(cls, options: TaskOptions) -> tuple[LossInput, ...]:
        if getattr(options, "inputs", "absolute") == "absolute":
            return cls.loss_inputs_spec
        state = cls.relative_inputs_spec[0]
        return (LossInput(state.name, cls.relative_state_size, state.description), *cls.relative_inputs_spec[1:])

    def relative_features(self, states: Tensor, goal: Tensor) -> tuple[Tensor, Tensor]:
        """The state input and the offset p − g (position_scale units) of the translation-invariant inputs."""
        return states * self._scale.to(states.device), (self.position(states) - goal) * self.position_scale

    # -- the real system (subclasses) ----------------------------------------------------------------------
    def position(self, state: Tensor) -> Tensor:
        """The point's / fingertip's (x, y) for states ``[..., 4]`` (differentiable)."""
        raise NotImplementedError

    def real_rollout(self, policy, start: Tensor, goal: Tensor) -> Tensor:
        """States ``[n, T + 1, 4]`` of the real system under ``policy(t, states [n, 4]) → actions [n, 2]``."""
        raise NotImplementedError

    def random_states(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` start states spread over the region the policies visit (for P's first dataset)."""
        raise NotImplementedError

    # -- the optimizee and tasks ---------------------------------------------------------------------------
    def build_optimizee(self) -> nn.Module:
        return GoalPolicy(list(self.options.policy_hidden), self.max_action, self.state_scale, self.position_scale)

    def act(self, theta: Theta, state: Tensor, goal: Tensor) -> Tensor:
        return torch.func.functional_call(self.optimizee, theta, (state, goal))

    def sample_goals(self, n: int, generator: torch.Generator) -> Tensor:
        lo, hi = self.goal_radius
        a_lo, a_hi = (math.radians(v) for v in self.options.goal_angle)
        radius = lo + (hi - lo) * torch.rand(n, generator=generator)
        angle = a_lo + (a_hi - a_lo) * torch.rand(n, generator=generator)
        return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)

    def sample_starts(self, n: int, generator: torch.Generator) -> Tensor:
        start = self.start_state.expand(n, 4).clone()
        if self.options.start_range is not None:
            spread = torch.tensor(self.options.start_range, dtype=start.dtype)
            start = start + spread * (2 * torch.rand(n, 4, generator=generator) - 1)
        return start

    def sample_tasks(self, n: int, generator: torch.Generator) -> GoalBatch:
        goal = self.sample_goals(n, generator)
        start = self.sample_starts(n, generator)
        states = start[:, None].expand(n, self.horizon + 1, 4).clone()
        return GoalBatch(goal.to(self.device), start.to(self.device), states.to(self.device))

    # -- rollouts ------------------------------------------------------------------------------------------
    def model_rollout(self, theta: Theta, goal: Tensor, start: Tensor) -> Tensor:
        """States ``[T + 1, 4]`` of π_θ rolled out in P from ``start`` (ONE task; differentiable in θ)."""
        self.ensure_model()
        states = [start]
        for _ in range(self.horizon):
            states.append(self.model.step(states[-1], self.act(theta, states[-1], goal)))
        return torch.stack(states)

    def policy_rollout(self, theta: Theta, goal: Tensor, start: Tensor) -> Tensor:
        """States ``[n, T + 1, 4]`` of the batch of policies θ on the real system (no gradient)."""
        act_all = vmap(self.act)
        self.environment_samples += start.shape[0] * self.horizon
        with torch.no_grad():
            return self.real_rollout(lambda t, s: act_all(theta, s, goal), start, goal)

    def random_rollouts(self, n: int, generator: torch.Generator, hold: int = 5) -> tuple[Tensor, Tensor]:
        """States and actions of ``n`` real rollouts of uniform random actions held for ``hold`` steps."""
        start = self.random_states(n, generator)
        chunks = -(-self.horizon // hold)
        actions = (2 * torch.rand(n, chunks, 1, 2, generator=generator) - 1) * self.max_action
        actions = actions.expand(n, chunks, hold, 2).reshape(n, chunks * hold, 2)[:, : self.horizon]
        states = self.real_rollout(lambda t, s: actions[:, t], start, torch.zeros(n, 2))
        return states, actions

    def add_policy_data(self, theta: Theta, goal: Tensor, start: Tensor) -> None:
        start = start.to(self.device)
        states = self.policy_rollout(theta, goal.to(self.device), start)
        with torch.no_grad():
            actions = vmap(self.act)(theta, states[:, :-1], goal.to(self.device))
        self.model.add(states, actions)

    def ensure_model(self) -> None:
        """Fit P on random real rollouts (from ``model_seed``) if nothing fitted it yet (a task used without
        meta-training, e.g. the model-based baseline without the meta-train model)."""
        if not self.model.fitted:
            self.fit_initial_model(make_generator(self.options.model_seed))

    def fit_initial_model(self, generator: torch.Generator) -> float:
        states, actions = self.random_rollouts(self.options.random_rollouts, generator)
        self.model.add(states, actions)
        return self.model.fit(generator, self.options.fit_steps)

    # -- engine hooks --------------------------------------------------------------------------------------
    def begin_outer_step(self, step: int, theta: Theta | None, generator: torch.Generator) -> None:
        """Algorithm 3: fit P before the first outer step, then refit it every ``refit_every`` steps with real
        rollouts of the latest policies θ (on fresh meta-train goals: θ is goal-conditioned)."""
        opts = self.options
        if opts.system != "model" and not opts.model_gradient:
            return
        if not self.model.fitted:
            self.fit_initial_model(generator)
        elif theta is not None and opts.refit_every and step > 1 and (step - 1) % opts.refit_every == 0:
            n = next(iter(theta.values())).shape[0]
            index = torch.randint(0, n, (opts.refit_rollouts,), generator=generator)
            goals = self.sample_goals(opts.refit_rollouts, generator)
            starts = self.sample_starts(opts.refit_rollouts, generator)
            self.add_policy_data({k: v[index] for k, v in theta.items()}, goals, starts)
            self.model.fit(generator, opts.refit_steps)

    def collect(self, theta: Theta, batch: GoalBatch, generator: torch.Generator, purpose: str) -> GoalBatch:
        if self.options.system == "model" or self.options.model_gradient:
            self.ensure_model()  # here, outside vmap: fitting P draws random numbers
        if self.options.system == "model":
            if purpose == "task_loss":  # the task loss rolls out in P itself, differentiably
                return batch
            with torch.no_grad():
                states = vmap(self.model_rollout)(theta, batch.goal, batch.start)
        else:
            states = self.policy_rollout(theta, batch.goal, batch.start)
        return batch._replace(states=states)

    # -- losses --------------------------------------------------------------------------------------------
    def distance(self, state: Tensor, goal: Tensor) -> Tensor:
        return torch.linalg.vector_norm(self.position(state) - goal, dim=-1)

    def loss_inputs(self, theta: Theta, task: GoalBatch) -> dict[str, Tensor]:
        states = task.states[:-1]
        actions = self.act(theta, states, task.goal)
        if self.options.model_gradient:
            final = self.distance(self.model_rollout(theta, task.goal, task.start)[-1], task.goal)
        else:
            final = self.distance(task.states[-1], task.goal)
        rows = states.shape[0]
        scale = self.position_scale
        if self.options.inputs == "relative":
            state_input, offset = self.relative_features(states, task.goal)
            return {
                "state": state_input,
                "action": actions / self.max_action,
                "offset": offset,
                "final_distance": (final * scale).expand(rows).unsqueeze(-1),
            }
        return {
            "state": states * self._scale.to(states.device),
            "action": actions / self.max_action,
            "position": self.position(states) * scale,
            "goal": (task.goal * scale).expand(rows, 2),
            "final_distance": (final * scale).expand(rows).unsqueeze(-1),
        }

    def trajectory(self, theta: Theta, task: GoalBatch) -> Tensor:
        """The states the task loss is measured on: rolled out in P (differentiable) or the collected ones."""
        return self.model_rollout(theta, task.goal, task.start) if self.options.system == "model" else task.states

    def task_loss(self, theta: Theta, task: GoalBatch) -> Tensor:
        return self.distance(self.trajectory(theta, task)[-1], task.goal)

    def extra_term(self, name: str, theta: Theta, task: GoalBatch) -> Tensor:
        states = self.trajectory(theta, task)
        if name == "path_distance":
            return self.distance(states[1:], task.goal).mean()
        if name == "final_velocity":
            return torch.linalg.vector_norm(states[-1, 2:] * self._scale[2:].to(states.device))
        if name == "action_cost":
            return ((self.act(theta, states[:-1], task.goal) / self.max_action) ** 2).sum(-1).mean()
        return super().extra_term(name, theta, task)

    # -- state (P and its dataset) -------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        return {f"model/{k}": v for k, v in self.model.state_tensors().items()} if self.model.fitted else {}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if not tensors:
            return
        if any(not k.startswith("model/") for k in tensors):
            raise ValueError(f"task {self.name!r} keeps only model/… tensors, got {sorted(tensors)[:3]}")
        self.model.load_state_tensors({k.removeprefix("model/"): v for k, v in tensors.items()})


class PointmassGoalTask(GoalReachingTask):
    name = "pointmass_goal"
    summary = "model-based RL: drive a 2-D point mass to a goal in 30 steps; policy π_θ(s, g) → accelerations"
    default_horizon = pm.HORIZON
    default_goal_radius = (0.5, 1.0)
    default_start = (0.0, 0.0, 0.0, 0.0)
    default_position_scale = 1.0
    max_action = pm.MAX_ACTION
    state_scale = (1.0, 1.0, 1.0, 1.0)
    relative_state_size = 2

    def relative_features(self, states: Tensor, goal: Tensor) -> tuple[Tensor, Tensor]:
        """The velocity only: the point mass's dynamics do not depend on where it is."""
        return states[:, 2:] * self._scale[2:].to(states.device), (states[:, :2] - goal) * self.position_scale

    def position(self, state: Tensor) -> Tensor:
        return state[..., :2]

    def real_rollout(self, policy, start: Tensor, goal: Tensor) -> Tensor:
        states = [start]
        for t in range(self.horizon):
            states.append(pm.pointmass_step(states[-1], policy(t, states[-1])))
        return torch.stack(states, dim=1)

    def random_states(self, n: int, generator: torch.Generator) -> Tensor:
        position = 1.5 * (2 * torch.rand(n, 2, generator=generator) - 1)
        velocity = 2 * torch.rand(n, 2, generator=generator) - 1
        return torch.cat([position, velocity], -1).to(self.device)


class ReacherGoalTask(GoalReachingTask):
    name = "reacher_goal"
    summary = "model-based RL: move the 2-link MuJoCo Reacher's fingertip to a goal in 65 steps; π_θ(s, g) → torques"
    default_horizon = rc.HORIZON
    default_goal_radius = (0.08, 0.2)
    default_start = (0.0, 0.5, 0.0, 0.0)
    default_position_scale = 5.0
    max_action = rc.MAX_ACTION
    state_scale = (1.0, 1.0, 0.1, 0.1)
    relative_state_size = 5

    def relative_features(self, states: Tensor, goal: Tensor) -> tuple[Tensor, Tensor]:
        """In the goal's frame: the arm is symmetric about the shoulder, so rotating θ₁ and the goal together
        changes nothing. State input (cos, sin)(θ₁ − γ), θ₂, θ̇ (scaled) with γ the goal's angle; the fingertip's
        offset to the goal rotated by −γ."""
        gamma = torch.atan2(goal[1], goal[0])
        relative = states[:, 0] - gamma
        velocity = states[:, 2:] * self._scale[2:].to(states.device)
        state_input = torch.cat(
            [torch.stack([torch.cos(relative), torch.sin(relative), states[:, 1]], -1), velocity], -1
        )
        offset = self.position(states) - goal
        c, s = torch.cos(gamma), torch.sin(gamma)
        rotated = torch.stack([c * offset[:, 0] + s * offset[:, 1], -s * offset[:, 0] + c * offset[:, 1]], -1)
        return state_input, rotated * self.position_scale

    def __init__(self, options: MBRLOptions | None = None, device: torch.device | str = "cpu"):
        super().__init__(options, device)
        self.arm = rc.ReacherArm(rc.FRAME_SKIP, self.max_action)

    def position(self, state: Tensor) -> Tensor:
        return rc.fingertip(state)

    def real_rollout(self, policy, start: Tensor, goal: Tensor) -> Tensor:
        return self.arm.rollout(policy, start, goal, self.horizon)

    def random_states(self, n: int, generator: torch.Generator) -> Tensor:
        low = torch.tensor([-math.pi, -2.0, -3.0, -3.0])  # q₂ away from its ±3 rad limit: contacts are rare later
        return (low + (-2 * low) * torch.rand(n, 4, generator=generator)).to(self.device)

    # -- joint-space shaping terms (the public reference's reacher task loss is in joint space) -------------
    extra_term_names = (*GoalReachingTask.extra_term_names, "joint_distance", "joint_path_distance")

    @staticmethod
    def joint_target(goal: Tensor, start: Tensor) -> Tensor:
        """q* = (θ₁, θ₂) that puts the fingertip on ``goal`` (ONE task), the elbow on the start's side. Goals inside
        the reach annulus; others get the nearest reachable configuration (cos θ₂ clamped)."""
        l1, l2 = rc.LINKS
        cos_q2 = ((goal**2).sum() - l1**2 - l2**2) / (2 * l1 * l2)
        q2 = torch.acos(cos_q2.clamp(-1.0, 1.0)) * torch.where(start[1] < 0, -1.0, 1.0)
        q1 = torch.atan2(goal[1], goal[0]) - torch.atan2(l2 * torch.sin(q2), l1 + l2 * torch.cos(q2))
        return torch.stack([q1, q2])

    def joint_error(self, states: Tensor, task: GoalBatch) -> Tensor:
        """‖q_t − q*‖ per state of ``states [T + 1, 4]``, θ₁'s difference wrapped to (−π, π] (θ₁ is unlimited)."""
        error = states[..., :2] - self.joint_target(task.goal, task.start)
        wrapped = torch.atan2(torch.sin(error[..., 0]), torch.cos(error[..., 0]))
        return torch.linalg.vector_norm(torch.stack([wrapped, error[..., 1]], -1), dim=-1)

    def extra_term(self, name: str, theta: Theta, task: GoalBatch) -> Tensor:
        """Besides the shared terms: ``joint_distance`` = ‖q_T − q*‖ and ``joint_path_distance`` = mean_t ‖q_t − q*‖
        (radians; q* from :meth:`joint_target`): unlike the fingertip distance they have no plateau at "fold the
        arm" (a fingertip near the shoulder is ≈ ‖g‖ from every goal)."""
        if name == "joint_distance":
            return self.joint_error(self.trajectory(theta, task)[-1], task)
        if name == "joint_path_distance":
            return self.joint_error(self.trajectory(theta, task)[1:], task).mean()
        return super().extra_term(name, theta, task)
