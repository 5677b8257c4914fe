"""AntGoal for model-free RL (paper, section 4.1.3 and appendix C): gymnasium's Ant-v5 running to a goal.

Data sheet
----------
* **System**: gymnasium's quadruped (``ant.xml``, 8 hinge joints, frame skip 5, one step 0.05 s), unchanged.
* **Task**: a goal g ∈ R² on a circle of radius ``goal_radius`` (default 2 m) around the start;
  ``reset(options={"goal": (x, y)})`` sets it, otherwise its angle is drawn uniformly.
  The initial configuration is drawn per episode as in gymnasium (qpos ± 0.1 uniform, qvel ~ 0.1·N(0, 1)).
* **Observation** (31, float64): gymnasium's Ant-v5 observation WITH the torso's x, y (the goal is meaningless
  without them) and WITHOUT the external contact forces (paper, appendix C; ``include_cfrc_ext_in_observation``
  False): torso position (x, y, z), orientation (quaternion), 8 joint angles, torso linear and angular velocity,
  8 joint velocities (29), then the goal g (2).
* **Action** (8): joint torques in [−1, 1].
* **Reward** (paper, appendix C): R_g = −d + 5/(d + 0.25) − |a|₁, with d = ‖torso_xy − g‖ after the step.
  ``info["distance"]`` is d.
* **Episode end**: never terminates (an upside-down ant can still be scored); :func:`make_ant_goal` adds a
  time limit of :data:`HORIZON` steps.
* **Batched**: the rollouts (:class:`ml3cli.rl.EnvPool`) reset the environments through gymnasium, then step
  them all at once with :class:`AntGoalBatch` (on the task option ``sim_threads`` threads): the same trajectories
  as ``step``, bit for bit (:mod:`ml3cli.envs.mujoco_batch`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ml3cli.envs.goals import requested_goal
from ml3cli.envs.mujoco_batch import BatchStep, MujocoBatch
from ml3cli.errors import simulators_needed

with simulators_needed("gymnasium's MuJoCo Ant"):
    from gymnasium.envs.mujoco.ant_v5 import AntEnv
    from gymnasium.spaces import Box

#: default episode length (gymnasium's Ant uses 1,000; goal-reaching work such as MAML's AntGoal uses 200).
HORIZON = 200
GOAL_RADIUS = 2.0


def ant_goal_reward(distance: np.ndarray | float, action: np.ndarray) -> np.ndarray | float:
    """R_g = −d + 5/(d + 0.25) − |a|₁ (paper, appendix C); ``action`` has the action axis last."""
    return -distance + 5.0 / (distance + 0.25) - np.abs(action).sum(-1)


class AntGoalEnv(AntEnv):
    """Ant-v5 with a goal (set by ``reset(options={"goal": ...})``), the goal in the observation and the paper's R_g."""

    def __init__(self, goal_radius: float = GOAL_RADIUS, **kwargs: Any):
        kwargs.setdefault("exclude_current_positions_from_observation", False)
        kwargs.setdefault("include_cfrc_ext_in_observation", False)
        kwargs.setdefault("terminate_when_unhealthy", False)
        super().__init__(**kwargs)
        if not goal_radius > 0:
            raise ValueError(f"goal_radius must be positive, got {goal_radius}")
        self.goal_radius = float(goal_radius)
        self.goal = np.array([self.goal_radius, 0.0])
        self._requested_goal: np.ndarray | None = None
        inner = self.observation_space.shape[0]
        self.observation_space = Box(low=-np.inf, high=np.inf, shape=(inner + 2,), dtype=np.float64)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self._requested_goal = requested_goal(options)
        return super().reset(seed=seed, options=options)

    def reset_model(self) -> np.ndarray:
        if self._requested_goal is not None:
            self.goal = self._requested_goal
        else:  # drawn before the state so that a requested goal leaves the state draws unchanged
            angle = self.np_random.uniform(0.0, 2 * np.pi)
            self.goal = self.goal_radius * np.array([np.cos(angle), np.sin(angle)])
        return super().reset_model()

    def _get_obs(self) -> np.ndarray:
        return np.concatenate([super()._get_obs(), self.goal])

    def distance(self) -> float:
        """d = ‖torso_xy − goal‖."""
        return float(np.linalg.norm(self.data.qpos[:2] - self.goal))

    def _get_rew(self, action) -> tuple[float, dict[str, float]]:
        """R_g of the current state after ``action`` (clipped as MuJoCo's ctrlrange applies it)."""
        distance = self.distance()
        applied = np.clip(action, self.action_space.low, self.action_space.high)
        return float(ant_goal_reward(distance, applied)), {"distance": distance}

    def step(self, action):
        self.do_simulation(action, self.frame_skip)
        reward, info = self._get_rew(action)
        info.update(x_position=self.data.qpos[0], y_position=self.data.qpos[1])
        return self._get_obs(), reward, False, False, info

    def _get_reset_info(self) -> dict[str, float]:
        return {"distance": self.distance()}


def make_ant_goal(horizon: int = HORIZON, **kwargs: Any):
    """:class:`AntGoalEnv` with a time limit of ``horizon`` steps."""
    from gymnasium.wrappers import TimeLimit

    return TimeLimit(AntGoalEnv(**kwargs), max_episode_steps=horizon)


class AntGoalBatch(MujocoBatch):
    """:meth:`AntGoalEnv.step` for many ant environments at once (see :mod:`ml3cli.envs.mujoco_batch`)."""

    # one ant step (5 MuJoCo steps with contacts) is ~0.3 ms of mj_step, far above the cost of handing work to a
    # thread, and mj_step releases the GIL (bare mj_step on 2 threads: 0.71 instead of 1.07 s of wall time). On the
    # shared 2-core machine, whose cores were rarely free, the rollouts gained nothing measurable, so the tasks
    # ask for threads only through their sim_threads option (docs/speed.md)
    threaded = True

    def outcome(self, qpos: np.ndarray, qvel: np.ndarray, xpos: np.ndarray, applied: np.ndarray) -> BatchStep:
        distance = np.linalg.norm(qpos[:, :2] - self.goal, axis=-1)
        obs = np.concatenate([qpos, qvel, self.goal], axis=1)
        return BatchStep(obs, ant_goal_reward(distance, applied), distance)
