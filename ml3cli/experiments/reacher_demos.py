"""Loss shaping with expert demonstrations (paper, section 4.2.4, figure 6c–d): a loss meta-trained with a
behavioural-cloning task loss on iLQR demonstrations for 4 fingertip targets trains fresh ReacherGoal policies
toward 6 NEW targets, for which no expert exists, with M_φ alone.

Task ``reacher_demos`` (:mod:`ml3cli.tasks.reacher_demos`: gymnasium's Reacher in MuJoCo, policies rolled out on
the real arm, no model), recipe ``reacher_demos``, 3 meta-train seeds. The iLQR experts behind the
demonstrations are data of the task (:mod:`ml3cli.control.reacher_expert`, solved once and cached under
``$ML3_CACHE_DIR/reacher_demos``).

Comparison (:func:`run`), on the recipe's 6 meta-test targets × 3 test seeds, 50 policy updates from the same θ₀:

* **learned** (seed m): a fresh policy per target trained with M_φ only; before each update it is rolled out on
  the real arm and M_φ sees that trajectory (``demonstrations: false``: nothing of an expert at meta-test).
* **final distance through the simulator** (the task's own loss as the baseline): the same policy trained by SGD
  on the final distance of its rollout in the torch copy of the arm (``model_gradient: true``:
  :class:`~ml3cli.envs.reacher_torch.TorchReacherArm`, MuJoCo's equations, exact), differentiated through the
  simulator: an oracle gradient the learned loss never gets.
* Both at the recipe's rate (0.1) and each at its own rate chosen on validation tasks of the test family (the
  same 6 targets, the family is a fixed list, with θ₀ from the ``validation`` stream, 1 seed:
  :data:`VALIDATION_SEEDS`), on a grid of five rates half a decade apart around 0.1, widened while an edge wins.

Metric: the REAL final fingertip distance ‖p_T − g‖ after 0/1/10/50 updates. The verdict is the paper's claim
(figure 6d): the learned loss against the behavioural-cloning baselines (:func:`cloning_baselines`), each at the
fixed rate and at its own rate chosen on the same validation tasks, one comparison each. The baseline through the
simulator goes beyond the paper (an exact gradient of the test metric that no user without a differentiable
simulator has): its comparison is shown as a control, outside the verdict.

* **behavioural cloning**: the fresh policy π_θ(s, g) trained by SGD on the behavioural-cloning loss pooled over
  the demonstrations of the meta-TRAIN targets, mean_i Σ_t ‖π_θ(s^E_{i,t}, g_i) − u^E_{i,t}‖² / max_action², then
  run on its (test) target: it generalises through the goal input g;
* **behavioural cloning on own rollouts** (DAgger-like, what the recipe's ``bc_states: policy`` meta-training
  got): each update rolls the policy out toward every meta-train target and fits the expert's feedback law on
  those states, then the policy is run on its test target.

Changed from the former script: the curves on the meta-train targets are gone (the claim is about new targets),
and the cloning baselines are tuned on the validation tasks like every other loss, not on the meta-train targets.

Environment samples: at meta-train, the demonstrations (T = 65 real steps per target) and every real rollout; at
meta-test, every real rollout (the learned loss's inputs, each measurement, the DAgger-like baseline's rollouts;
the baseline through the simulator also collects a real rollout per update, which its loss ignores) and the
baseline's differentiable rollouts in the simulator (one per task and update), tuning and figures included.

Figures: 6c, the targets in end-effector space with the experts' and the learned loss's fingertip paths
(``targets.png``, :func:`targets_figure`); 6d, the final distance against updates of every method at its tuned
rate (``final_distance.png``, :func:`ml3cli.plots.distance_curves`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor
from torch.func import grad, vmap

from ml3cli.engine import LossFn, sgd_step
from ml3cli.envs.reacher import LINKS
from ml3cli.evaluate import LossCurves, NamedLoss, evaluate
from ml3cli.experiments.protocol import (
    Context,
    EvalSizes,
    Experiment,
    comparison_record,
    tune_interior,
    widen_until_interior,
)
from ml3cli.losses import LossSpec
from ml3cli.plots import distance_curves, png_bytes
from ml3cli.runtime import generator, stream_seed
from ml3cli.tasks import make_task
from ml3cli.tasks.base import Theta
from ml3cli.tasks.reacher_demos import DemoBatch, ReacherDemosTask

RECIPE = "reacher_demos"
REPORT_STEPS = (0, 1, 10, 50)
#: validation seeds (each the test's targets with other θ₀): the baseline's differentiable rollouts are costly
VALIDATION_SEEDS = 1
#: the rate grid starts at ±this many half-decades around the recipe's rate (widened while an edge wins)
#: the tuning grid: half a decade apart, ±1 decade around the recipe's rate to start
GRID = EvalSizes(grid_span=1.0)
BASELINE = "final distance through the simulator"
CLONING = ("behavioural cloning", "behavioural cloning on own rollouts (DAgger-like)")


# -- the protocol ---------------------------------------------------------------------------------------------
def run(context: Context) -> list[dict[str, Any]]:
    """One comparison (learned against the final distance through the simulator), the cloning baselines in its
    ``extra``, and figures 6c–d."""
    recipe = context.recipe(RECIPE, seed=context.meta_seeds[0])
    test = recipe.meta_test
    where = "meta_test.task_options"
    task = make_task(test.task, {**test.task_options, "demonstrations": False}, where=where)
    through = make_task(test.task, {**test.task_options, "demonstrations": False, "model_gradient": True}, where=where)
    tasks, seeds = test.tasks, test.seeds
    if context.quick:
        tasks, seeds = context.experiment.quick_eval["tasks"], context.experiment.quick_eval["seeds"]
    tune_seeds = min(VALIDATION_SEEDS, seeds)
    steps, fixed = test.steps, recipe.meta_test_lr
    horizon = through.horizon

    def tune(on: ReacherDemosTask, loss: NamedLoss) -> tuple[float, dict[float, float]]:
        return tune_interior(on, loss, fixed, tasks, tune_seeds, steps, sizes=GRID)

    started = time.perf_counter()
    final_distance = through.builtin_losses["final_distance"]
    baseline = NamedLoss(BASELINE, lambda inputs: final_distance(**inputs), fixed)
    base_tuned, base_scores = tune(through, baseline)
    learned = {m: LossSpec(str(path)).resolve(task, fixed, task.device).named
               for m, path in context.artifact_paths[RECIPE].items()}  # fmt: skip
    learned_tuned = {m: tune(task, loss) for m, loss in learned.items()}
    tuning_seconds = time.perf_counter() - started

    started = time.perf_counter()
    curves: dict[str, LossCurves] = {}
    for m, loss in learned.items():
        curves.update(at_both_rates(task, loss, fixed, learned_tuned[m][0], f"learned{m}", tasks, seeds, steps))
    curves.update(at_both_rates(through, baseline, fixed, base_tuned, "baseline", tasks, seeds, steps))
    test_seconds = time.perf_counter() - started
    # one differentiable rollout in the simulator per task and update of every baseline run, tuning included
    baseline_runs = len(base_scores) * tune_seeds + (1 if base_tuned == fixed else 2) * seeds
    context.count_samples(task.environment_samples + through.environment_samples)
    context.count_samples(baseline_runs * tasks * steps * horizon)

    cloning, cloning_curves, cloning_tests = cloning_baselines(
        context, recipe.task_options, task, fixed, tasks, seeds, steps
    )
    learned_lr = {
        "learned_tuned": {str(m): lr for m, (lr, _) in learned_tuned.items()},
        "learned_scores": {str(m): scores for m, (_, scores) in learned_tuned.items()},
        "validation": {"tasks": tasks, "seeds": tune_seeds},
    }
    learned_curves = {label: c for label, c in curves.items() if label.startswith("learned")}
    records = [  # the paper's figure 6d: learned against behavioural cloning, each at its tuned rate
        comparison_record(
            recipe=RECIPE, label=f"new targets: learned vs {name}", task=task.name, metric=task.metric,
            baseline=name, steps=steps, tasks=tasks, seeds=seeds, meta_seeds=list(learned),
            curves={**learned_curves, **cloning_tests[name]},
            lr={"fixed": fixed, "baseline_tuned": found["lr"]["tuned"], "baseline_scores": found["lr"]["scores"],
                **learned_lr},
            seconds={"tuning": round(tuning_seconds, 2), "test": round(test_seconds, 2)},
            report_steps=REPORT_STEPS,
        )
        for name, found in cloning.items()
    ]  # fmt: skip
    records.append(  # beyond the paper: an oracle gradient through the simulator, shown beside the claim
        comparison_record(
            recipe=RECIPE, label=f"new targets: learned vs {BASELINE}", task=task.name, metric=task.metric,
            baseline=BASELINE, steps=steps, tasks=tasks, seeds=seeds, meta_seeds=list(learned), curves=curves,
            lr={"fixed": fixed, "baseline_tuned": base_tuned, "baseline_scores": base_scores, **learned_lr},
            seconds={"tuning": round(tuning_seconds, 2), "test": round(test_seconds, 2)},
            report_steps=REPORT_STEPS, control=True,
        )
    )  # fmt: skip

    per_seed = {
        f"learned loss, no expert (tuned, {len(learned)} meta-train seeds)": np.concatenate(
            [curves[f"learned{m}@tuned"].per_seed for m in learned]
        ),
        f"{BASELINE} (tuned lr {base_tuned:.3g})": curves["baseline@tuned"].per_seed,
        **{f"{name} (tuned lr {cloning[name]['lr']['tuned']:.3g})": c for name, c in cloning_curves.items()},
    }
    context.figures["final_distance.png"] = distance_curves(per_seed, "reacher_demos: new targets (no expert)")
    first = context.meta_seeds[0]
    context.figures["targets.png"] = figure_6c(context, recipe.task_options, task, learned[first],
                                               learned_tuned[first][0], steps)  # fmt: skip
    return records


def at_both_rates(
    task: ReacherDemosTask, loss: NamedLoss, fixed: float, tuned: float, tag: str, tasks: int, seeds: int, steps: int
) -> dict[str, LossCurves]:
    """``{tag}@fixed`` and ``{tag}@tuned`` on the test tasks; one run when the tuned rate is the fixed one."""
    rates = [fixed] if tuned == fixed else [fixed, tuned]
    runs = [dataclasses.replace(loss, lr=lr, label=f"{tag}@{lr!r}") for lr in rates]
    found = evaluate(task, runs, tasks, seeds, steps, seed=0)
    return {f"{tag}@fixed": found[0], f"{tag}@tuned": found[-1]}


def cloning_baselines(
    context: Context, train_options: dict[str, Any], task: ReacherDemosTask, fixed: float, tasks: int, seeds: int,
    steps: int,
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray], dict[str, dict[str, LossCurves]]]:  # fmt: skip
    """Both behavioural-cloning baselines on the test tasks at the fixed rate and at their own rates chosen on the
    validation tasks: per baseline its rates and validation scores, its curves ``[seeds, updates + 1]`` at the
    tuned rate (for figure 6d), and its test curves as ``baseline@fixed`` / ``baseline@tuned`` (for the record)."""
    demo_task = make_task(RECIPE, {**train_options, "demonstrations": True, "bc_states": "expert"})
    dagger_task = make_task(RECIPE, {**train_options, "demonstrations": True, "bc_states": "policy"})
    bc_loss, _ = bc_loss_fn(demo_task)
    makers: dict[str, Callable[[float], Update]] = {
        CLONING[0]: lambda rate: cloning_update(bc_loss, rate),
        CLONING[1]: lambda rate: dagger_update(dagger_task, rate),
    }
    before = task.environment_samples + dagger_task.environment_samples
    tune_seeds = min(VALIDATION_SEEDS, seeds)
    found: dict[str, dict[str, Any]] = {}
    tuned_curves: dict[str, np.ndarray] = {}
    tests: dict[str, dict[str, LossCurves]] = {}
    for name, make in makers.items():

        def score(lrs: list[float], make=make) -> dict[float, float]:
            out = {}
            for rate in lrs:
                final = float(update_curves(task, make(rate), tasks, tune_seeds, steps, "validation")[:, :, -1].mean())
                out[rate] = final if math.isfinite(final) else math.inf
            return out

        best, scores = widen_until_interior(score, fixed, sizes=GRID)
        at_fixed = update_curves(task, make(fixed), tasks, seeds, steps, "test")
        at_tuned = at_fixed if best == fixed else update_curves(task, make(best), tasks, seeds, steps, "test")
        tuned_curves[name] = at_tuned.mean(axis=1)
        found[name] = {"lr": {"fixed": fixed, "tuned": best, "scores": scores}}
        tests[name] = {
            f"baseline@{kind}": LossCurves(f"{name}@{kind}", lr, "builtin", values)
            for kind, lr, values in (("fixed", fixed, at_fixed), ("tuned", best, at_tuned))
        }
    # the demonstrations were counted at meta-train; here the rollouts of the cloned policies and of DAgger
    context.count_samples(task.environment_samples + dagger_task.environment_samples - before)
    return found, tuned_curves, tests


def figure_6c(
    context: Context, train_options: dict[str, Any], task: ReacherDemosTask, loss: NamedLoss, lr: float, steps: int
) -> bytes:
    """The targets with the experts' paths and the paths of policies trained by ``loss`` (test seed 0)."""
    demo_task = make_task(RECIPE, {**train_options, "demonstrations": True})
    experts = np.stack([demo_task.position(torch.from_numpy(d.states)).numpy() for d in demo_task.demonstrations()])
    before = task.environment_samples
    paths, _ = trained_paths(task, loss.fn, lr, steps, stream_seed("test", 0))
    context.count_samples(task.environment_samples - before)
    return targets_figure(
        demo_task.goal_list.numpy(), task.goal_list.numpy(), experts, paths,
        f"reacher_demos: targets (figure 6c); learned-loss paths after {steps} updates",
    )  # fmt: skip


