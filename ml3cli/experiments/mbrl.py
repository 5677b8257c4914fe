"""Model-based RL (paper, sections 3.2.1 and 4.1.2, figure 3, algorithm 5): the learned loss against the task loss
through the learned dynamics model, on PointmassGoal and ReacherGoal (tasks ``pointmass_goal`` and ``reacher_goal``,
recipes ``mbrl_pointmass.yaml`` and ``mbrl_reacher.yaml``; the table and figures: ``benchmarks/mbrl.py``).

Meta-test protocol, per evaluation seed s (goals and θ₀ from ``generator(seed + s)``, the same for every loss):

* **learned**: a fresh policy is trained with M_φ only; before each update it is rolled out on the real system
  (``system: real``), the loss inputs are that trajectory's states with the actions recomputed by π_θ; no model.
* **model-based task loss**: the same policy trained by SGD on the final distance of its rollout in the dynamics
  model P learned at meta-train time (``model_gradient: true``: P's weights and data come from the meta-train
  checkpoint), at the learned loss's learning rate and at its own best rate, chosen on meta-TRAIN goals (other
  seeds) from ``baseline_lrs``.

Every curve is the REAL final distance ‖p_T − g‖ of the current policy after 0 … ``updates`` updates, mean over
the goals, per seed.

Figures: 3a, the real paths of policies trained by the learned loss toward meta-train and meta-test goals
(:func:`goal_trajectories`); 3b–c, the final distance against updates (:func:`ml3cli.plots.distance_curves`, drawn
alike for figure 6d).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from ml3cli.engine import LossFn, sgd_step
from ml3cli.errors import ML3Error
from ml3cli.evaluate import NamedLoss, evaluate
from ml3cli.plots import png_bytes
from ml3cli.runtime import generator
from ml3cli.tasks import make_task
from ml3cli.tasks.mbrl import GoalReachingTask

REPORT_STEPS = (0, 1, 5, 10, 20, 50)


def model_state_from_checkpoint(artifact: str | Path) -> dict[str, Tensor]:
    """P's state (``model/…`` tensors) from the meta-train checkpoint beside ``artifact``."""
    from ml3cli.checkpoints import read_checkpoint_info
    from ml3cli.recipes import checkpoint_path_for

    path = checkpoint_path_for(Path(artifact))
    if not path.is_file():
        raise ML3Error(
            f"{path}: no meta-train checkpoint beside the artifact (it holds the dynamics model P; "
            "meta-train with checkpoint_every > 0)"
        )
    tensors, _ = read_checkpoint_info(path)
    state = {k.removeprefix("task/"): v for k, v in tensors.items() if k.startswith("task/model/")}
    if not state:
        raise ML3Error(f"{path}: the checkpoint holds no dynamics model (task/model/… tensors)")
    return state


@dataclass
class MBRLComparison:
    """What :func:`compare` measured: the curves per loss, the goals of every seed and whether each lies in the
    meta-train sector, the learning rates, and the baseline's score per candidate rate on the meta-train goals."""

    curves: dict[str, np.ndarray]  # label → [seeds, goals, updates + 1] real final distance
    goals: np.ndarray  # [seeds, goals, 2]
    inside: np.ndarray  # [seeds, goals] bool: goal inside the meta-train sector
    lrs: dict[str, float]
    baseline_scores: dict[float, float]


def _in_sector(goals: np.ndarray, angle: Sequence[float]) -> np.ndarray:
    degrees = np.degrees(np.arctan2(goals[..., 1], goals[..., 0]))
    lo, hi = angle
    return ((degrees - lo) % 360 <= (hi - lo)) if hi - lo < 360 else np.ones(degrees.shape, bool)


