"""A differentiable mountain car in torch (paper, section 4.2.3, figure 6a–b; Moore, 1990).

Data sheet
    State s = (x, v): position and velocity, shape ``[..., 2]``. Action a: one force, shape ``[..., 1]``.
    Dynamics (the public reference's torch car; explicit Euler with dt = 0.1), applied in this order:

        a  ← clamp(a, −0.25, 0.25)
        v' = v + (g·m·cos 3x + a/m − k·v)·dt          m = 0.2, g = −9.8, k = 0.3 (friction)
        x' = x + v'·dt
        with ``bounds``: v' ← clamp(v', −1.5, 1.5); x' ← clamp(x', −1.2, 0.5); v' ← 0 if x' = −1.2 and v' < 0

    Start (−0.55, 0); horizon 35 steps; goal (0.5, 1.0375); intermediate goal (−0.947, −0.0055) for the first
    15 steps (the extra information of the shaped task loss). The hill top (where gravity changes sign) is at
    x = π/6 ≈ 0.524, so without ``bounds`` a fast car rolls over it; the reference keeps the walls.

Gradients: every clamp and the wall are ``torch.clamp`` / ``torch.where``, so a bound that is active has its
true derivative, zero (the reference assigns to ``.data``, which passes the unclamped gradient straight through
a clamped value). A saturated action therefore gets no gradient from the dynamics: the policies in
:mod:`ml3cli.tasks.mountain_car` squash their output with 0.25·tanh so that the clamp never binds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MountainCar:
    """The car's constants; :meth:`step` and :meth:`rollout` are pure functions of tensors."""

    mass: float = 0.2
    gravity: float = -9.8
    friction: float = 0.3
    dt: float = 0.1
    max_action: float = 0.25
    bounds: bool = True
    min_position: float = -1.2
    max_position: float = 0.5
    max_speed: float = 1.5

    def step(self, state: Tensor, action: Tensor) -> Tensor:
        """s_{t+1} = f(s_t, a_t) for ``state [..., 2]`` and ``action [..., 1]`` (or ``[...]``)."""
        if action.ndim == state.ndim - 1:
            action = action.unsqueeze(-1)
        x, v = state[..., 0], state[..., 1]
        a = action[..., 0].clamp(-self.max_action, self.max_action)
        v = v + (self.gravity * self.mass * torch.cos(3.0 * x) + a / self.mass - self.friction * v) * self.dt
        x = x + v * self.dt
        if self.bounds:
            v = v.clamp(-self.max_speed, self.max_speed)
            x = x.clamp(self.min_position, self.max_position)
            # the left wall is inelastic: a car that hits it stops (zero velocity, zero derivative)
            v = torch.where((x <= self.min_position) & (v < 0), torch.zeros_like(v), v)
        return torch.stack([x, v], dim=-1)

    def rollout(self, policy, start: Tensor, horizon: int) -> tuple[Tensor, Tensor]:
        """Roll ``policy(state) -> action [..., 1]`` out from ``start [..., 2]`` for ``horizon`` steps.

        Returns the visited states ``[..., horizon + 1, 2]`` (s_0 … s_T) and the actions ``[..., horizon, 1]``
        (a_0 … a_{T−1}, as the policy gave them, before the dynamics' clamp).
        """
        states, actions = [start], []
        state = start
        for _ in range(horizon):
            action = policy(state)
            state = self.step(state, action)
            states.append(state)
            actions.append(action)
        return torch.stack(states, dim=-2), torch.stack(actions, dim=-2)

    def open_loop(self, start: Tensor, actions: Tensor) -> Tensor:
        """The states ``[..., T + 1, 2]`` visited under the action sequence ``actions [..., T, 1]``."""
        states = [start]
        for t in range(actions.shape[-2]):
            states.append(self.step(states[-1], actions[..., t, :]))
        return torch.stack(states, dim=-2)


#: The settings of the paper and the public reference.
START = (-0.55, 0.0)
GOAL = (0.5, 1.0375)
INTERMEDIATE_GOAL = (-0.947, -0.0055)
HORIZON = 35
INTERMEDIATE_STEPS = 15