# -- the behavioural-cloning baselines ------------------------------------------------------------------------
def bc_loss_fn(demo_task: ReacherDemosTask) -> tuple[Callable[[Theta], Tensor], DemoBatch]:
    """The pooled behavioural-cloning loss of ONE θ over every demonstration of ``demo_task``, and the batch."""
    demos = demo_task.sample_tasks(len(demo_task.goal_list), generator(0))  # the targets in order (no draw used)

    def loss(theta: Theta) -> Tensor:
        return vmap(demo_task.behavioral_cloning, in_dims=(None, 0))(theta, demos).mean()

    return loss, demos


Update = Callable[[Theta], Theta]  # one update of a batch of policies θ (leading axis)


def cloning_update(bc_loss: Callable[[Theta], Tensor], lr: float) -> Update:
    """θ ← θ − lr ∇ bc_loss(θ), for each policy of a batch."""
    return vmap(lambda th: (lambda g: {k: th[k] - lr * g[k] for k in th})(grad(bc_loss)(th)))


def dagger_update(dagger_task: ReacherDemosTask, lr: float) -> Update:
    """θ ← θ − lr ∇ mean_i BC_i(θ): each policy is rolled out on the real arm toward every meta-train target i and
    its own states are labelled by that target's expert feedback law (``bc_states: policy``: the meta-train task
    loss itself, used directly as a training loss on the meta-train targets)."""
    targets = len(dagger_task.goal_list)
    demos = dagger_task.sample_tasks(targets, generator(0))
    gen = generator(0)  # real rollouts draw nothing

    def per_policy(th: Theta, tasks: DemoBatch) -> Tensor:
        return vmap(dagger_task.task_loss, in_dims=(None, 0))(th, tasks).mean()

    update = vmap(lambda th, tasks: (lambda g: {k: th[k] - lr * g[k] for k in th})(grad(per_policy)(th, tasks)))

    def step(theta: Theta) -> Theta:
        n = len(next(iter(theta.values())))
        every = {k: v.repeat_interleave(targets, 0) for k, v in theta.items()}  # policy j × target i, j-major
        batch = DemoBatch(*(t.repeat(n, *([1] * (t.dim() - 1))) for t in demos))
        collected = dagger_task.collect(every, batch, gen, "task_loss")
        return update(theta, DemoBatch(*(t.reshape(n, targets, *t.shape[1:]) for t in collected)))

    return step


