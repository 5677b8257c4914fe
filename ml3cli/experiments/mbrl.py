"""Model-based RL (paper, sections 3.2.1 and 4.1.2, figure 3, algorithms 3 and 5): a loss meta-trained through a
learned dynamics model P trains policies on the REAL system, without a model, toward goals around the whole
circle (most of them outside the meta-train quadrant), faster than the task loss differentiated through P.

Tasks ``pointmass_goal`` and ``reacher_goal`` (:mod:`ml3cli.tasks.mbrl`), recipes ``mbrl_pointmass`` and
``mbrl_reacher``; each meta-train seed m also learns its own P, kept in the meta-train checkpoint beside the
artifact (:func:`model_state_from_checkpoint`).

Protocol (:func:`~ml3cli.experiments.protocol.compare_losses`), per recipe, 3 meta-train seeds:

* **learned** (seed m): a fresh policy trained with M_φ only; before each update it is rolled out on the real
  system, the loss inputs are that trajectory's states with the actions recomputed by π_θ; no model.
* **task loss through P** (seed m): the same policy trained by SGD on the final distance of its rollout in the P
  of meta-train seed m (``model_gradient: true``), so the baseline is one per meta-train seed and each learned
  loss is paired with the baseline of its own P.
* Both at the recipe's rate (0.1) and each at its own rate chosen on validation goals of the test family (the whole
  circle, the ``validation`` stream), on a log grid widened until the choice is interior (below 0.01 where the
  baseline wants it). Test: the recipe's 10 goals × 3 test seeds, 50 updates.

Metric: the REAL final distance ‖p_T − g‖ after 0/1/5/10/20/50 updates. ``extra``: the final distance at the last
update split into goals inside and outside the meta-train quadrant. Cost (``TUNING``): the rates are chosen on
5 goals × 2 validation seeds (pointmass) and 5 goals × 1 seed on a grid a decade apart, not half a decade
(reacher), not on the test's 10 × 3: the rollouts dominate the comparison's time (measured on the reacher: 50
updates of 10 goals, one seed, about 16 s for a learned loss and 36 s through P on a loaded 2-core machine).
Environment samples: real steps only (P's data and refits at meta-train; every real rollout at meta-test, tuning
and figures included).

Figures: 3a, the real paths of policies trained by the learned loss toward meta-train and other goals
(``trajectories_RECIPE.png``, :func:`goal_trajectories`); 3b–c, the final distance against updates
(``final_distance_RECIPE.png``, :func:`ml3cli.plots.distance_curves`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from ml3cli.engine import LossFn, sgd_step
from ml3cli.errors import ML3Error
from ml3cli.evaluate import LossCurves
from ml3cli.experiments.protocol import Baseline, Context, EvalSizes, Experiment, compare_losses
from ml3cli.losses import LossSpec
from ml3cli.plots import distance_curves, png_bytes
from ml3cli.runtime import generator, stream_seed
from ml3cli.tasks import make_task
from ml3cli.tasks.mbrl import GoalReachingTask

REPORT_STEPS = (0, 1, 5, 10, 20, 50)
#: per task, the validation split and the grid: smaller than the test (10 goals × 3 seeds), and for the reacher
#: coarser than the default half decade, because the rollouts (MuJoCo's above all) dominate the comparison's time
TUNING = {
    "pointmass_goal": EvalSizes(validation_tasks=5, validation_seeds=2),
    "reacher_goal": EvalSizes(validation_tasks=5, validation_seeds=1, grid_step=1.0),
}
#: goals of figure 3a outside the meta-train quadrant: the left half of the circle
OTHER_GOALS_ANGLE = (100.0, 260.0)


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


# -- the protocol ---------------------------------------------------------------------------------------------
def run(context: Context) -> list[dict[str, Any]]:
    """One comparison per recipe (pointmass, reacher), with its figures."""
    return [compare_recipe(context, name) for name in context.experiment.recipes]


def compare_recipe(context: Context, name: str) -> dict[str, Any]:
    """The learned losses of recipe ``name`` against the task loss through each meta-train seed's P."""
    recipe = context.recipe(name, seed=context.meta_seeds[0])
    test = recipe.meta_test
    sector = make_task(recipe.task, recipe.task_options).options.goal_angle
    curves: dict[str, LossCurves] = {}

    def extra(found: dict[str, LossCurves]) -> dict[str, Any]:
        curves.update(found)  # kept for the figures
        return region_split(test.task, test.task_options, sector, found)

    comparison = compare_losses(
        context,
        name,
        report_steps=REPORT_STEPS,
        baseline=model_baseline(context, name),
        sizes=TUNING[test.task],
        extra=extra,
    )
    context.figures[f"final_distance_{name}.png"] = distance_curves(
        {
            f"{who} @ {kind} lr": np.concatenate([curves[label].per_seed for label in labels(curves, who, kind)])
            for who in ("learned", "baseline")
            for kind in ("fixed", "tuned")
        },
        f"{test.task}: real final distance (learned: {len(context.meta_seeds)} meta-train seeds × test seeds; "
        "baseline: the task loss through each seed's P)",
    )
    first = context.meta_seeds[0]
    context.figures[f"trajectories_{name}.png"] = trajectories_figure(
        context, name, sector, comparison["lr"]["learned_tuned"][str(first)], test.steps
    )
    return comparison


