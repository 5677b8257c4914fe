"""Figure 6c of the paper (section 4.2.4): the ReacherGoal targets in end-effector space. Returns PNG bytes;
:mod:`ml3cli.artifacts` writes them."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ml3cli.envs.reacher import LINKS  # noqa: E402
from ml3cli.plots import _png  # noqa: E402


def targets_figure(
    train_goals: np.ndarray, test_goals: np.ndarray, expert_paths: np.ndarray, test_paths: np.ndarray, title: str
) -> bytes:
    """Meta-train targets (blue dots, with the experts' fingertip paths) and meta-test targets (orange dots, with
    the paths of policies trained by the learned loss alone); the arm's reach as a grey circle, its base a cross.
    Paths are ``[n, T + 1, 2]``, goals ``[n, 2]``."""
    fig, ax = plt.subplots(figsize=(6, 6.6))
    reach = np.linspace(0, 2 * np.pi, 200)
    ax.plot((LINKS[0] + LINKS[1]) * np.cos(reach), (LINKS[0] + LINKS[1]) * np.sin(reach), color="0.8", lw=1)
    ax.plot(0, 0, "+", color="0.4", markersize=10)
    for paths, colour, label in (
        (expert_paths, "tab:blue", "iLQR expert (meta-train)"),
        (test_paths, "tab:orange", "learned loss only (meta-test)"),
    ):
        for i, path in enumerate(paths):
            ax.plot(path[:, 0], path[:, 1], color=colour, alpha=0.6, lw=1, label=label if i == 0 else None)
    ax.plot(
        train_goals[:, 0],
        train_goals[:, 1],
        "o",
        color="tab:blue",
        markersize=11,
        markeredgecolor="black",
        label="meta-train targets (with demonstrations)",
    )
    ax.plot(
        test_goals[:, 0],
        test_goals[:, 1],
        "o",
        color="tab:orange",
        markersize=11,
        markeredgecolor="black",
        label="meta-test targets (no expert)",
    )
    start = expert_paths[0, 0]
    ax.plot(start[0], start[1], "s", color="black", markersize=6, label="fingertip start")
    ax.set_aspect("equal")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)