def update_curve(
    task: ReacherDemosTask, update: Update, theta: Theta, batch: DemoBatch, updates: int, gen: torch.Generator
) -> tuple[Tensor, Theta]:
    """Real final distance ``[updates + 1, n]`` of the policies θ (batch) trained by ``update``, each run on its
    target of ``batch``; and θ after the last update."""
    metric = vmap(task.task_loss)
    history = []
    with torch.no_grad():
        for k in range(updates + 1):
            history.append(metric(theta, task.collect(theta, batch, gen, "task_loss")))
            if k < updates:
                theta = update(theta)
    return torch.stack(history), theta


def update_curves(
    task: ReacherDemosTask, update: Update, goals: int, seeds: int, updates: int, stream: str = "test"
) -> np.ndarray:
    """``[seeds, goals, updates + 1]`` for a baseline ``update``: the targets and θ₀ of seed s drawn from the
    random stream ``stream`` of s exactly as :func:`~ml3cli.evaluate.evaluate` draws them (paired with the
    losses)."""
    out = []
    for s in range(seeds):
        gen = generator(stream_seed(stream, s))
        batch = task.sample_tasks(goals, gen)
        theta = task.init_theta(goals, gen)
        curve, _ = update_curve(task, update, theta, batch, updates, gen)
        out.append(curve.T.double().numpy())
    return np.stack(out)