def compare(
    task_name: str,
    train_options: dict[str, Any],
    test_options: dict[str, Any],
    learned_fn: LossFn,
    lr: float,
    model_state: dict[str, Tensor],
    goals: int = 10,
    seeds: int = 3,
    updates: int = 50,
    baseline_lrs: Sequence[float] = (0.01, 0.03, 0.1, 0.3, 1.0),
    seed: int = 0,
) -> MBRLComparison:
    """Run the protocol of this module; ``train_options`` are the meta-train task options (for the goal region
    and the baseline's learning-rate choice), ``test_options`` those of the meta-test goals."""
    real = {**test_options, "system": "real", "model_gradient": False}
    learned_task = make_task(task_name, real)
    baseline_task = make_task(task_name, {**real, "model_gradient": True})
    baseline_task.load_state_tensors(model_state)
    tuning_task = make_task(task_name, {**train_options, "system": "real", "model_gradient": True})
    tuning_task.load_state_tensors(model_state)
    base_fn = lambda inputs: baseline_task.builtin_losses["final_distance"](**inputs)  # noqa: E731
    candidates = [NamedLoss(f"task loss via P @{b:g}", base_fn, b) for b in baseline_lrs]
    tuned = evaluate(tuning_task, candidates, goals, 2, updates, seed=10_000 + seed)
    scores = {c.lr: float(c.values[:, :, -1].mean()) for c in tuned}
    scores = {k: (v if math.isfinite(v) else math.inf) for k, v in scores.items()}
    best = min(scores, key=lambda k: scores[k])

    curves = {
        "learned loss (real rollouts, no model)": evaluate(
            learned_task, [NamedLoss("learned", learned_fn, lr)], goals, seeds, updates, seed
        )[0].values
    }
    lrs = {"learned loss (real rollouts, no model)": lr}
    for label, rate in ((f"task loss through P (lr {lr:g})", lr), (f"task loss through P (tuned lr {best:g})", best)):
        if label in curves:
            continue
        curves[label] = evaluate(baseline_task, [NamedLoss(label, base_fn, rate)], goals, seeds, updates, seed)[
            0
        ].values
        lrs[label] = rate
    goal_draws = np.stack([learned_task.sample_tasks(goals, generator(seed + s)).goal.numpy() for s in range(seeds)])
    angle = train_options.get("goal_angle", learned_task.Options().goal_angle)
    return MBRLComparison(curves, goal_draws, _in_sector(goal_draws, angle), lrs, scores)


def table_rows(result: MBRLComparison, steps: Sequence[int] = REPORT_STEPS) -> list[list[str]]:
    """Per loss: mean ± std over seeds (of the mean over goals) at each step, then the final distance at the last
    step split into goals inside / outside the meta-train region (mean over all seeds)."""
    rows = []
    for label, values in result.curves.items():
        per_seed = values.mean(axis=1)
        cells = [f"{per_seed[:, s].mean():.3f} ± {per_seed[:, s].std():.3f}" for s in steps if s < values.shape[2]]
        last = values[:, :, -1]
        inside = f"{last[result.inside].mean():.3f}" if result.inside.any() else "–"
        outside = f"{last[~result.inside].mean():.3f}" if (~result.inside).any() else "–"
        rows.append([label, *cells, inside, outside])
    return rows


def trained_paths(
    task: GoalReachingTask, loss_fn: LossFn, lr: float, goals: Tensor, updates: int, seed: int
) -> np.ndarray:
    """Real paths ``[n, T + 1, 2]`` of fresh policies (θ₀ from ``seed``) trained ``updates`` times with ``loss_fn``
    on real rollouts toward ``goals``."""
    gen = generator(seed)
    batch = task.sample_tasks(goals.shape[0], gen)._replace(goal=goals)
    theta = task.init_theta(goals.shape[0], gen)
    step_all = vmap(lambda th, b: sgd_step(task, loss_fn, th, b, lr))
    with torch.no_grad():
        for _ in range(updates):
            theta = step_all(theta, task.collect(theta, batch, gen, "inner"))
        states = task.collect(theta, batch, gen, "task_loss").states
    return task.position(states).numpy()


# -- figures ------------------------------------------------------------------------------------------------
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
    return png_bytes(fig)
