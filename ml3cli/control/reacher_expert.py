"""iLQR experts for ReacherGoal: the demonstrations of the behavioural-cloning experiment (paper, section 4.2.4).

For one goal g and start s₀ the expert is the control-limited iLQR solution (:class:`ml3cli.control.ilqr.ILQR`)
on the torch arm (:class:`ml3cli.envs.reacher_torch.TorchReacherArm`, MuJoCo's own equations and constants):

    q* = the inverse kinematics of g with the elbow on the start's side (θ₂ of the start's sign) and θ₁ unwrapped
         to the turn nearest the start's θ₁
    ℓ(s, u)  = w_u ‖u / max_action‖² + w_q ‖q − q*‖²          (running: move there promptly, gently)
    ℓ_f(s)   = w_f ‖q_T − q*‖² + w_v ‖q̇_T‖²                   (final: be at q* and at rest at T)
    |u| ≤ max_action per motor, from u = 0

The cost is in joint space because the fingertip-space cost ‖p_T − g‖² has poor local minima from u = 0 (iLQR
stalls with every control saturated); with q* the fingertip is at g exactly when q_T = q*. The expert policy is
the iLQR solution with its feedback gains, π_expert(s, t) = clip(ū_t + K_t (s − x̄_t)); the demonstration is that
policy run on the REAL MuJoCo arm (:class:`ml3cli.envs.reacher.ReacherArm`): states s_0 … s_T and the actions
u_t = π_expert(s_t, t) it took. Everything is deterministic; :func:`expert_demonstrations` caches one ``.npz`` per
goal under ``$ML3_CACHE_DIR/reacher_demos`` (default ``~/.cache/ml3/reacher_demos``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ml3cli.control.ilqr import ILQR
from ml3cli.envs import reacher as rc
from ml3cli.envs.reacher_torch import TorchReacherArm
from ml3cli.errors import ML3Error

#: bump when the demonstrations would change for the same settings (invalidates caches)
DEMO_FORMAT = 1


@dataclass(frozen=True)
class ExpertSettings:
    """Everything that determines one demonstration (hashed into the cache key)."""

    goal: tuple[float, float]
    start: tuple[float, float, float, float]
    horizon: int = rc.HORIZON
    frame_skip: int = rc.FRAME_SKIP
    max_action: float = rc.MAX_ACTION
    control_cost: float = 1e-3  # w_u
    path_cost: float = 1e-2  # w_q
    final_cost: float = 10.0  # w_f
    final_velocity_cost: float = 1.0  # w_v
    iterations: int = 100


@dataclass(frozen=True)
class Demonstration:
    """One expert demonstration. ``states [T + 1, 4]`` and ``actions [T, 2]`` are from the real MuJoCo arm;
    ``planned [T + 1, 4]``, ``controls [T, 2]`` and ``gains [T, 2, 4]`` are the iLQR solution (x̄, ū, K)."""

    settings: ExpertSettings
    states: np.ndarray
    actions: np.ndarray
    planned: np.ndarray
    controls: np.ndarray
    gains: np.ndarray
    joint_target: np.ndarray  # q*
    iterations: int
    seconds: float

    @property
    def final_distance(self) -> float:
        """‖p_T − g‖ of the fingertip on the real arm (metres)."""
        tip = rc.fingertip(torch.from_numpy(self.states[-1])).numpy()
        return float(np.linalg.norm(tip - np.asarray(self.settings.goal)))

    def action(self, t: int, state: np.ndarray) -> np.ndarray:
        """π_expert(s, t) = clip(ū_t + K_t (s − x̄_t)) for states ``[..., 4]``."""
        u = self.controls[t] + (state - self.planned[t]) @ self.gains[t].T
        return np.clip(u, -self.settings.max_action, self.settings.max_action)


def joint_target(goal: Sequence[float], start: Sequence[float]) -> np.ndarray:
    """q* = (θ₁, θ₂) that puts the fingertip on ``goal``: the elbow on the start's side, θ₁ nearest the start's."""
    l1, l2 = rc.LINKS
    x, y = float(goal[0]), float(goal[1])
    radius = math.hypot(x, y)
    if not abs(l1 - l2) <= radius <= l1 + l2:
        raise ML3Error(
            f"task_options.goals: goal ({x:g}, {y:g}) is out of the arm's reach "
            f"({abs(l1 - l2):g} ≤ ‖g‖ ≤ {l1 + l2:g} m)"
        )
    cos_q2 = (radius**2 - l1**2 - l2**2) / (2 * l1 * l2)
    q2 = math.copysign(math.acos(max(-1.0, min(1.0, cos_q2))), start[1] if start[1] != 0 else 1.0)
    q1 = math.atan2(y, x) - math.atan2(l2 * math.sin(q2), l1 + l2 * math.cos(q2))
    q1 += 2 * math.pi * round((float(start[0]) - q1) / (2 * math.pi))
    return np.array([q1, q2])


def solve_expert(settings: ExpertSettings) -> Demonstration:
    """Plan with iLQR on the torch arm, then run the plan with its feedback gains on the real MuJoCo arm."""
    began = time.perf_counter()
    arm = TorchReacherArm(settings.frame_skip)
    start = torch.tensor(settings.start, dtype=torch.float64)
    target = joint_target(settings.goal, settings.start)
    q_star = torch.from_numpy(target)
    scale = settings.max_action

    def running(x: Tensor, u: Tensor, t: Tensor) -> Tensor:
        return settings.control_cost * ((u / scale) ** 2).sum() + settings.path_cost * ((x[:2] - q_star) ** 2).sum()

    def final(x: Tensor) -> Tensor:
        return settings.final_cost * ((x[:2] - q_star) ** 2).sum() + settings.final_velocity_cost * (x[2:] ** 2).sum()

    limit = torch.full((2,), settings.max_action, dtype=torch.float64)
    solver = ILQR(arm.step, running, final, settings.horizon, lower=-limit, upper=limit)
    plan = solver.solve(start, torch.zeros(settings.horizon, 2), settings.iterations)
    gains = solver.backward_pass(plan.states, plan.controls, solver.mu_min)
    if gains is None:  # Q_uu not positive definite even at the solution: replay open loop
        feedback = np.zeros((settings.horizon, 2, 4))
    else:
        feedback = gains[1].numpy()
    demo = Demonstration(
        settings,
        np.zeros(0),
        np.zeros(0),
        plan.states.numpy(),
        plan.controls.numpy(),
        feedback,
        target,
        plan.iterations,
        0.0,
    )
    states, actions = replay(demo)
    return Demonstration(
        settings,
        states,
        actions,
        demo.planned,
        demo.controls,
        feedback,
        target,
        plan.iterations,
        time.perf_counter() - began,
    )


def replay(demo: Demonstration) -> tuple[np.ndarray, np.ndarray]:
    """Run π_expert on the real MuJoCo arm from the demonstration's start: states ``[T + 1, 4]``, actions ``[T, 2]``."""
    settings = demo.settings
    arm = rc.ReacherArm(settings.frame_skip, settings.max_action)
    data = arm.new_data(np.asarray(settings.start, dtype=np.float64), np.asarray(settings.goal, dtype=np.float64))
    states = [np.asarray(settings.start, dtype=np.float64)]
    actions = []
    for t in range(settings.horizon):
        actions.append(demo.action(t, states[-1]))
        states.append(arm.step(data, actions[-1]))
    return np.stack(states), np.stack(actions)