def trained_paths(
    task: ReacherDemosTask, loss_fn: LossFn, lr: float, updates: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Real fingertip paths ``[goals, T + 1, 2]`` and their targets ``[goals, 2]`` after ``updates`` updates with
    ``loss_fn`` of the policies drawn from ``generator(seed)``."""
    gen = generator(seed)
    goals = len(task.goal_list)
    batch = task.sample_tasks(goals, gen)
    theta = task.init_theta(goals, gen)
    step_all = vmap(lambda th, b: sgd_step(task, loss_fn, th, b, lr))
    with torch.no_grad():
        for _ in range(updates):
            theta = step_all(theta, task.collect(theta, batch, gen, "inner"))
        states = task.collect(theta, batch, gen, "task_loss").states
    return task.position(states).numpy(), batch.goal.numpy()


# -- figures ------------------------------------------------------------------------------------------------
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
    return png_bytes(fig)


EXPERIMENT = Experiment(
    name="reacher_demos",
    paper="4.2.4, figure 6c–d",
    claim=(
        "a loss meta-trained to clone iLQR experts on 4 targets trains ReacherGoal policies toward new targets, "
        "without any expert, better than behavioural cloning"
    ),
    recipes=(RECIPE,),
    run=run,
    meta_seeds=3,
    quick=("outer.steps=10", "meta_test.steps=5"),
    quick_eval={"tasks": 6, "seeds": 2},
)
