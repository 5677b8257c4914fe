"""Model-free RL (paper, section 4.1.3, figure 4; algorithms 4 and 5): a loss meta-learned with REINFORCE task
losses trains fresh policies on held-out goals in fewer environment samples than PPO, and transfers to policies
of other depths.

Tasks ``reacher_goal_mf`` (ReacherGoal, the main, full-size row) and ``ant_goal`` with the reduced recipe
``mfrl_ant_small`` (goals on a 1 m circle, 100-step episodes instead of the paper's full AntGoal; PPO runs
until it levels off on this smaller task, 630,000 samples per goal, below). Recipes ``mfrl_reacher`` and
``mfrl_ant_small``, 3 meta-train seeds each.

Protocol, per recipe (:mod:`~ml3cli.experiments.protocol`):

1. **The learned loss, fair comparison** (:func:`~ml3cli.experiments.protocol.compare_losses`, the record's
   fields): every learned loss (one per meta-train seed) trains fresh policies with plain SGD (algorithm 5), at the
   recipe's rate and at its own rate chosen on validation goals (the ``validation`` stream), on held-out goals of
   the ``test`` stream; the slot of the record's baseline holds the task's built-in ``likelihood`` loss
   (−log π(a|s) of the policy's own samples: no reward signal, a reference that cannot learn the task), tuned the
   same way. The learned loss runs ``steps`` updates (each one fresh rollout of ``episodes × horizon`` samples)
   until it levels off.
2. **PPO** (:mod:`ml3cli.baselines.ppo`, the whole of CleanRL's ``ppo_continuous_action.py``: observation and
   reward normalisation with clipping, 2,048 samples per update, the learning rate annealed to 0 over the run's
   whole budget) trains the same θ₀ (same architecture) on the same test goals with the same rollout code, until
   it levels off (``ppo_updates``). Its rate: CleanRL's 3e-4 and one half-decade above and below, each run on
   validation goals for the same budget, the grid widened by two rates while an edge wins (twice at most); the
   best final level is used on the test goals (the scores and whether the choice was interior are in ``extra``).
   CleanRL's observation wrapper clips the normalised observation to ±10 from the first step, so PPO's θ₀ acts on clipped inputs where an observation exceeds 10 (the ant's joint
   velocities): its start level can differ from the learned loss's (both are reported; each gain is measured
   from its own start).
3. **Numbers** (``extra.ppo``): the paper's metric (ReacherGoal Σ_t −d_t, AntGoal Σ_t (d₀ − d_t), per episode,
   higher is better) against training samples for both methods; each one's final level (the mean of the last 10%
   of its updates); the training samples each needs to reach 80% of its own final gain over θ₀ (on the curve
   averaged over goals, test seeds and, for the learned loss, meta-train seeds; linear between measurements; None
   where a method does not improve) and their ratio PPO / learned; per meta-train seed as well. The learned loss
   is taken at its tuned rate. Evaluation rollouts (before the first and after every update) are not training
   samples; they are counted in the environment samples.

**Verdict of a PPO row** (this experiment's rule, it replaces the record's learned-vs-likelihood verdict, which
stays in ``extra.likelihood_verdict``): *reproduced* when the learned loss reaches 80% of its final gain in fewer
training samples than PPO (PPO not improving at all counts as slower) AND its final level is not worse than PPO's
(the 95% interval of learned − PPO over meta-train × test seed pairs reaches 0 or below, in the task loss −metric:
lower is better); *partly* when exactly one holds (e.g. a faster start that levels off below PPO); else *not
reproduced*.

**Architecture transfer** (figure 4c–d): the reacher loss (meta-trained on 2×64 policies, the main row) trains
policies with 1, 3 and 4 hidden layers of 64 (further rows); the verdict of these rows is the protocol's (tuned
learned loss against the tuned reward-blind likelihood reference: the loss improves a policy of that depth),
with the samples to 80% of the gain in ``extra``.

Environment samples: every simulator step at meta-train (the task's ``collect``, recorded in the artifacts) and at
meta-test (validation and test rollouts of every loss, PPO's training and evaluation rollouts, the lr checks).

Budget of the full run (``ml3 reproduce mfrl --jobs 2``; sizes in :data:`FULL` and :data:`TRANSFER`), estimated
from rates measured on the 2-core machine (ReacherGoal ≈ 8,000 and AntGoal ≈ 2,000 simulator steps/s, a PPO
update's 320 minibatch steps ≈ 1.5 s): meta-training 3 × mfrl_reacher + 3 × mfrl_ant_small ≈ 11 min at 2 jobs;
ReacherGoal row ≈ 17 min (PPO's rate check 5 min, PPO 6 min); AntGoal row ≈ 2.5 h of one core (PPO's check
≈ 1 h, PPO on the test goals ≈ 1.5 h, the learned losses' test 6 min); the three transfer rows ≈ 7 min. The
smaller sizes that make it fit: 5 (ReacherGoal) and 3 (AntGoal) test goals × 3 test seeds, validation on 2–4
goals × 1 seed, the learning-rate grid ×/÷ √10 around the recipe's rate (widened twice at most), PPO to 82,000
(ReacherGoal) and 630,000 (AntGoal) samples per goal. PPO levels off within both budgets: on ReacherGoal
(measured on 3 validation goals) Σ_t −d_t −7.7 → −1.7 after 80,000 samples, −1.6 after 120,000; on the reduced
AntGoal (one run on 2 validation goals at 3e-4, 480 updates) Σ_t (d₀ − d_t) −102 → +49 after 294,000 samples,
+65 after 588,000 and +60 to +71 from there to a million. Each finished PPO run (one seed of one rate) is kept
in ``artifacts/reproduce/mfrl/baselines/``, so that the ant's PPO can run in parts: an interrupted run, started
again, trains only the runs it has not finished (and runs started beside it with the same settings fill the
same folder).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from ml3cli import files
from ml3cli.baselines.ppo import PPOConfig, train_ppo
from ml3cli.evaluate import LossCurves, draw_tasks, widen_until_interior
from ml3cli.experiments.protocol import Context, EvalSizes, Experiment, Paired, compare_losses
from ml3cli.plots import png_bytes
from ml3cli.tasks import make_task
from ml3cli.tasks.mfrl import ModelFreeRL

REACHER, ANT = "mfrl_reacher", "mfrl_ant_small"
#: the fraction of the final gain whose sample count is compared, and the tail of a run that is its final level
FRACTION, TAIL = 0.8, 0.1


@dataclass(frozen=True)
class RowPlan:
    """The sizes of one learned-loss-against-PPO row: the learned loss's evaluation, PPO's budget in updates
    (2,048 samples each) and the goals × seeds of PPO's learning-rate check on validation goals."""

    learned: EvalSizes
    ppo_updates: int
    ppo_check: tuple[int, int]  # validation goals, validation seeds
    ppo_widenings: int = 2  # times PPO's rate grid may widen by two rates while an edge wins
    test_options: dict[str, Any] = field(default_factory=dict)
    label: str = ""


