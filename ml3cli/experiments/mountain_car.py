"""Mountain car with a shaped learned loss (paper, section 4.2.3, figure 6a–b): a loss meta-trained with an
intermediate goal (go back left first, then up the hill) drives a policy to the goal in a few updates, where the
task loss descended directly gets stuck; iLQR on the plain cost is the paper's other reference.

Task ``mountain_car`` (:mod:`ml3cli.tasks.mountain_car`), recipes ``mountain_car_shaped`` (the task loss at
meta-train time is only the shaping terms) and ``mountain_car`` (the same settings, unshaped: the final distance).

Protocol (:func:`~ml3cli.experiments.protocol.compare_losses`), per recipe, 3 meta-train seeds: a fresh policy π_θ₀
(one per test seed, the same θ₀ for every loss) is trained for 50 SGD updates with each loss only: the learned loss
(its gradient reaches θ through the actions, ``loss_gradient: policy``, as the recipes meta-train it) against the
direct task loss (``final_distance`` differentiated through the car, ``loss_gradient: dynamics``: under ``policy``
it would have no gradient), both at the recipe's rate (100) and each at its own rate chosen on validation θ₀
(the ``validation`` stream, 3 θ₀: ``TUNING``), widened until interior. Metric: the final distance ‖s_T − goal‖
after 0/1/2/5/10/20/50 updates, on 5 test seeds (the start is fixed: a test seed is a θ₀).

The verdict is the shaped loss's: the unshaped one is a control (the paper expects it to get stuck like the task
loss), shown beside it. ``extra``: per loss, on how many (meta-train seed, test seed) pairs x_T ≥ 0.45 after each of the updates 2 … 50;
iLQR (:class:`ml3cli.control.ilqr.ILQR`, control-limited, from zero actions, 50 iterations) on the plain cost
½‖s_T − goal‖², and with a tiny control cost, its final distance and whether x_T ≥ 0.45; on the shaped comparison,
shaped − unshaped learned loss, paired by (meta-train seed, test seed), at the fixed and the tuned rates.
Environment samples: every step of the car (meta-train's rollouts; at meta-test every rollout of tuning, test,
figures and iLQR's rollouts, line searches and linearisations).

Figures: 6a, the trajectories of the final policies and of iLQR (``trajectories.png``, :func:`car_trajectories`);
6b, the final distance against updates or iterations (``final_distance.png``, :func:`final_distance_curves`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch

from ml3cli.control.ilqr import ILQR, ILQRResult
from ml3cli.engine import LossFn, sgd_step
from ml3cli.evaluate import LossCurves, NamedLoss
from ml3cli.experiments.protocol import Baseline, Context, EvalSizes, Experiment, Paired, compare_losses
from ml3cli.functional import vmap_batch_size
from ml3cli.losses import LossSpec
from ml3cli.plots import png_bytes
from ml3cli.runtime import generator, stream_seed
from ml3cli.tasks import make_task
from ml3cli.tasks.mountain_car import MountainCarTask

REPORT_STEPS = (0, 1, 2, 5, 10, 20, 50)
ILQR_ITERATIONS = 50
#: iLQR's costs: the plain final cost, and the same with a tiny control cost (it changes which local minimum
#: iLQR finds)
ILQR_CONTROL_COSTS = {"iLQR": 0.0, "iLQR + 1e-6·Σa²": 1e-6}
SHAPED, UNSHAPED = "mountain_car_shaped", "mountain_car"
#: the validation split: 1 task (the one start and goal) × 3 θ₀ from the validation stream, not the test's 5 θ₀
TUNING = EvalSizes(validation_tasks=1, validation_seeds=3)


# -- the protocol ---------------------------------------------------------------------------------------------
def run(context: Context) -> list[dict[str, Any]]:
    """One comparison per recipe against the direct task loss; iLQR, the reach check and shaped − unshaped in
    ``extra``; figures 6a and 6b."""
    task = meta_test_task(context, SHAPED)
    ilqr_runs, ilqr_samples = {}, 0
    for label, control_cost in ILQR_CONTROL_COSTS.items():
        ilqr_runs[label], samples = ilqr_baseline(task, ILQR_ITERATIONS, control_cost)
        ilqr_samples += samples
    context.count_samples(ilqr_samples)
    ilqr = {label: ilqr_record(task, result, ILQR_CONTROL_COSTS[label]) for label, result in ilqr_runs.items()}
    ilqr["environment_samples"] = ilqr_samples

    curves: dict[str, dict[str, LossCurves]] = {}
    comparisons = []
    for name in context.experiment.recipes:
        found: dict[str, LossCurves] = {}

        def extra(all_curves: dict[str, LossCurves], found: dict[str, LossCurves] = found) -> dict[str, Any]:
            found.update(all_curves)  # kept for the figures
            return {"reach": reach_check(all_curves, task.options.reach_x), "ilqr": ilqr}

        comparisons.append(
            compare_losses(
                context,
                name,
                report_steps=REPORT_STEPS,
                baseline=direct_baseline(context, name),
                sizes=TUNING,
                extra=extra,
                control=name == UNSHAPED,  # the paper expects the unshaped loss to get stuck too
            )
        )
        curves[name] = found
    by_name = {c["recipe"]: c for c in comparisons}
    if SHAPED in by_name and UNSHAPED in by_name:
        shaped, unshaped = by_name[SHAPED]["final"], by_name[UNSHAPED]["final"]
        by_name[SHAPED].setdefault("extra", {})["shaped_vs_unshaped"] = {
            kind: dataclasses.asdict(
                Paired.of(np.array(shaped[f"learned_{kind}"]), np.array(unshaped[f"learned_{kind}"]))
            )
            for kind in ("fixed", "tuned")
        }
    context.figures["final_distance.png"] = distance_figure(curves, ilqr_runs, task)
    context.figures["trajectories.png"] = trajectories_figure(context, comparisons, ilqr_runs, task)
    return comparisons


def meta_test_task(context: Context, name: str, **changes: Any) -> MountainCarTask:
    """The meta-test task of recipe ``name`` (with ``changes`` to its options)."""
    test = context.recipe(name, seed=context.meta_seeds[0]).meta_test
    task = make_task(test.task, {**test.task_options, **changes}, where="meta_test.task_options")
    assert isinstance(task, MountainCarTask)
    return task


def direct_baseline(context: Context, name: str) -> Baseline:
    """The task loss (final distance) descended directly, differentiated through the car."""
    task = meta_test_task(context, name, loss_gradient="dynamics")
    fn = task.builtin_losses["final_distance"]
    return Baseline("direct task loss", lambda _: (task, lambda inputs: fn(**inputs)))


def reach_check(curves: Mapping[str, LossCurves], reach: float) -> dict[str, Any]:
    """Per loss (label as in the comparison): on how many (meta-train seed, test seed, task) x_T ≥ ``reach`` after
    each of the updates 2 … S, and the lowest x_T over those updates (mean over the pairs)."""
    checked: dict[str, Any] = {"reach_x": reach}
    for kind in ("fixed", "tuned"):
        for who in ("learned", "baseline"):
            x = [
                c.extras["x_T"][..., 2:]
                for label, c in curves.items()
                if label.startswith(who) and label.endswith(f"@{kind}")
            ]
            kept = np.concatenate([(v >= reach).all(axis=-1).reshape(-1) for v in x])
            lowest = np.concatenate([v.min(axis=-1).reshape(-1) for v in x])
            checked[f"{who}@{kind}"] = {"kept": int(kept.sum()), "of": kept.size, "min_x_T": float(lowest.mean())}
    return checked


def ilqr_baseline(task: MountainCarTask, iterations: int, control_cost: float = 0.0) -> tuple[ILQRResult, int]:
    """iLQR on the plain final cost ½‖s_T − goal‖² (+ ``control_cost``·Σ_t a_t²) from zero actions, with the action
    limits ±0.25; and the car steps it took (rollouts, line-search trials, linearisations along the trajectory)."""
    opts = task.options
    goal = torch.tensor(opts.goal, dtype=torch.float64)
    limit = torch.tensor([task.car.max_action], dtype=torch.float64)
    steps = [0]

    def dynamics(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        steps[0] += vmap_batch_size(x)
        return task.car.step(x, u)

    solver = ILQR(
        dynamics,
        lambda x, u, t: control_cost * (u**2).sum(),
        lambda x: 0.5 * ((x - goal) ** 2).sum(),
        opts.horizon,
        lower=-limit,
        upper=limit,
    )
    start = torch.tensor(opts.start, dtype=torch.float64)
    result = solver.solve(start, torch.zeros(opts.horizon, 1, dtype=torch.float64), iterations=iterations)
    return result, steps[0]


def ilqr_record(task: MountainCarTask, result: ILQRResult, control_cost: float) -> dict[str, Any]:
    """iLQR's final distance and x_T after its last iteration, and the final distance after every iteration."""
    goal = np.array(task.options.goal)
    distance = [float(np.linalg.norm(s[-1].numpy() - goal)) for s in result.trajectories]
    x_final = float(result.trajectories[-1][-1, 0])
    return {
        "control_cost": control_cost,
        "iterations": result.iterations,
        "converged": result.converged,
        "final_distance": distance[-1],
        "x_T": x_final,
        "reached": x_final >= task.options.reach_x,
        "final_distance_per_iteration": distance,
    }


