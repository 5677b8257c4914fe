"""ReacherGoal for model-free RL (paper, section 4.1.3 and appendix C): gymnasium's Reacher-v5 with a goal per task.

Data sheet
----------
* **System**: gymnasium's 2-link planar arm (``reacher.xml``, links 0.1 m and 0.11 m, timestep 0.01 s, frame
  skip 2, so one step is 0.02 s). Gymnasium's own model file and physics; only the goal and the reward change.
* **Task**: a goal g ∈ R² within reach; ``reset(options={"goal": (x, y)})`` sets it, otherwise it is drawn
  uniformly from the disc of radius 0.2 around the base (gymnasium's own goal distribution).
  The initial link configuration is drawn per episode as in gymnasium (q ~ U[−0.1, 0.1], q̇ ~ U[−0.005, 0.005]).
* **Observation** (10, float64): cos q₁, cos q₂, sin q₁, sin q₂, the goal g (x, y), q̇₁, q̇₂, fingertip − goal
  (x, y): gymnasium's Reacher-v5 observation, which already carries the goal (the paper's 11-dimensional v2 state
  had an extra z-component of fingertip − goal, always 0).
* **Action** (2): joint torques in [−1, 1].
* **Reward** (paper, appendix C): R_g = −d + 1/(d + 0.001) − |a|₁, with d = ‖fingertip − g‖ after the step and
  |a|₁ the L1 norm of the applied action. ``info["distance"]`` is d.
* **Episode end**: never terminates; :func:`make_reacher_goal_mf` adds gymnasium's 50-step time limit.
* **Batched**: the rollouts (:class:`ml3cli.rl.EnvPool`) reset the environments through gymnasium, then step
  them all at once with :class:`ReacherGoalMFBatch`: the same trajectories as ``step``, bit for bit
  (:mod:`ml3cli.envs.mujoco_batch`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ml3cli.envs.goals import requested_goal
from ml3cli.envs.mujoco_batch import BatchStep, MujocoBatch
from ml3cli.errors import simulators_needed

with simulators_needed("gymnasium's MuJoCo Reacher"):
    from gymnasium.envs.mujoco.reacher_v5 import ReacherEnv

#: episode length of gymnasium's Reacher (its registered ``max_episode_steps``).
HORIZON = 50
#: radius of the disc the goals are drawn from (gymnasium's; the arm reaches 0.21).
GOAL_RADIUS = 0.2


def reacher_goal_reward(distance: np.ndarray | float, action: np.ndarray) -> np.ndarray | float:
    """R_g = −d + 1/(d + 0.001) − |a|₁ (paper, appendix C); ``action`` has the action axis last."""
    return -distance + 1.0 / (distance + 0.001) - np.abs(action).sum(-1)


def draw_reacher_goal(rng: np.random.Generator) -> np.ndarray:
    """A goal uniformly in the disc of radius :data:`GOAL_RADIUS` (rejection sampling, as gymnasium)."""
    while True:
        goal = rng.uniform(low=-GOAL_RADIUS, high=GOAL_RADIUS, size=2)
        if np.linalg.norm(goal) < GOAL_RADIUS:
            return goal


class ReacherGoalMFEnv(ReacherEnv):
    """Reacher-v5 whose goal is set by ``reset(options={"goal": ...})`` and whose reward is the paper's R_g."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._requested_goal: np.ndarray | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self._requested_goal = requested_goal(options)
        return super().reset(seed=seed, options=options)

    def reset_model(self) -> np.ndarray:
        # the same draws as gymnasium's Reacher, in the same order, except that a requested goal replaces the draw
        qpos = self.np_random.uniform(low=-0.1, high=0.1, size=self.model.nq) + self.init_qpos
        self.goal = self._requested_goal if self._requested_goal is not None else draw_reacher_goal(self.np_random)
        qpos[-2:] = self.goal
        qvel = self.init_qvel + self.np_random.uniform(low=-0.005, high=0.005, size=self.model.nv)
        qvel[-2:] = 0
        self.set_state(qpos, qvel)
        return self._get_obs()

    def distance(self) -> float:
        """d = ‖fingertip − goal‖ in the plane."""
        return float(np.linalg.norm((self.get_body_com("fingertip") - self.get_body_com("target"))[:2]))

    def _get_rew(self, action):
        distance = self.distance()
        applied = np.clip(action, self.action_space.low, self.action_space.high)  # what MuJoCo's ctrlrange applies
        reward = float(reacher_goal_reward(distance, applied))
        return reward, {"distance": distance, "reward_ctrl": -float(np.abs(applied).sum())}

    def _get_reset_info(self) -> dict[str, float]:
        return {"distance": self.distance()}


def make_reacher_goal_mf(**kwargs: Any):
    """:class:`ReacherGoalMFEnv` with gymnasium's 50-step time limit (what ``gymnasium.make`` would add)."""
    from gymnasium.wrappers import TimeLimit

    return TimeLimit(ReacherGoalMFEnv(**kwargs), max_episode_steps=HORIZON)


class ReacherGoalMFBatch(MujocoBatch):
    """``ReacherGoalMFEnv.step`` for many reacher environments at once (see :mod:`ml3cli.envs.mujoco_batch`)."""

    # not threaded: one step (2 MuJoCo steps of a 2-link arm) is ~0.03 ms, less than handing it to a thread costs
    # (measured: a rollout of 16 arms ran at 11,800 instead of 16,100 steps/s on 2 threads)
    bodies = ("fingertip", "target")

    def outcome(self, qpos: np.ndarray, qvel: np.ndarray, xpos: np.ndarray, applied: np.ndarray) -> BatchStep:
        fingertip, target = xpos[:, self.body["fingertip"]], xpos[:, self.body["target"]]
        offset = (fingertip - target)[:, :2]  # as gymnasium's observation and distance
        theta = qpos[:, :2]
        obs = np.concatenate([np.cos(theta), np.sin(theta), qpos[:, 2:], qvel[:, :2], offset], axis=1)
        distance = np.linalg.norm(offset, axis=-1)
        return BatchStep(obs, reacher_goal_reward(distance, applied), distance)