#: the full run. ReacherGoal: 30 updates × 200 samples for the learned loss (it levels off by update 10–20), PPO
#: 40 updates × 2,050 samples (82,000 per goal), 5 goals × 3 test seeds. AntGoal (reduced recipe): 25 updates
#: × 200 samples for the learned loss, PPO 300 updates × 2,100 samples (630,000 per goal), 3 goals × 3 test seeds;
#: evaluation on 2 episodes instead of the recipe's 4 (the ant's rollouts dominate the run's time).
FULL = {
    REACHER: RowPlan(
        EvalSizes(steps=30, tasks=5, seeds=3, validation_tasks=4, validation_seeds=1, grid_span=0.5,
                  max_widenings=2),
        ppo_updates=40, ppo_check=(3, 1), label="ReacherGoal",
    ),
    ANT: RowPlan(
        EvalSizes(steps=25, tasks=3, seeds=3, validation_tasks=2, validation_seeds=1, grid_span=0.5,
                  max_widenings=2),
        ppo_updates=300, ppo_check=(2, 1), test_options={"task_loss_episodes": 2}, label="AntGoal (reduced)",
    ),
}  # fmt: skip
QUICK = {
    REACHER: RowPlan(
        EvalSizes(steps=4, tasks=2, seeds=2, validation_tasks=2, validation_seeds=1, grid_span=0.5,
                  max_widenings=0),
        ppo_updates=3, ppo_check=(1, 1), ppo_widenings=0, label="ReacherGoal",
    ),
    ANT: RowPlan(
        EvalSizes(steps=3, tasks=2, seeds=2, validation_tasks=1, validation_seeds=1, grid_span=0.5,
                  max_widenings=0),
        ppo_updates=2, ppo_check=(1, 1), ppo_widenings=0, test_options={"task_loss_episodes": 2},
        label="AntGoal (reduced)",
    ),
}  # fmt: skip
#: architecture transfer: hidden layers of 64 (2 is the main reacher row), and the sizes of those rows
DEPTHS = (1, 3, 4)
TRANSFER = EvalSizes(steps=20, tasks=4, seeds=2, validation_tasks=3, validation_seeds=1, grid_span=0.5,
                     max_widenings=2)  # fmt: skip
