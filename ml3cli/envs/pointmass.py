"""PointmassGoal: a 2-D point mass driven by bounded accelerations to a goal (paper, section 4.1.2, appendix B).

Data sheet
    State s = (x, y, ẋ, ẏ), action a = (ẍ, ÿ) clipped to ±``max_action`` per axis. Semi-implicit Euler with time
    step ``dt`` and a linear drag ``damping``:  v' = v + (a − damping·v)·dt,  p' = p + v'·dt.
    The episode starts at rest at the origin (or ``options["start"]``) and lasts ``horizon`` steps; the goal is a
    point of the plane drawn from an annulus sector (radius, angle in degrees) or given in ``options["goal"]``.
    Observation: (x, y, ẋ, ẏ, g_x, g_y); reward −‖p − g‖; never terminates, truncates after ``horizon`` steps.

:func:`pointmass_step` is the one implementation of the dynamics: the gymnasium environment and the batched,
torch rollouts of :mod:`ml3cli.tasks.mbrl` both call it, so "the real system" is the same everywhere.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ml3cli.errors import simulators_needed

with simulators_needed("the point-mass environment (gymnasium)"):
    import gymnasium as gym

DT = 0.1
HORIZON = 30
MAX_ACTION = 1.0
DAMPING = 0.1


def pointmass_step(
    state: Tensor, action: Tensor, dt: float = DT, damping: float = DAMPING, max_action: float = MAX_ACTION
) -> Tensor:
    """s_{t+1} for states ``[..., 4]`` and actions ``[..., 2]`` (actions clipped to ±``max_action``)."""
    action = action.clamp(-max_action, max_action)
    position, velocity = state[..., :2], state[..., 2:]
    velocity = velocity + (action - damping * velocity) * dt
    return torch.cat([position + velocity * dt, velocity], dim=-1)


def goal_in_sector(rng: np.random.Generator, radius: tuple[float, float], angle_deg: tuple[float, float]) -> np.ndarray:
    """A goal drawn uniformly in radius and angle (degrees) of an annulus sector."""
    r = rng.uniform(*radius)
    angle = math.radians(rng.uniform(*angle_deg))
    return np.array([r * math.cos(angle), r * math.sin(angle)])


class PointmassGoalEnv(gym.Env):
    """The point mass as a gymnasium environment (the "real system" of the model-based experiment)."""

    metadata = {"render_modes": []}

    def __init__(
        self,
        dt: float = DT,
        horizon: int = HORIZON,
        max_action: float = MAX_ACTION,
        damping: float = DAMPING,
        goal_radius: tuple[float, float] = (0.5, 1.0),
        goal_angle: tuple[float, float] = (-45.0, 45.0),
    ):
        self.dt, self.horizon, self.max_action, self.damping = dt, horizon, max_action, damping
        self.goal_radius, self.goal_angle = goal_radius, goal_angle
        self.action_space = gym.spaces.Box(-max_action, max_action, (2,), dtype=np.float64)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (6,), dtype=np.float64)
        self.state = np.zeros(4)
        self.goal = np.zeros(2)
        self.t = 0

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.state, self.goal]).astype(np.float64)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        self.goal = (
            np.asarray(options["goal"], dtype=np.float64)
            if "goal" in options
            else goal_in_sector(self.np_random, self.goal_radius, self.goal_angle)
        )
        self.state = np.asarray(options.get("start", np.zeros(4)), dtype=np.float64).copy()
        self.t = 0
        return self._obs(), {"goal": self.goal.copy()}

    def step(self, action):
        s = torch.as_tensor(self.state, dtype=torch.float64)
        a = torch.as_tensor(np.asarray(action, dtype=np.float64))
        self.state = pointmass_step(s, a, self.dt, self.damping, self.max_action).numpy()
        self.t += 1
        distance = float(np.linalg.norm(self.state[:2] - self.goal))
        return self._obs(), -distance, False, self.t >= self.horizon, {"distance": distance}