# -- figures --------------------------------------------------------------------------------------------------
def policy_trajectory(task: MountainCarTask, loss: NamedLoss, updates: int, seed: int) -> np.ndarray:
    """The states ``[T + 1, 2]`` of the policy trained with ``loss`` for ``updates`` updates from the θ₀ of test
    seed ``seed`` (the ``test`` stream, as :func:`ml3cli.evaluate.evaluate` draws it)."""
    gen = generator(stream_seed("test", seed))
    batch = task.sample_tasks(1, gen)
    theta = task.init_theta(1, gen)
    with torch.no_grad():
        for _ in range(updates):
            theta = torch.func.vmap(lambda th, b: sgd_step(task, loss.fn, th, b, loss.lr))(theta, batch)
        one = {k: v[0] for k, v in theta.items()}
        states, _ = task.rollout(one, type(batch)(*(t[0] for t in batch)))
    return states.double().numpy()


def trajectories_figure(
    context: Context, comparisons: list[dict[str, Any]], ilqr_runs: Mapping[str, ILQRResult], task: MountainCarTask
) -> bytes:
    """Figure 6a: after the last update, test seed 0: each learned loss of the first meta-train seed and the direct
    task loss, each at its tuned rate; iLQR after its last iteration. The car steps are counted as meta-test."""
    first = context.meta_seeds[0]
    trajectories = {}
    for comparison in comparisons:
        name, updates, lrs = comparison["recipe"], comparison["steps"], comparison["lr"]
        learned_task = meta_test_task(context, name)
        spec = LossSpec(str(context.artifact_paths[name][first]))
        learned = dataclasses.replace(
            spec.resolve(learned_task, lrs["fixed"], learned_task.device).named, lr=lrs["learned_tuned"][str(first)]
        )
        trajectories[f"{name} (learned, lr {learned.lr:.3g})"] = policy_trajectory(learned_task, learned, updates, 0)
        context.count_samples(learned_task.environment_samples)
    comparison = comparisons[0]
    direct_task = meta_test_task(context, comparison["recipe"], loss_gradient="dynamics")
    fn: LossFn = lambda inputs: direct_task.builtin_losses["final_distance"](**inputs)  # noqa: E731
    direct = NamedLoss("direct task loss", fn, comparison["lr"]["baseline_tuned"])
    trajectories[f"direct task loss (lr {direct.lr:.3g})"] = policy_trajectory(
        direct_task, direct, comparison["steps"], 0
    )
    context.count_samples(direct_task.environment_samples)
    for label, result in ilqr_runs.items():
        trajectories[f"{label}, {result.iterations} iterations"] = result.states.numpy()
    opts = task.options
    return car_trajectories(trajectories, opts.goal, opts.intermediate_goal, task.car.dt)