TRANSFER_QUICK = EvalSizes(steps=3, tasks=2, seeds=2, validation_tasks=1, validation_seeds=1, grid_span=0.5,
                           max_widenings=0)  # fmt: skip


# -- numbers of a learning curve ------------------------------------------------------------------------------------
def final_level(curve: np.ndarray) -> np.ndarray:
    """The mean of the last :data:`TAIL` of the points (at least one) on the last axis."""
    return curve[..., -max(1, round(curve.shape[-1] * TAIL)) :].mean(-1)


def samples_to_gain(curve: np.ndarray, samples: np.ndarray, fraction: float = FRACTION) -> float | None:
    """Training samples until ``curve`` (higher is better, one point per ``samples``) first reaches
    start + fraction · (final − start), final = :func:`final_level`; linear between the two measurements around the
    crossing. None when the curve does not improve (final ≤ start)."""
    start, final = float(curve[0]), float(final_level(curve))
    if not final > start:
        return None
    target = start + fraction * (final - start)
    k = int(np.nonzero(curve >= target)[0][0])
    if k == 0:
        return float(samples[0])
    low, high = float(curve[k - 1]), float(curve[k])
    return float(samples[k - 1] + (target - low) / (high - low) * (samples[k] - samples[k - 1]))


def ratio(ppo: float | None, learned: float | None) -> float | None:
    """PPO's samples over the learned loss's (None unless both are defined)."""
    return ppo / learned if ppo and learned else None


# -- PPO ------------------------------------------------------------------------------------------------------------
def ppo_performance(
    task: ModelFreeRL,
    goals: int,
    seeds: int,
    updates: int,
    config: PPOConfig,
    stream: str,
    cache: Path | None = None,
) -> tuple[np.ndarray, int]:
    """PPO's metric ``[seeds, updates + 1, goals]`` from the goals and θ₀ that :func:`ml3cli.evaluate.evaluate`
    draws for seeds 0 … seeds − 1 of ``stream`` (the learned loss's test goals for ``stream="test"``), and the
    samples per update.

    ``cache``: a folder where each seed's finished run is kept (:func:`ppo_run_key` names it), so that a long PPO
    budget can run in parts: a later call with the same task, goals, seed, stream, budget and settings reads the
    run back (and counts its environment samples) instead of training again."""
    runs = [ppo_run(task, goals, s, stream, updates, config, cache) for s in range(seeds)]
    return np.stack([performance for performance, _ in runs]), runs[0][1]


def ppo_run(
    task: ModelFreeRL,
    goals: int,
    seed: int,
    stream: str,
    updates: int,
    config: PPOConfig,
    cache: Path | None = None,
) -> tuple[np.ndarray, int]:
    """One seed of :func:`ppo_performance`: the metric ``[updates + 1, goals]`` and the samples per update, read
    back from ``cache`` when that run was kept there (its environment samples are counted all the same)."""
    key = ppo_run_key(task, goals, seed, stream, updates, config)
    path = ppo_run_path(cache, key) if cache is not None else None
    kept = read_ppo_run(path, key) if path is not None else None
    if kept is not None:
        performance, per_update, samples = kept
        task.environment_samples += samples
        return performance, per_update
    before = task.environment_samples
    gen, batch, theta = draw_tasks(task, goals, stream, seed)
    result = train_ppo(task, theta, batch, updates, gen, config)
    if path is not None:
        keep_ppo_run(path, key, result.performance, result.samples_per_update, task.environment_samples - before)
    return result.performance, result.samples_per_update


