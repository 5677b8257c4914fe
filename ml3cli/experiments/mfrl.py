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

**Verdict of a PPO row**: :mod:`~ml3cli.experiments.against_ppo`'s rule (faster to 80% of the final gain, and a
final level not worse than PPO's); it replaces the record's learned-vs-likelihood verdict, which stays in
``extra.likelihood_verdict``.

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

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from ml3cli.evaluate import LossCurves
from ml3cli.experiments.against_ppo import RowPlan, against_ppo, final_level, samples_to_gain
from ml3cli.experiments.protocol import Context, EvalSizes, Experiment, compare_losses
from ml3cli.plots import png_bytes
from ml3cli.tasks import make_task

REACHER, ANT = "mfrl_reacher", "mfrl_ant_small"


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