def distance_figure(
    curves: Mapping[str, Mapping[str, LossCurves]], ilqr_runs: Mapping[str, ILQRResult], task: MountainCarTask
) -> bytes:
    """Figure 6b: the final distance against updates at the tuned rates (learned: every meta-train seed × test
    seed; the direct task loss once), and iLQR's against iterations (a converged run keeps its last value)."""
    lines: dict[str, np.ndarray] = {}
    for name, found in curves.items():
        learned = [
            c.values[:, 0, :] for label, c in found.items() if label.startswith("learned") and label.endswith("@tuned")
        ]
        lines[f"{name} (learned, tuned lr)"] = np.concatenate(learned)
    direct = next(iter(curves.values()))["baseline@tuned"]
    lines["direct task loss (tuned lr)"] = direct.values[:, 0, :]
    updates = direct.values.shape[-1] - 1
    goal = np.array(task.options.goal)
    for label, result in ilqr_runs.items():
        distance = np.array([np.linalg.norm(s[-1].numpy() - goal) for s in result.trajectories])
        padded = np.concatenate([distance, np.full(max(0, updates + 1 - distance.size), distance[-1])])
        lines[f"{label} (iterations)"] = padded[: updates + 1]
    return final_distance_curves(lines)


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


EXPERIMENT = Experiment(
    name="mountain_car",
    paper="4.2.3, figure 6a–b",
    claim="a loss shaped with an intermediate goal during meta-training drives the car to the goal in a few "
    "updates, where the task loss descended directly gets stuck",
    recipes=(SHAPED, UNSHAPED),
    run=run,
    meta_seeds=3,
    quick=("outer.steps=30", "meta_test.steps=10", "meta_test.seeds=2"),
    quick_eval={"tasks": 1, "seeds": 2},
)