def ppo_run_key(
    task: ModelFreeRL, goals: int, seed: int, stream: str, updates: int, config: PPOConfig
) -> dict[str, Any]:
    """Everything one PPO run's result depends on (the code aside, as for a reused artifact)."""
    return {
        "task": task.name,
        "options": task.options.model_dump(mode="json"),
        "goals": goals,
        "seed": seed,
        "stream": stream,
        "updates": updates,
        "config": json.loads(json.dumps(asdict(config))),
    }


def ppo_run_path(cache: Path, key: dict[str, Any]) -> Path:
    """Where the run of ``key`` is kept in ``cache`` (a digest of the key names the file; the key is inside)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache / f"ppo-{digest}.json"


def read_ppo_run(path: Path, key: dict[str, Any]) -> tuple[np.ndarray, int, int] | None:
    """The run of ``key`` kept at ``path`` (performance, samples per update, environment samples), or None."""
    if not path.is_file():
        return None
    kept = json.loads(path.read_text(encoding="utf-8"))
    if kept["key"] != key:
        return None
    return np.asarray(kept["performance"], dtype=kept["dtype"]), kept["samples_per_update"], kept["environment_samples"]


def keep_ppo_run(path: Path, key: dict[str, Any], performance: np.ndarray, per_update: int, samples: int) -> None:
    """Write one finished run with its key (atomically: an interrupt leaves no half-written run)."""
    document = {
        "key": key,
        "performance": performance.tolist(),
        "dtype": str(performance.dtype),
        "samples_per_update": per_update,
        "environment_samples": samples,
    }
    files.write_text_atomic(path, json.dumps(document))


def ppo_rate(
    task: ModelFreeRL, plan: RowPlan, center: float = PPOConfig.lr, cache: Path | None = None
) -> tuple[float, dict[float, float]]:
    """PPO's rate: the best final level on validation goals (the same budget as the test run) among ``center`` and
    one half-decade above and below, the grid widened by :func:`~ml3cli.evaluate.widen_until_interior` while an
    edge wins (``plan.ppo_widenings`` times at most). Returns the rate and each rate's final level."""
    goals, seeds = plan.ppo_check
    levels: dict[float, float] = {}

    def score(lrs: list[float]) -> dict[float, float]:
        for lr in lrs:
            perf, _ = ppo_performance(task, goals, seeds, plan.ppo_updates, PPOConfig(lr=lr), "validation", cache)
            level = float(final_level(perf.mean((0, 2))))
            levels[lr] = level if math.isfinite(level) else -math.inf
        return {lr: -levels[lr] for lr in lrs}  # as a loss: lower is better, a diverged rate +inf

    lr, _ = widen_until_interior(score, center, span=0.5, step=0.5, max_widenings=plan.ppo_widenings)
    return lr, dict(sorted(levels.items()))


