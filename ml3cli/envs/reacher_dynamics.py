"""The 2-link planar Reacher arm: rigid-body dynamics from MuJoCo (ground truth of the inverse-dynamics task).

Data sheet
    Model: gymnasium's ``reacher.xml`` (:func:`ml3cli.envs.mujoco_models.reacher_model`), unchanged. Arm joints
    ``joint0`` (unlimited; trajectories stay in [−π, π]) and ``joint1`` (range ±3.0 rad). The target's two slide
    joints are held at rest (q = q̇ = q̈ = 0): a separate body, so they do not couple to the arm.
    Ground truth per state (q, q̇, q̈) of the arm, after ``mj_forward``:
    M(q) = the arm block of ``mj_fullM`` (includes the model's armature 1.0 per joint) and
    u = the arm entries of ``qfrc_inverse`` from ``mj_inverse`` = M(q) q̈ + C(q, q̇) q̇ + g(q) + damping · q̇
    (damping 1.0 per joint; gravity (0, 0, −9.81) is perpendicular to the plane of the arm, so g(q) = 0).
"""

from __future__ import annotations

import numpy as np

from ml3cli.envs.mujoco_models import reacher_model
from ml3cli.errors import simulators_needed

with simulators_needed("the Reacher's dynamics (MuJoCo)"):
    import mujoco

ARM_JOINTS = ("joint0", "joint1")


class ReacherDynamics:
    """M(q) and inverse dynamics of the Reacher's two arm joints from MuJoCo.

    ``joint_limits``: ``[2, 2]`` (lower, upper) in radians; ``joint0`` is unlimited in the model and gets [−π, π].
    """

    joint_names = ARM_JOINTS

    def __init__(self):
        self.model = reacher_model()
        self.data = mujoco.MjData(self.model)
        self.dofs = np.array([self.model.jnt_dofadr[self.model.joint(name).id] for name in ARM_JOINTS])
        self.qpos = np.array([self.model.jnt_qposadr[self.model.joint(name).id] for name in ARM_JOINTS])
        limits = []
        for name in ARM_JOINTS:
            joint = self.model.joint(name)
            limited = bool(self.model.jnt_limited[joint.id])
            limits.append(tuple(self.model.jnt_range[joint.id]) if limited else (-np.pi, np.pi))
        self.joint_limits = np.asarray(limits, dtype=float)
        self.dof = len(ARM_JOINTS)

    def _set(self, q, qd=None, qdd=None) -> None:
        # everything else (the target's slides) at rest, so only the arm moves
        self.data.qpos[:] = 0.0
        self.data.qvel[:] = 0.0
        self.data.qacc[:] = 0.0
        self.data.qpos[self.qpos] = q
        if qd is not None:
            self.data.qvel[self.dofs] = qd
        if qdd is not None:
            self.data.qacc[self.dofs] = qdd

    def mass_matrix(self, q) -> np.ndarray:
        """M(q), ``[2, 2]`` (with armature)."""
        self._set(q)
        mujoco.mj_forward(self.model, self.data)
        full = np.zeros((self.model.nv, self.model.nv))
        mujoco.mj_fullM(self.model, self.data, full)
        return full[np.ix_(self.dofs, self.dofs)]

    def inverse_dynamics(self, q, qd, qdd) -> np.ndarray:
        """u, ``[2]``: the joint torques that produce q̈ at (q, q̇)."""
        self._set(q, qd, qdd)
        mujoco.mj_inverse(self.model, self.data)
        return self.data.qfrc_inverse[self.dofs].copy()