def model_baseline(context: Context, name: str) -> Baseline:
    """The task loss (final distance) differentiated through the P of each meta-train seed, on the test goals."""
    recipe = context.recipe(name, seed=context.meta_seeds[0])
    test = recipe.meta_test
    # P's architecture is the meta-train task's; everything that draws goals and starts is the test's
    model = {k: v for k, v in recipe.task_options.items() if k in ("model_hidden", "model_members")}
    options = {**model, **test.task_options, "system": "real", "model_gradient": True}

    def make(meta_seed: int | None) -> tuple[GoalReachingTask, LossFn]:
        task = make_task(test.task, options, where="meta_test.task_options")
        assert meta_seed is not None and isinstance(task, GoalReachingTask)
        task.load_state_tensors(model_state_from_checkpoint(context.artifact_paths[name][meta_seed]))
        fn = task.builtin_losses["final_distance"]
        return task, lambda inputs: fn(**inputs)

    return Baseline("task loss through P", make, per_meta_seed=True)


def labels(curves: Mapping[str, LossCurves], who: str, kind: str) -> list[str]:
    """The labels of ``who`` (learned / baseline) at ``kind`` (fixed / tuned), one per meta-train seed."""
    return [label for label in curves if label.startswith(who) and label.endswith(f"@{kind}")]


def in_sector(goals: np.ndarray, angle: Sequence[float]) -> np.ndarray:
    """Whether each goal ``[..., 2]`` lies in the sector ``angle`` (degrees, lo ≤ hi)."""
    degrees = np.degrees(np.arctan2(goals[..., 1], goals[..., 0]))
    lo, hi = angle
    return ((degrees - lo) % 360 <= (hi - lo)) if hi - lo < 360 else np.ones(degrees.shape, bool)


def region_split(
    task_name: str, options: dict[str, Any], sector: Sequence[float], curves: Mapping[str, LossCurves]
) -> dict[str, Any]:
    """The final distance at the last update, mean over goals inside / outside the meta-train sector (over every
    meta-train seed and test seed), per loss and rate. The goals are redrawn as :func:`ml3cli.evaluate.evaluate`
    drew them (test seeds 0, 1, … of the ``test`` stream)."""
    task = make_task(task_name, options)
    seeds, goals = next(iter(curves.values())).values.shape[:2]
    drawn = np.stack(
        [task.sample_tasks(goals, generator(stream_seed("test", s))).goal.cpu().numpy() for s in range(seeds)]
    )
    inside = in_sector(drawn, sector)
    split: dict[str, Any] = {"meta_train_sector": list(sector), "goals_inside": int(inside.sum()), "goals": inside.size}
    for who in ("learned", "baseline"):
        for kind in ("fixed", "tuned"):
            last = np.stack([curves[label].values[:, :, -1] for label in labels(curves, who, kind)])
            split[f"{who}@{kind}"] = {
                "inside": float(last[:, inside].mean()) if inside.any() else None,
                "outside": float(last[:, ~inside].mean()) if (~inside).any() else None,
            }
    return {"final_by_region": split}


# -- figures --------------------------------------------------------------------------------------------------
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


def trajectories_figure(context: Context, name: str, sector: Sequence[float], lr: float, updates: int) -> bytes:
    """Figure 3a: the learned loss of the first meta-train seed at its tuned rate, 5 goals in the meta-train
    sector and 5 on the left half of the circle; its real rollouts are counted as meta-test samples."""
    recipe = context.recipe(name, seed=context.meta_seeds[0])
    test = recipe.meta_test
    task = make_task(test.task, {**test.task_options, "system": "real", "model_gradient": False})
    assert isinstance(task, GoalReachingTask)
    loss_fn = LossSpec(str(context.artifact_paths[name][context.meta_seeds[0]])).resolve(task, lr, task.device)
    groups = {}
    for label, angle, k in (("meta-train sector", sector, 0), ("left half of the circle", OTHER_GOALS_ANGLE, 1)):
        sampler = make_task(test.task, {**test.task_options, "goal_angle": list(angle)})
        goals = sampler.sample_goals(5, generator(stream_seed("test", 1000 + k)))
        paths = trained_paths(task, loss_fn.named.fn, lr, goals, updates, stream_seed("test", k))
        groups[f"goals in the {label} ({updates} updates)"] = (paths, goals.numpy())
    context.count_samples(task.environment_samples)
    return goal_trajectories(groups, f"{test.task}: learned loss only (lr {lr:.3g}), real rollouts")


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


EXPERIMENT = Experiment(
    name="mbrl",
    paper="4.1.2, figure 3",
    claim="a loss learned through a dynamics model trains policies on the real system, toward goals outside the "
    "meta-train region, faster than the task loss through that model",
    recipes=("mbrl_pointmass", "mbrl_reacher"),
    run=run,
    meta_seeds=3,
    quick={
        "mbrl_pointmass": (
            "outer.steps=40",
            "task_options.fit_steps=300",
            "task_options.refit_every=20",
            "meta_test.steps=10",
            "meta_test.tasks=3",
            "meta_test.seeds=1",
        ),
        "mbrl_reacher": (
            "outer.steps=4",
            "task_options.random_rollouts=16",
            "task_options.fit_steps=200",
            "meta_test.steps=5",
            "meta_test.tasks=3",
            "meta_test.seeds=1",
        ),
    },  # fmt: skip
    quick_eval={"tasks": 3, "seeds": 2},
    cost="≈ 50 min (estimate; --jobs 2, 2 CPUs)",
)