def against_ppo(
    context: Context, recipe: str, record: dict[str, Any], curves: dict[str, LossCurves], plan: RowPlan
) -> dict[str, Any]:
    """Run PPO on the row's test goals and return the ``extra.ppo`` numbers; sets the row's verdict by this
    experiment's rule (the record's own verdict moves to ``extra.likelihood_verdict``)."""
    options = {**context.recipe(recipe).meta_test.task_options, **plan.test_options}
    task = make_task(record["task"], options)
    lr, scores = ppo_rate(task, plan, cache=context.work_dir)
    config = PPOConfig(lr=lr)
    ppo, per_update = ppo_performance(
        task, record["tasks"], record["test_seeds"], plan.ppo_updates, config, "test", context.work_dir
    )
    context.count_samples(task.environment_samples)

    learned_per_update = task.options.episodes * task.options.horizon
    learned_samples = np.arange(record["steps"] + 1) * learned_per_update
    ppo_samples = np.arange(plan.ppo_updates + 1) * per_update
    # the learned losses at their tuned rates: performance [meta seed, test seed, update] (mean over goals)
    learned = np.stack([-curves[f"learned{m}@tuned"].per_seed for m in record["meta_seeds"]])
    ppo_per_seed = ppo.mean(-1)  # [test seed, update]
    learned_80 = samples_to_gain(learned.mean((0, 1)), learned_samples)
    ppo_80 = samples_to_gain(ppo_per_seed.mean(0), ppo_samples)
    # final levels paired over (meta seed, test seed), as a loss (−metric: lower is better)
    final = Paired.of(-final_level(learned), -final_level(ppo_per_seed))
    faster = learned_80 is not None and (ppo_80 is None or learned_80 < ppo_80)
    not_worse = not final.low > 0
    record["extra"]["likelihood_verdict"] = record["verdict"]
    record["verdict"] = ppo_verdict(faster, not_worse, learned_80, ppo_80, final)
    marks = sorted({0, 1, 2, 5, 10, 20, 30, 40, 50, plan.ppo_updates} & set(range(plan.ppo_updates + 1)))
    return {
        "config": asdict(config) | {"value_hidden": list(config.value_hidden)},
        "lr_check": {
            "scores": {repr(k): v for k, v in scores.items()},
            "chosen": lr,
            "interior": lr not in (min(scores), max(scores)),
            "goals": plan.ppo_check[0],
            "seeds": plan.ppo_check[1],
            "stream": "validation",
        },  # fmt: skip
        "updates": plan.ppo_updates,
        "samples_per_update": {"learned": learned_per_update, "ppo": per_update},
        "budget_samples": {"learned": int(learned_samples[-1]), "ppo": int(ppo_samples[-1])},
        "start": float(ppo_per_seed[:, 0].mean()),
        "final_level": {
            "learned": float(final_level(learned).mean()),
            "learned_per_meta_seed": [float(v) for v in final_level(learned).mean(1)],
            "ppo": float(final_level(ppo_per_seed).mean()),
            "ppo_per_test_seed": [float(v) for v in final_level(ppo_per_seed)],
            "learned_minus_ppo_loss": asdict(final),  # −metric: below 0 is the learned loss better
        },
        "samples_to_80pct": {
            "learned": learned_80,
            "ppo": ppo_80,
            "ratio_ppo_over_learned": ratio(ppo_80, learned_80),
            "learned_per_meta_seed": [samples_to_gain(curve, learned_samples) for curve in learned.mean(1)],
        },
        "curve": {  # the metric against training samples, mean over goals and seeds
            "learned": {str(int(x)): float(v) for x, v in zip(learned_samples, learned.mean((0, 1)), strict=True)},
            "ppo": {str(int(ppo_samples[u])): float(ppo_per_seed[:, u].mean()) for u in marks},
        },
        "ppo_curve_full": ppo_per_seed.mean(0).tolist(),
    }


def ppo_verdict(
    faster: bool, not_worse: bool, learned_80: float | None, ppo_80: float | None, final: Paired
) -> dict[str, str]:
    """This experiment's rule (module docstring): sample efficiency to 80% of the gain and the final level."""
    speed = f"80% of the final gain after {_samples(learned_80)} samples vs PPO's {_samples(ppo_80)}"
    level = f"final level learned − PPO (as a loss) {final.mean:.3g} [{final.low:.3g}, {final.high:.3g}]"
    if faster and not_worse:
        return {"verdict": "reproduced", "why": f"faster than PPO ({speed}) and not worse at the end ({level})"}
    if faster:
        return {"verdict": "partly", "why": f"faster start than PPO ({speed}) but a worse final level ({level})"}
    if not_worse:
        return {"verdict": "partly", "why": f"final level not worse than PPO's ({level}) but not faster ({speed})"}
    return {"verdict": "not reproduced", "why": f"neither faster than PPO ({speed}) nor as good at the end ({level})"}


def _samples(value: float | None) -> str:
    return "never (no gain)" if value is None else f"{value:,.0f}"


