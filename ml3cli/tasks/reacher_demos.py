"""ReacherGoal with expert demonstrations at meta-train time only (paper, section 4.2.4, figure 6c–d).

Data sheet
    Real system, policy and loss inputs: those of ``reacher_goal`` with ``system: real``
    (:class:`ml3cli.tasks.mbrl.ReacherGoalTask`): gymnasium's Reacher arm stepped with MuJoCo (dt 0.01, 65 steps,
    torques ±0.1 of the ctrl range), π_θ(s, g) = 0.1 · tanh(MLP(s, g)); between inner steps the policy is rolled
    out on the real arm (``Task.collect``) and M_φ sees that trajectory's states with the actions recomputed from
    θ, in the goal's frame by default (``inputs: relative``), and its final distance. No dynamics model, no
    differentiation through MuJoCo.
    Tasks: a fixed list of fingertip targets (``goals``), all from the fixed start s₀ = (0, 0.5, 0, 0); a batch of
    n tasks takes the targets in order, cycling, from a randomly drawn first one (n = 8 over 4 targets: each
    twice, with different θ₀; n = 6 over the 6 test targets: each once).
    Defaults: the 4 meta-train targets :data:`TRAIN_GOALS`; the recipe meta-tests on the 6 new targets
    :data:`TEST_GOALS` with ``demonstrations: false``.
    Experts (``demonstrations: true``): one iLQR demonstration per target on the real arm
    (:mod:`ml3cli.control.reacher_expert`: states s^E_t, actions u^E_t = π_expert(s^E_t, t) and the feedback
    gains K_t of π_expert(s, t) = clip(u^E_t + K_t (s − s^E_t)); solved once per target and cached).
    Task loss: with ``demonstrations: true`` (meta-train) the behavioural-cloning objective of the paper,
    L_T(θ') = Σ_t ‖π_θ'(s_t, g) − π_expert(s_t, t)‖² / max_action² (actions in units of max_action) on the
    expert's states (``bc_states: expert``, where π_expert(s^E_t, t) = u^E_t) or on the updated policy's own real
    rollout labelled by the expert's feedback law (``bc_states: policy``, DAgger-like); with ``demonstrations:
    false`` (meta-test: no expert exists, none is ever computed) the real final distance ‖p_T − g‖ of the
    collected rollout, the metric of figure 6d. Reported beside it in both cases: ``final_distance``.
    Hand-written loss: ``final_distance`` (as ``reacher_goal``). On the collected rollout its gradient is zero;
    with ``model_gradient: true`` the final_distance input is that of π_θ rolled out in
    :class:`~ml3cli.envs.reacher_torch.TorchReacherArm` (MuJoCo's equations in torch, equal to ``mj_step`` to 1e-9):
    the task loss differentiated through the simulator, the baseline of ``ml3 reproduce reacher_demos``. The
    behavioural-cloning baselines of figure 6d are :mod:`ml3cli.experiments.reacher_demos`.
    Environment samples (``Task.environment_samples``): the steps of the experts' demonstrations replayed on the real
    arm (T per target) and every collected real rollout (T per task); the differentiable rollouts of
    ``model_gradient: true`` run inside ``vmap`` and are counted by the experiment that uses them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from pydantic import Field, PositiveInt, model_validator
from torch import Tensor

from ml3cli.envs import reacher as rc
from ml3cli.errors import ML3Error
from ml3cli.tasks.base import Theta
from ml3cli.tasks.mbrl import MBRLOptions, ReacherGoalTask

#: the 4 meta-train targets (x, y) in metres: radius 0.18, 0.11, 0.16, 0.12 at −15°, 25°, 65°, 105°
TRAIN_GOALS: tuple[tuple[float, float], ...] = ((0.1739, -0.0466), (0.0997, 0.0465), (0.0676, 0.145), (-0.0311, 0.1159))
#: the 6 meta-test targets: radius 0.2, 0.09, 0.14, 0.2, 0.1, 0.17 at −30°, 0°, 40°, 85°, 90°, 120°
TEST_GOALS: tuple[tuple[float, float], ...] = (
    (0.1732, -0.1),
    (0.09, 0.0),
    (0.1072, 0.09),
    (0.0174, 0.1992),
    (0.0, 0.1),
    (-0.085, 0.1472),
)


class DemoBatch(NamedTuple):
    """A batch of reaching tasks with their demonstrations; shapes with the leading task axis ``n``."""

    goal: Tensor  # [n, 2]  g
    start: Tensor  # [n, 4]  s_0
    states: Tensor  # [n, T + 1, 4]  the collected trajectory τ of π_θ
    expert_states: Tensor  # [n, T, 4]  s^E_t (NaN without demonstrations)
    expert_actions: Tensor  # [n, T, 2]  u^E_t = π_expert(s^E_t) (NaN without demonstrations)
    expert_gains: Tensor  # [n, T, 2, 4]  K_t of π_expert(s, t) = clip(u^E_t + K_t (s − s^E_t)) (NaN without)


class ReacherDemosOptions(MBRLOptions):
    """``reacher_goal``'s options on the real system, with a fixed list of targets and their experts."""

    system: Literal["real"] = Field("real", description="always the real arm: behavioural cloning needs no model")
    model_gradient: bool = Field(
        False,
        description="the final_distance input is that of π_θ rolled out in the torch copy of the simulator (MuJoCo's "
        "equations, differentiable): the baseline 'final distance through the simulator'; no learned model P",
    )
    inputs: Literal["absolute", "relative"] = Field("relative", description="M_φ's inputs (see reacher_goal)")
    goals: list[tuple[float, float]] = Field(
        [list(g) for g in TRAIN_GOALS], min_length=1, description="the fingertip targets (x, y) in metres"
    )
    demonstrations: bool = Field(
        True, description="compute the iLQR experts (meta-train); false at meta-test: no expert exists"
    )
    bc_states: Literal["expert", "policy"] = Field(
        "expert",
        description="where the behavioural-cloning task loss compares π_θ with π_expert: on the expert's states, or "
        "on the updated "
        "policy's own real rollout with the expert's feedback law as the label (DAgger-like)",
    )
    expert_iterations: PositiveInt = Field(100, description="iLQR iterations per expert")
    cache_dir: str | None = Field(
        None, description="folder of the expert cache (default $ML3_CACHE_DIR or ~/.cache/ml3)"
    )
    no_cache: bool = Field(False, description="solve the experts in memory, never read or write the cache")

    @model_validator(mode="after")
    def _fixed_targets(self) -> ReacherDemosOptions:
        if self.start_range is not None:
            raise ValueError("start_range is not supported: the experts are planned from one fixed start (set start)")
        if self.goal_radius is not None:
            raise ValueError("goal_radius is not used: the targets are listed in goals")
        low, high = abs(rc.LINKS[0] - rc.LINKS[1]), rc.LINKS[0] + rc.LINKS[1]
        for x, y in self.goals:
            if not low <= math.hypot(x, y) <= high:
                raise ValueError(f"goals: ({x:g}, {y:g}) is out of the arm's reach ({low:g} ≤ ‖g‖ ≤ {high:g} m)")
        return self


