"""Mountain car with a shaped learned loss (paper, section 4.2.3, figure 6a–b): learned losses against the direct
task loss and iLQR (task ``mountain_car``, recipes ``mountain_car.yaml`` and ``mountain_car_shaped.yaml``; the
table and figures: ``benchmarks/mountain_car.py``, whose protocol is to move here).

Meta-test protocol: a fresh policy π_θ₀ (one per seed, the same θ₀ for every loss) is trained for ``updates`` SGD
updates with each loss only: the shaped learned loss, the unshaped learned loss, and the direct task loss
(``final_distance``, differentiated through the car). After every update the policy is rolled out and its final
position x_T and final distance ‖s_T − goal‖ are recorded; the check is x_T ≥ 0.45 after each of the updates
2 … 50. iLQR (:class:`ml3cli.control.ilqr.ILQR`, control-limited) optimises open-loop actions from zero on the plain
cost ½‖s_T − goal‖² (the same minimiser as the distance), and its final distance is recorded after every iteration.

Figures (PNG bytes; :mod:`ml3cli.artifacts` writes them): 6a, the trajectories of the final policies and of iLQR
(:func:`car_trajectories`); 6b, the final distance against updates or iterations (:func:`final_distance_curves`).
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np

from ml3cli.plots import png_bytes


def car_trajectories(
    trajectories: Mapping[str, np.ndarray],
    goal: tuple[float, float],
    intermediate_goal: tuple[float, float] | None = None,
    dt: float = 0.1,
) -> bytes:
    """Figure 6a: position x_t against time (left) and on the hill y = sin 3x (right), one line per method.

    ``trajectories[label]`` is ``[T + 1, 2]`` (x, v) from the start to the final state.
    """
    fig, (ax_t, ax_hill) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = np.linspace(-1.2, 0.6, 200)
    ax_hill.plot(xs, np.sin(3 * xs), color="black", linewidth=2)
    ax_hill.plot(goal[0], np.sin(3 * goal[0]), marker="*", markersize=16, color="green", label="goal")
    ax_t.axhline(goal[0], color="green", linestyle="--", linewidth=1, label=f"goal x = {goal[0]:g}")
    if intermediate_goal is not None:
        ax_t.axhline(intermediate_goal[0], color="grey", linestyle=":", linewidth=1, label="intermediate goal x")
        ax_hill.plot(intermediate_goal[0], np.sin(3 * intermediate_goal[0]), marker="o", color="grey")
    for label, states in trajectories.items():
        t = np.arange(states.shape[0]) * dt
        (line,) = ax_t.plot(t, states[:, 0], label=label)
        ax_hill.plot(
            states[:, 0], np.sin(3 * states[:, 0]), marker=".", linestyle="", alpha=0.6, color=line.get_color()
        )
        ax_hill.plot(states[-1, 0], np.sin(3 * states[-1, 0]), marker="s", markersize=9, color=line.get_color())
    ax_t.set_xlabel("time (s)")
    ax_t.set_ylabel("car position x")
    ax_t.set_title("trajectory of the final policy / controls")
    ax_t.grid(True, alpha=0.3)
    ax_t.legend(fontsize=8)
    ax_hill.set_xlabel("x")
    ax_hill.set_ylabel("height sin(3x)")
    ax_hill.set_title("visited states (square: the last one)")
    ax_hill.grid(True, alpha=0.3)
    return png_bytes(fig)


def final_distance_curves(curves: Mapping[str, np.ndarray], xlabel: str = "policy updates / iLQR iterations") -> bytes:
    """Figure 6b: distance to the goal at the last time step against updates; ``curves[label]`` is
    ``[seeds, updates + 1]`` (mean line, min–max band) or ``[updates + 1]``."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, values in curves.items():
        values = np.atleast_2d(values)
        steps = np.arange(values.shape[1])
        (line,) = ax.plot(steps, values.mean(axis=0), label=label)
        if values.shape[0] > 1:
            ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("‖s_T − goal‖ at the last time step")
    ax.set_title("mountain car: final distance to the goal")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)