# -- the protocol ---------------------------------------------------------------------------------------------------
def run(context: Context) -> list[dict[str, Any]]:
    """The PPO rows (ReacherGoal, AntGoal reduced), then the architecture-transfer rows of the reacher loss."""
    plans = QUICK if context.quick else FULL
    rows, panels = [], []
    for recipe, plan in plans.items():
        curves: dict[str, LossCurves] = {}
        record = compare_losses(
            context, recipe, label=f"{plan.label} ({recipe}) against PPO", sizes=plan.learned,
            test_options=plan.test_options or None, report_steps=range(plan.learned.steps + 1), curves_out=curves,
        )  # fmt: skip
        record["extra"] = {}
        record["extra"]["ppo"] = against_ppo(context, recipe, record, curves, plan)
        rows.append(record)
        panels.append(record)
    transfer = TRANSFER_QUICK if context.quick else TRANSFER
    for depth in DEPTHS:
        curves = {}
        hidden = {"hidden": [64] * depth}
        record = compare_losses(
            context, REACHER, label=f"ReacherGoal, {depth} hidden layer{'s' if depth > 1 else ''} (transfer)",
            test_options=hidden, sizes=transfer, report_steps=range(transfer.steps + 1), curves_out=curves,
        )  # fmt: skip
        per_update = _samples_per_update(context, REACHER)
        samples = np.arange(transfer.steps + 1) * per_update
        learned = np.stack([-curves[f"learned{m}@tuned"].per_seed for m in record["meta_seeds"]])
        record["extra"] = {
            "hidden": hidden["hidden"],
            "start": float(learned[:, :, 0].mean()),
            "final_level": float(final_level(learned).mean()),
            "samples_to_80pct": samples_to_gain(learned.mean((0, 1)), samples),
        }
        rows.append(record)
    context.figures["samples.png"] = samples_figure(panels, rows[len(panels) :])
    return rows


def _samples_per_update(context: Context, recipe: str) -> int:
    options = context.recipe(recipe).meta_test.task_options
    task = make_task(context.recipe(recipe).meta_test.task, options)
    return task.options.episodes * task.options.horizon


# -- figures --------------------------------------------------------------------------------------------------------
def samples_figure(rows: Sequence[dict[str, Any]], transfer: Sequence[dict[str, Any]]) -> bytes:
    """Figure 4: the metric against training samples, learned loss (tuned rate, mean over meta-train seeds) and PPO,
    one panel per task; then the transfer rows' learned curves against samples."""
    panels = len(rows) + (1 if transfer else 0)
    fig, axes = plt.subplots(1, panels, figsize=(5.6 * panels, 4.2), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=False):
        extra = row["extra"]["ppo"]
        learned = extra["curve"]["learned"]
        ppo = extra["ppo_curve_full"]
        per_update = extra["samples_per_update"]["ppo"]
        series = {
            "ML³ learned loss (tuned lr)": ([int(k) for k in learned], list(learned.values()), "learned"),
            "PPO (CleanRL's full setup)": ([u * per_update for u in range(len(ppo))], ppo, "ppo"),
        }
        for label, (x, y, key) in series.items():
            # a log axis of samples: the start (0 samples) is drawn as a level of its own
            (line,) = ax.plot(x[1:], y[1:], marker=".", label=label)
            ax.axhline(y[0], linestyle="--", linewidth=0.8, color=line.get_color())
            ax.axhline(extra["final_level"][key], linestyle=":", linewidth=0.8, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("training samples (environment steps); dashed: θ₀, dotted: final level")
        ax.set_ylabel("performance (higher is better)")
        ax.set_title(f"{row['label']}\n{row['verdict']['verdict']}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if transfer:
        ax = axes[0][-1]
        for row in transfer:
            steps = sorted(int(s) for s in row["curves"]["baseline@tuned"])
            learned = np.array(
                [[-row["curves"][f"learned{m}@tuned"][str(s)] for s in steps] for m in row["meta_seeds"]]
            )
            depth = len(row["extra"]["hidden"])
            ax.plot(steps, learned.mean(0), label=f"{depth} hidden layer{'s' if depth > 1 else ''}")
        ax.set(xlabel="updates (SGD steps on the learned loss, tuned lr)", ylabel="performance (higher is better)")
        ax.set_title("architecture transfer (ReacherGoal)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return png_bytes(fig)


EXPERIMENT = Experiment(
    name="mfrl",
    paper="4.1.3, figure 4",
    claim="a learned loss trains new policies on held-out goals in fewer environment samples than PPO, and "
    "transfers to policies of other depths",
    recipes=(REACHER, ANT),
    run=run,
    meta_seeds=3,
    quick={
        REACHER: ("outer.steps=4", "meta_test.tasks=2", "meta_test.steps=2"),
        ANT: ("outer.steps=2", "meta_test.tasks=2", "meta_test.steps=2"),
    },
    cost="≈ 3 h (estimate; --jobs 2, 2 CPUs; the ant's PPO ≈ 2.5 h of one core)",
)
