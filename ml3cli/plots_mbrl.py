"""Figures of the model-based RL experiment (paper, figure 3). Returns PNG bytes; :mod:`ml3cli.artifacts` writes them."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ml3cli.plots import _png  # noqa: E402


def goal_trajectories(groups: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str) -> bytes:
    """Figure 3a: paths on the plane. ``groups[label] = (paths [n, T + 1, 2], goals [n, 2])``; each group gets one
    colour (e.g. meta-train goals blue, meta-test goals orange), goals are stars, starts circles."""
    fig, ax = plt.subplots(figsize=(6, 6))
    for (label, (paths, goals)), colour in zip(groups.items(), ("tab:blue", "tab:orange", "tab:green"), strict=False):
        for i, path in enumerate(paths):
            ax.plot(path[:, 0], path[:, 1], color=colour, alpha=0.8, label=label if i == 0 else None)
            ax.plot(path[0, 0], path[0, 1], "o", color=colour, markersize=4)
        ax.plot(goals[:, 0], goals[:, 1], "*", color=colour, markersize=14, markeredgecolor="black")
    ax.set_aspect("equal")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title)
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    return _png(fig)


def distance_curves(curves: Mapping[str, np.ndarray], title: str) -> bytes:
    """Figure 3b–c: final distance against policy updates; ``curves[label] = [seeds, updates + 1]`` (mean over
    goals per seed), drawn as the mean over seeds with a band of ± one standard deviation."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, values in curves.items():
        steps = np.arange(values.shape[1])
        mean, std = values.mean(0), values.std(0)
        (line,) = ax.plot(steps, mean, label=label)
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("policy updates")
    ax.set_ylabel("final distance to the goal (real system)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _png(fig)
