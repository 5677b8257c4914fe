"""Loss shaping with expert demonstrations (paper, section 4.2.4, figure 6c–d): the learned loss against behavioural
cloning on ReacherGoal (task ``reacher_demos``, recipe ``reacher_demos.yaml``; the table and figures:
``benchmarks/reacher_demos.py``). The iLQR experts behind the demonstrations are data of the task
(:mod:`ml3cli.control.reacher_expert`).

Meta-test protocol, per evaluation seed s (θ₀ from ``generator(seed + s)`` exactly as
:func:`ml3cli.evaluate.evaluate` draws them, so every method starts each target from the same θ₀):

* **learned**: a fresh policy per target is trained with M_φ only (``reacher_demos`` with ``demonstrations:
  false``: no expert exists); before each update it is rolled out on the real arm and M_φ sees that trajectory.
* **behavioural cloning** (figure 6d's baseline): the same fresh policy π_θ(s, g) trained by SGD on the
  behavioural-cloning loss pooled over the demonstrations of the meta-TRAIN targets,
  mean_i Σ_t ‖π_θ(s^E_{i,t}, g_i) − u^E_{i,t}‖² / max_action², then run on its (test) target. Nothing of the test
  target enters its training: BC generalises through the goal input g. At the learned loss's learning rate and at
  its own best rate from ``bc_lrs``, chosen by BC's final distance on the meta-train targets (its own data).
* **behavioural cloning on own rollouts** (DAgger-like, a stronger baseline that gets what the recipe's
  ``bc_states: policy`` meta-training got): each update rolls the policy out toward every meta-train target and
  fits the expert's feedback law on those states (the meta-train task loss used directly as a training loss),
  then the policy is run on its test target. Same learning rates.

Every curve is the REAL final fingertip distance ‖p_T − g‖ after 0 … ``updates`` updates, per seed and target.

Figures: 6c, the targets in end-effector space with the experts' and the learned loss's fingertip paths
(:func:`targets_figure`, paths from :func:`trained_paths`); 6d, the final distance against updates
(:func:`ml3cli.plots.distance_curves`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor
from torch.func import grad, vmap

from ml3cli.engine import LossFn, sgd_step
from ml3cli.envs.reacher import LINKS
from ml3cli.evaluate import NamedLoss, evaluate
from ml3cli.plots import png_bytes
from ml3cli.runtime import generator
from ml3cli.tasks import make_task
from ml3cli.tasks.base import Theta
from ml3cli.tasks.reacher_demos import DemoBatch, ReacherDemosTask

REPORT_STEPS = (0, 1, 10, 50)
LEARNED = "learned loss (no expert)"


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
    task: ReacherDemosTask, update: Update, goals: int, seeds: int, updates: int, seed: int
) -> np.ndarray:
    """``[seeds, goals, updates + 1]`` for a baseline ``update``, θ₀ drawn as :func:`evaluate` draws them."""
    out = []
    for s in range(seeds):
        gen = generator(seed + s)
        batch = task.sample_tasks(goals, gen)
        theta = task.init_theta(goals, gen)
        curve, _ = update_curve(task, update, theta, batch, updates, gen)
        out.append(curve.T.double().numpy())
    return np.stack(out)


@dataclass
class DemosComparison:
    """``curves[split][label] = [seeds, goals, updates + 1]`` for split ``test`` / ``train`` (the meta-train
    targets); ``lrs[label]``; ``bc_scores[baseline][lr]``: each baseline's mean final distance on the meta-train
    targets (other seeds) at each candidate learning rate."""

    curves: dict[str, dict[str, np.ndarray]]
    lrs: dict[str, float]
    bc_scores: dict[str, dict[float, float]]
    train_goals: np.ndarray
    test_goals: np.ndarray


def compare(
    train_options: dict[str, Any],
    test_options: dict[str, Any],
    learned_fn: LossFn,
    lr: float,
    seeds: int = 3,
    updates: int = 50,
    bc_lrs: Sequence[float] = (1e-3, 3e-3, 0.01, 0.03, 0.1),
    seed: int = 0,
) -> DemosComparison:
    """Run the protocol of this module. ``train_options`` are the meta-train task options (their goals have
    demonstrations), ``test_options`` those of the meta-test targets (never given an expert)."""
    demo_task = make_task("reacher_demos", {**train_options, "demonstrations": True, "bc_states": "expert"})
    dagger_task = make_task("reacher_demos", {**train_options, "demonstrations": True, "bc_states": "policy"})
    bc_loss, _ = bc_loss_fn(demo_task)
    splits = {
        "test": make_task("reacher_demos", {**test_options, "demonstrations": False}),
        "train": make_task("reacher_demos", {**train_options, "demonstrations": False}),
    }
    train_task = splits["train"]
    n_train = len(train_task.goal_list)
    makers = {
        "behavioural cloning": lambda rate: cloning_update(bc_loss, rate),
        "behavioural cloning on own rollouts (DAgger-like)": lambda rate: dagger_update(dagger_task, rate),
    }
    scores: dict[str, dict[float, float]] = {}
    labels: dict[str, tuple[Update, float]] = {}
    for name, make in makers.items():
        scores[name] = {}
        for rate in bc_lrs:  # chosen on the meta-train targets (other seeds), never on the test targets
            curves = update_curves(train_task, make(rate), n_train, seeds, updates, 10_000 + seed)
            final = float(curves[:, :, -1].mean())
            scores[name][rate] = final if math.isfinite(final) else math.inf
        best = min(scores[name], key=lambda k, name=name: scores[name][k])
        labels[f"{name} (lr {lr:g})"] = (make(lr), lr)
        labels[f"{name} (tuned lr {best:g})"] = (make(best), best)
    curves_by_split: dict[str, dict[str, np.ndarray]] = {}
    for split, task in splits.items():
        goals = len(task.goal_list)
        learned = evaluate(task, [NamedLoss(LEARNED, learned_fn, lr)], goals, seeds, updates, seed)[0].values
        curves_by_split[split] = {LEARNED: learned}
        for label, (update, _) in labels.items():
            curves_by_split[split][label] = update_curves(task, update, goals, seeds, updates, seed)
    lrs = {LEARNED: lr, **{label: rate for label, (_, rate) in labels.items()}}
    return DemosComparison(curves_by_split, lrs, scores, train_task.goal_list.numpy(), splits["test"].goal_list.numpy())


def table_rows(result: DemosComparison, split: str, steps: Sequence[int] = REPORT_STEPS) -> list[list[str]]:
    """Per method: the final distance after each of ``steps`` updates, mean ± sd over every (seed, target)."""
    rows = []
    for label, values in result.curves[split].items():
        cells = [f"{values[:, :, s].mean():.4f} ± {values[:, :, s].std():.4f}" for s in steps if s < values.shape[2]]
        rows.append([label, *cells])
    return rows


def trained_paths(
    task: ReacherDemosTask, loss_fn: LossFn | None, lr: float, updates: int, seed: int, bc_loss=None
) -> tuple[np.ndarray, np.ndarray]:
    """Real fingertip paths ``[goals, T + 1, 2]`` and their targets ``[goals, 2]`` after ``updates`` updates of the
    evaluation seed ``seed``'s policies, trained with ``loss_fn`` (the learned loss) or, when it is None, with
    ``bc_loss``."""
    gen = generator(seed)
    goals = len(task.goal_list)
    batch = task.sample_tasks(goals, gen)
    theta = task.init_theta(goals, gen)
    if loss_fn is None:
        _, theta = update_curve(task, cloning_update(bc_loss, lr), theta, batch, updates, gen)
    else:
        step_all = vmap(lambda th, b: sgd_step(task, loss_fn, th, b, lr))
        with torch.no_grad():
            for _ in range(updates):
                theta = step_all(theta, task.collect(theta, batch, gen, "inner"))
    with torch.no_grad():
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
