"""Many gymnasium MuJoCo environments of one kind stepped together, without gymnasium's Python per step.

Why: :class:`ml3cli.rl.EnvPool` steps n × E environments at every time step. Through gymnasium's ``step`` each
environment step pays for the control check, ``mj_rnePostConstraint``, the observation and reward built from
small numpy pieces, the distance, the info dict: measured on the ant, as much Python around ``mj_step`` as the
simulation itself, and for the reacher's tiny model far more. A :class:`MujocoBatch` steps the SAME environments'
own ``MjModel``/``MjData`` (reset through gymnasium beforehand, so the initial states are gymnasium's draws) with
one ``mj_step(model, data, nstep=frame_skip)`` each, then computes the observations, rewards and distances of
all of them at once with numpy on ``[count, …]`` arrays.

Same trajectories, bit for bit (``tests/test_mujoco_batch.py`` checks it against ``env.step`` for every
environment that has a batch class):

* the control is what gymnasium's ``do_simulation`` writes (the action clipped to the action space, as the
  rollout hands it over) and the state advances by the same ``mj_step`` call on the same data;
* gymnasium's ``mj_rnePostConstraint`` after the step is left out: it only fills ``cacc``, ``cfrc_int`` and
  ``cfrc_ext``, which neither the ant's observation (without contact forces) nor the reacher's reads, and the
  next ``mj_step`` does not read them either;
* observations, rewards and distances are the environment's own numpy formulas applied along the last axis
  (``np.linalg.norm(..., axis=-1)``, ``np.abs(a).sum(-1)``), which numpy evaluates element for element as it
  does for one row.

Every environment's data is its own, so stepping them on several threads (``threads``; MuJoCo releases the GIL
inside ``mj_step``) gives the same states whatever the number of threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, NamedTuple

import numpy as np

from ml3cli.errors import simulators_needed

with simulators_needed("MuJoCo"):
    import mujoco


class BatchStep(NamedTuple):
    """What one batched step returns, one row per environment (float64)."""

    obs: np.ndarray  # [count, obs_dim]  the observation after the step
    reward: np.ndarray  # [count]  the environment's reward for the step
    distance: np.ndarray  # [count]  the environment's info["distance"] after the step


class MujocoBatch:
    """Steps ``envs`` (gymnasium MuJoCo environments of one class, already reset) together.

    Subclasses name the bodies whose positions they read (:attr:`bodies`; their rows in ``xpos`` are
    ``self.body[name]``) and turn the gathered ``qpos [count, nq]``, ``qvel [count, nv]`` and ``xpos [count,
    nbody, 3]`` into observations, rewards and distances (:meth:`outcome`). ``step(applied, active)`` advances only
    the environments marked ``active`` (the others keep their state and report what they did before). With an
    ``executor`` of ``threads`` threads and :attr:`threaded` set, the environments are stepped in ``threads``
    chunks at once.
    """

    bodies: ClassVar[tuple[str, ...]] = ()
    #: whether one environment step is long enough to be worth handing to another thread
    threaded: ClassVar[bool] = False

    def __init__(self, envs: Sequence[Any], threads: int = 1, executor: ThreadPoolExecutor | None = None):
        self.envs = [env.unwrapped for env in envs]
        first = self.envs[0]
        self.frame_skip = first.frame_skip
        self.goal = np.stack([env.goal for env in self.envs])  # [count, 2], as the resets set them
        self.body = {name: first.model.body(name).id for name in self.bodies}
        self._threads = threads if executor is not None and self.threaded else 1
        self._executor = executor
        # MjData's arrays, looked up once: each attribute access builds a new numpy view, and looked up at every
        # step these views cost the reacher half as much again as its mj_step (measured)
        self._sims = [
            (env.model, env.data, env.data.ctrl, env.data.qpos, env.data.qvel, env.data.xpos) for env in self.envs
        ]
        # the state of every environment, its row written as it is stepped (an environment left unstepped keeps
        # its row): gathered while the data is at hand rather than by a second pass over all of them
        self.qpos = np.stack([sim[3] for sim in self._sims])
        self.qvel = np.stack([sim[4] for sim in self._sims])
        self.xpos = np.stack([sim[5] for sim in self._sims]) if self.bodies else np.empty((len(self.envs), 0, 3))

    def step(self, applied: np.ndarray, active: np.ndarray) -> BatchStep:
        """One environment step for every active environment; ``applied [count, act_dim]`` is the control
        already clipped to the action space (what gymnasium's ``do_simulation`` would write to ``data.ctrl``)."""
        indices = np.flatnonzero(active).tolist()
        if self._threads > 1 and len(indices) > 1:
            chunks = [indices[i :: self._threads] for i in range(min(self._threads, len(indices)))]
            list(self._executor.map(lambda chunk: self._advance(chunk, applied), chunks))  # list: raise errors
        else:
            self._advance(indices, applied)
        return self.outcome(self.qpos, self.qvel, self.xpos, applied)

    def _advance(self, indices: list[int], applied: np.ndarray) -> None:
        frame_skip, read_bodies = self.frame_skip, bool(self.bodies)
        for j in indices:
            model, data, ctrl, qpos, qvel, xpos = self._sims[j]
            ctrl[:] = applied[j]
            mujoco.mj_step(model, data, nstep=frame_skip)
            self.qpos[j] = qpos
            self.qvel[j] = qvel
            if read_bodies:
                self.xpos[j] = xpos

    def outcome(self, qpos: np.ndarray, qvel: np.ndarray, xpos: np.ndarray, applied: np.ndarray) -> BatchStep:
        raise NotImplementedError