class ReacherDemosTask(ReacherGoalTask):
    name = "reacher_demos"
    summary = (
        "ReacherGoal with iLQR expert demonstrations at meta-train time (behavioural-cloning task loss); "
        "meta-test trains with M_φ alone"
    )
    Options = ReacherDemosOptions
    extra_term_names = ()

    def __init__(self, options: ReacherDemosOptions | None = None, device: torch.device | str = "cpu"):
        super().__init__(options, device)
        self.goal_list = torch.tensor(self.options.goals, dtype=torch.float32)
        self._demos: list | None = None
        self._torch_arm = None  # built on first use (model_gradient: true)

    # -- the simulator made differentiable (the baseline through the simulator) ----------------------------
    def ensure_model(self) -> None:
        """No learned model P here: ``model_gradient`` rolls out in the torch copy of the simulator."""

    def begin_outer_step(self, step: int, theta: Theta | None, generator: torch.Generator) -> None:
        """Nothing to fit: the real arm is rolled out in :meth:`collect`, and there is no P."""

    def model_rollout(self, theta: Theta, goal: Tensor, start: Tensor) -> Tensor:
        """States ``[T + 1, 4]`` of π_θ (ONE task) in the torch copy of the arm, differentiable in θ: float64 like
        MuJoCo, so the value is the real rollout's (the joint limit at ±3 rad, not modelled, stays far)."""
        if self._torch_arm is None:
            from ml3cli.envs.reacher_torch import TorchReacherArm

            self._torch_arm = TorchReacherArm(self.arm.frame_skip)
        states = [start.double()]
        for _ in range(self.horizon):
            action = self.act(theta, states[-1].to(start.dtype), goal).double()
            states.append(self._torch_arm.step(states[-1], action))
        return torch.stack(states).to(start.dtype)

    # -- the experts (meta-train only) ---------------------------------------------------------------------
    def demonstrations(self) -> list:
        """The :class:`~ml3cli.control.reacher_expert.Demonstration` of every target, solved or read once."""
        if not self.options.demonstrations:
            raise ML3Error(
                f"task {self.name!r} with demonstrations: false has no expert (meta-test trains with the "
                "learned loss alone)"
            )
        if self._demos is None:
            from ml3cli.control.reacher_expert import default_cache_dir, expert_demonstrations

            opts = self.options
            cache = None if opts.no_cache else (Path(opts.cache_dir) if opts.cache_dir else default_cache_dir())
            self._demos = expert_demonstrations(
                opts.goals,
                self.start_state.tolist(),
                cache,
                horizon=self.horizon,
                max_action=self.max_action,
                frame_skip=self.arm.frame_skip,
                iterations=opts.expert_iterations,
            )
            # the data the experts give: each demonstration is T steps of the real arm (solved or read once)
            self.environment_samples += len(self._demos) * self.horizon
        return self._demos

    # -- tasks ---------------------------------------------------------------------------------------------
    def target_index(self, n: int, generator: torch.Generator) -> Tensor:
        """Which listed target each of ``n`` tasks gets: all of them in order, cycling, from a random first one
        (the only draw: the experts exist for the listed targets only, all from the same start)."""
        first = int(torch.randint(0, len(self.goal_list), (), generator=generator))
        return (first + torch.arange(n)) % len(self.goal_list)

    def sample_goals(self, n: int, generator: torch.Generator) -> Tensor:
        return self.goal_list[self.target_index(n, generator)].clone()

    def sample_tasks(self, n: int, generator: torch.Generator) -> DemoBatch:
        index = self.target_index(n, generator)
        goal = self.goal_list[index].clone()
        start = self.sample_starts(n, generator)  # the fixed start (start_range is refused): nothing drawn
        states = start[:, None].expand(n, self.horizon + 1, 4).clone()
        if self.options.demonstrations:
            demos = self.demonstrations()
            expert_states = torch.from_numpy(np.stack([demos[i].states[:-1] for i in index.tolist()])).float()
            expert_actions = torch.from_numpy(np.stack([demos[i].actions for i in index.tolist()])).float()
            expert_gains = torch.from_numpy(np.stack([demos[i].gains for i in index.tolist()])).float()
        else:
            expert_states = torch.full((n, self.horizon, 4), float("nan"))
            expert_actions = torch.full((n, self.horizon, 2), float("nan"))
            expert_gains = torch.full((n, self.horizon, 2, 4), float("nan"))
        fields = (goal, start, states, expert_states, expert_actions, expert_gains)
        return DemoBatch(*(t.to(self.device) for t in fields))

    # -- losses --------------------------------------------------------------------------------------------
    def expert_policy(self, states: Tensor, task: DemoBatch) -> Tensor:
        """π_expert(s_t, t) = clip(u^E_t + K_t (s_t − s^E_t)) for states ``[T, 4]`` (one per time step t)."""
        feedback = (task.expert_gains @ (states - task.expert_states).unsqueeze(-1)).squeeze(-1)
        return (task.expert_actions + feedback).clamp(-self.max_action, self.max_action)

    def behavioral_cloning(self, theta: Theta, task: DemoBatch) -> Tensor:
        """Σ_t ‖π_θ(s_t, g) − π_expert(s_t, t)‖² / max_action² for ONE task, on the expert's states s^E_t (where
        π_expert(s^E_t, t) = u^E_t) or, with ``bc_states: policy``, on the collected states of θ's own rollout."""
        if not self.options.demonstrations:
            raise ML3Error(
                f"task {self.name!r}: behavioural cloning needs demonstrations: true (a meta-train "
                "task loss; meta-test has no expert)"
            )
        if self.options.bc_states == "expert":
            states, labels = task.expert_states, task.expert_actions
        else:
            states = task.states[:-1]
            labels = self.expert_policy(states, task)
        actions = self.act(theta, states, task.goal)
        return (((actions - labels) / self.max_action) ** 2).sum()

    def final_distance(self, task: DemoBatch) -> Tensor:
        """‖p_T − g‖ of the collected real rollout (data: no gradient in θ)."""
        return self.distance(task.states[-1], task.goal)

    def task_loss(self, theta: Theta, task: DemoBatch) -> Tensor:
        """Meta-train (``demonstrations: true``): behavioural cloning; meta-test: the real final distance."""
        if self.options.demonstrations:
            return self.behavioral_cloning(theta, task)
        return self.final_distance(task)

    def report_metrics(self, theta: Theta, task: DemoBatch) -> dict[str, Tensor]:
        """The real final distance, also where the task loss is behavioural cloning."""
        return {"final_distance": self.final_distance(task)}
