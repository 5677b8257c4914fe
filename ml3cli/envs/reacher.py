"""ReacherGoal for model-based RL: gymnasium's 2-link planar Reacher stepped directly in MuJoCo (paper, appendix B).

Data sheet
    Model: gymnasium's ``reacher.xml`` unchanged (:func:`ml3cli.envs.mujoco_models.reacher_model`): links of 0.1 m
    and 0.11 m to the fingertip, joint damping 1, armature 1, RK4 at timestep 0.01 s, motors with gear 200 and
    ctrl range ±1. One step of the environment is ``frame_skip`` MuJoCo steps (default 1: dt = 0.01 s as the public
    reference's model-based reacher; gymnasium's Reacher-v5 uses 2).
    State s = (θ₁, θ₂, θ̇₁, θ̇₂) of the two arm joints; action = the two motor controls, clipped to ±``max_action``
    (default 0.1 of the ctrl range, i.e. 20 N·m: with the full range the arm spins round in a few steps).
    The target's slide joints only place the red target sphere on the goal (a separate body: no coupling).
    Goal: a fingertip position drawn from an annulus sector around the shoulder, or ``options["goal"]``.
    Observation (θ₁, θ₂, θ̇₁, θ̇₂, g_x, g_y); reward −‖fingertip − g‖; truncates after ``horizon`` steps.
    :func:`fingertip` is the forward kinematics in torch (differentiable), checked against MuJoCo in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ml3cli.envs.mujoco_models import reacher_model
from ml3cli.envs.pointmass import goal_in_sector
from ml3cli.errors import simulators_needed

with simulators_needed("gymnasium's MuJoCo Reacher"):
    import gymnasium as gym
    import mujoco

LINKS = (0.1, 0.11)  # shoulder → elbow, elbow → fingertip (body positions in reacher.xml)
HORIZON = 65
FRAME_SKIP = 1
MAX_ACTION = 0.1


def fingertip(state: Tensor) -> Tensor:
    """The fingertip's (x, y) for states ``[..., ≥2]`` whose first two entries are (θ₁, θ₂)."""
    q1, q12 = state[..., 0], state[..., 0] + state[..., 1]
    return torch.stack(
        [LINKS[0] * torch.cos(q1) + LINKS[1] * torch.cos(q12), LINKS[0] * torch.sin(q1) + LINKS[1] * torch.sin(q12)],
        dim=-1,
    )


class ReacherArm:
    """The arm in MuJoCo: set a state, apply a control for ``frame_skip`` steps, read the state back."""

    def __init__(self, frame_skip: int = FRAME_SKIP, max_action: float = MAX_ACTION):
        self.model = reacher_model()
        self.frame_skip = frame_skip
        self.max_action = max_action
        self.dt = self.model.opt.timestep * frame_skip

    def new_data(self, state: np.ndarray, goal: np.ndarray | None = None) -> mujoco.MjData:
        data = mujoco.MjData(self.model)
        self.set_state(data, state, goal)
        return data

    @staticmethod
    def set_state(data: mujoco.MjData, state: np.ndarray, goal: np.ndarray | None = None) -> None:
        data.qpos[:2] = state[:2]
        data.qvel[:2] = state[2:4]
        data.qpos[2:] = goal if goal is not None else 0.0
        data.qvel[2:] = 0.0

    @staticmethod
    def get_state(data: mujoco.MjData) -> np.ndarray:
        return np.concatenate([data.qpos[:2], data.qvel[:2]])

    def step(self, data: mujoco.MjData, action: np.ndarray) -> np.ndarray:
        """The state after ``action``; NaN for an action that is not finite (a diverged θ), with MuJoCo left
        unstepped: on a NaN control it would reset the arm, and its rest pose would pass for a result."""
        if not np.isfinite(action).all():
            return np.full(4, np.nan)
        data.ctrl[:] = np.clip(action, -self.max_action, self.max_action)
        for _ in range(self.frame_skip):
            mujoco.mj_step(self.model, data)
        return self.get_state(data)

    def rollout(self, policy: Callable[[int, Tensor], Tensor], start: Tensor, goal: Tensor, horizon: int) -> Tensor:
        """States ``[n, T + 1, 4]`` of ``n`` arms from ``start`` ``[n, 4]`` under ``policy(t, states [n, 4]) → [n, 2]``
        (closed loop: the policy sees the state MuJoCo reached)."""
        datas = [
            self.new_data(s, g) for s, g in zip(start.double().cpu().numpy(), goal.double().cpu().numpy(), strict=True)
        ]
        states = [start.double().cpu()]
        for t in range(horizon):
            actions = policy(t, states[-1].to(start.dtype).to(start.device)).double().cpu().numpy()
            states.append(torch.from_numpy(np.stack([self.step(d, a) for d, a in zip(datas, actions, strict=True)])))
        return torch.stack(states, dim=1).to(start.dtype).to(start.device)


class ReacherGoalEnv(gym.Env):
    """The arm as a gymnasium environment (the "real system" of the model-based ReacherGoal experiment)."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        horizon: int = HORIZON,
        frame_skip: int = FRAME_SKIP,
        max_action: float = MAX_ACTION,
        goal_radius: tuple[float, float] = (0.08, 0.2),
        goal_angle: tuple[float, float] = (-45.0, 45.0),
    ):
        self.arm = ReacherArm(frame_skip, max_action)
        self.horizon, self.goal_radius, self.goal_angle = horizon, goal_radius, goal_angle
        self.action_space = gym.spaces.Box(-max_action, max_action, (2,), dtype=np.float64)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (6,), dtype=np.float64)
        self.data = self.arm.new_data(np.zeros(4))
        self.goal = np.zeros(2)
        self.t = 0

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.arm.get_state(self.data), self.goal]).astype(np.float64)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        self.goal = (
            np.asarray(options["goal"], dtype=np.float64)
            if "goal" in options
            else goal_in_sector(self.np_random, self.goal_radius, self.goal_angle)
        )
        self.data = self.arm.new_data(np.asarray(options.get("start", np.zeros(4)), dtype=np.float64), self.goal)
        self.t = 0
        return self._obs(), {"goal": self.goal.copy()}

    def step(self, action):
        state = self.arm.step(self.data, np.asarray(action, dtype=np.float64))
        self.t += 1
        distance = float(np.linalg.norm(fingertip(torch.from_numpy(state)).numpy() - self.goal))
        return self._obs(), -distance, False, self.t >= self.horizon, {"distance": distance}