# -- the cache ------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$ML3_CACHE_DIR/reacher_demos`` if set, else ``~/.cache/ml3/reacher_demos``."""
    base = os.environ.get("ML3_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "ml3") / "reacher_demos"


def _settings_text(settings: ExpertSettings) -> str:
    return json.dumps({"format": DEMO_FORMAT, **asdict(settings)}, sort_keys=True)


_ARRAYS = ("states", "actions", "planned", "controls", "gains", "joint_target")


def load_or_solve(settings: ExpertSettings, cache_dir: Path | None) -> Demonstration:
    """The demonstration from the cache (None: no cache), solved and written there if absent or unreadable."""
    if cache_dir is None:
        return solve_expert(settings)
    text = _settings_text(settings)
    path = Path(cache_dir) / f"expert_{hashlib.sha256(text.encode()).hexdigest()[:20]}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as archive:
                if str(archive["settings"]) == text:
                    arrays = {k: archive[k] for k in _ARRAYS}
                    return Demonstration(
                        settings, **arrays, iterations=int(archive["iterations"]), seconds=float(archive["seconds"])
                    )
        except (OSError, ValueError, KeyError, EOFError):
            pass  # a corrupt or foreign file: solve again and overwrite it
    demo = solve_expert(settings)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        settings=np.array(text),
        iterations=np.array(demo.iterations),
        seconds=np.array(demo.seconds),
        **{k: getattr(demo, k) for k in _ARRAYS},
    )
    from ml3cli.files import write_bytes_atomic

    try:
        write_bytes_atomic(path, buffer.getvalue())
    except OSError as err:
        raise ML3Error(f"task_options.cache_dir: cannot write the expert cache {path} ({err})") from None
    return demo


def expert_demonstrations(
    goals: Sequence[Sequence[float]], start: Sequence[float], cache_dir: Path | None, **settings: float | int
) -> list[Demonstration]:
    """One demonstration per goal (from the cache when there), all from ``start``."""
    base = tuple(float(v) for v in start)
    return [load_or_solve(ExpertSettings((float(g[0]), float(g[1])), base, **settings), cache_dir) for g in goals]
