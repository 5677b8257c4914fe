"""The Reacher arm's dynamics in torch, with every constant read from the MuJoCo model (for iLQR's derivatives).

Data sheet
    Model: gymnasium's ``reacher.xml`` (:func:`ml3cli.envs.mujoco_models.reacher_model`), the same model that
    :class:`ml3cli.envs.reacher.ReacherArm` steps with ``mj_step``. State s = (θ₁, θ₂, θ̇₁, θ̇₂), control u = the
    two motor controls (clipped to the ctrl range ±1 as MuJoCo does; the tasks clip further to ±max_action).
    Equations of motion of a planar 2-link arm (gravity is perpendicular to the plane, no contacts: every geom
    has contype 0):

        M(θ₂) θ̈ + c(θ₂, θ̇) + D θ̇ = G u
        M(θ₂) = [[a + 2b cos θ₂, c₂ + b cos θ₂], [c₂ + b cos θ₂, c₂]] + diag(armature)
        c(θ₂, θ̇) = b sin θ₂ · (−(2 θ̇₁ θ̇₂ + θ̇₂²), θ̇₁²)

    a, b, c₂ are read from MuJoCo's own mass matrix (``mj_fullM``) at θ₂ = 0 and θ₂ = π/2 (the form above is exact
    for two hinges with parallel axes and link centres of mass on the link axes, as here); damping D, armature,
    gear G, timestep and frame skip from the model's fields. One step is ``frame_skip`` steps of the classical
    Runge–Kutta 4 scheme at the model's timestep, which is what ``mjINT_RK4`` computes (the tests compare with
    ``mj_step`` on random states and controls). Not modelled: the limit of joint1 at ±3 rad (a constraint that
    acts only beyond it; the expert's paths stay inside).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ml3cli.envs.mujoco_models import reacher_model
from ml3cli.errors import simulators_needed

with simulators_needed("the Reacher's equations (MuJoCo model)"):
    import mujoco

ARM_DOFS = (0, 1)  # joint0, joint1: the arm's degrees of freedom (the target's slides come after them)


def _arm_mass_matrix(model: mujoco.MjModel, q: tuple[float, float]) -> np.ndarray:
    """MuJoCo's M(q) of the arm block (with armature) at q = (θ₁, θ₂)."""
    data = mujoco.MjData(model)
    data.qpos[list(ARM_DOFS)] = q
    mujoco.mj_forward(model, data)
    full = np.zeros((model.nv, model.nv))
    mujoco.mj_fullM(model, data, full)
    return full[np.ix_(ARM_DOFS, ARM_DOFS)]


class TorchReacherArm:
    """f(s, u) of the Reacher arm as a differentiable torch function (float64), parameters from MuJoCo."""

    def __init__(self, frame_skip: int = 1, model: mujoco.MjModel | None = None):
        model = model if model is not None else reacher_model()
        if model.opt.integrator != mujoco.mjtIntegrator.mjINT_RK4:
            raise ValueError(f"the torch arm integrates like mjINT_RK4, the model uses {model.opt.integrator}")
        armature = model.dof_armature[list(ARM_DOFS)]
        straight = _arm_mass_matrix(model, (0.0, 0.0)) - np.diag(armature)
        bent = _arm_mass_matrix(model, (0.0, math.pi / 2)) - np.diag(armature)
        self.a, self.c2 = float(bent[0, 0]), float(bent[1, 1])
        self.b = float(straight[0, 1] - bent[0, 1])
        self.armature = torch.tensor(armature, dtype=torch.float64)
        self.damping = torch.tensor(model.dof_damping[list(ARM_DOFS)], dtype=torch.float64)
        self.gear = torch.tensor(model.actuator_gear[:, 0], dtype=torch.float64)
        self.ctrl_range = torch.tensor(model.actuator_ctrlrange, dtype=torch.float64)  # [2, 2] (lo, hi) per motor
        self.timestep = float(model.opt.timestep)
        self.frame_skip = frame_skip
        self.dt = self.timestep * frame_skip

    def mass_matrix(self, q2: Tensor) -> Tensor:
        """M(θ₂) ``[..., 2, 2]`` including armature."""
        cos = torch.cos(q2)
        m11 = self.a + 2 * self.b * cos + self.armature[0]
        m12 = self.c2 + self.b * cos
        m22 = (self.c2 + self.armature[1]).expand_as(cos)
        return torch.stack([torch.stack([m11, m12], -1), torch.stack([m12, m22], -1)], -2)

    def bias(self, q2: Tensor, qd: Tensor) -> Tensor:
        """Coriolis and centrifugal forces c(θ₂, θ̇) ``[..., 2]`` (MuJoCo's ``qfrc_bias`` without gravity)."""
        h = self.b * torch.sin(q2)
        return torch.stack([-h * (2 * qd[..., 0] * qd[..., 1] + qd[..., 1] ** 2), h * qd[..., 0] ** 2], -1)

    def acceleration(self, q: Tensor, qd: Tensor, u: Tensor) -> Tensor:
        """θ̈ = M⁻¹ (G u − D θ̇ − c) for states ``[..., 2]`` (u already within the ctrl range)."""
        force = self.gear * u - self.damping * qd - self.bias(q[..., 1], qd)
        mass = self.mass_matrix(q[..., 1])
        # the 2 × 2 inverse written out: cheaper than a solve and friendly to vmap/jacrev
        det = mass[..., 0, 0] * mass[..., 1, 1] - mass[..., 0, 1] * mass[..., 1, 0]
        return torch.stack(
            [
                (mass[..., 1, 1] * force[..., 0] - mass[..., 0, 1] * force[..., 1]) / det,
                (mass[..., 0, 0] * force[..., 1] - mass[..., 1, 0] * force[..., 0]) / det,
            ],
            -1,
        )

    def derivative(self, state: Tensor, u: Tensor) -> Tensor:
        return torch.cat([state[..., 2:], self.acceleration(state[..., :2], state[..., 2:], u)], -1)

    def step(self, state: Tensor, u: Tensor) -> Tensor:
        """s' for states ``[..., 4]`` and controls ``[..., 2]``: ``frame_skip`` RK4 steps with u held."""
        u = torch.maximum(torch.minimum(u, self.ctrl_range[:, 1]), self.ctrl_range[:, 0])
        h = self.timestep
        for _ in range(self.frame_skip):
            k1 = self.derivative(state, u)
            k2 = self.derivative(state + 0.5 * h * k1, u)
            k3 = self.derivative(state + 0.5 * h * k2, u)
            k4 = self.derivative(state + h * k3, u)
            state = state + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return state

    __call__ = step
