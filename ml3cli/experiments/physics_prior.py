"""The comparison of the inverse-dynamics experiments (``inverse_dynamics``, ``beyond_sawyer``): for one robot, a loss
meta-trained WITH the physics prior (its task loss β·torque MSE + γ·‖M_θ(q) − M(q)‖²_F) and one meta-trained
WITHOUT it (torque MSE only), each at 3 meta-train seeds, meta-tested on the recipes' ``split: meta_test``
trajectories (never seen at meta-train): 4 tasks × 5 test seeds, 1000 steps from the same θ₀ for every loss, at the
recipe's rate and each loss at its own rate. Metric: torque MSE on held-out trajectories after 1000 steps; the
inertia error ‖M_θ − M‖_F at that step is stored in ``extra``. The prior is never seen at meta-test.

Comparisons (:func:`compare_robot`), all paired over (meta-train seed × test seed):

* the loss learned WITH the prior against torque MSE;
* the loss learned WITHOUT the prior against torque MSE: a control, left out of the verdict;
* the loss learned WITH the prior against the one learned WITHOUT it (each at its own rate; meta-train seed m of
  one paired with seed m of the other).

Learning rates: each loss (torque MSE once per call, each learned loss per meta-train seed) gets its rate on
VALIDATION trajectories of the test family: the ``meta_test`` split generated from another ``data_seed``
(:data:`VALIDATION_DATA_SEED`), so the choice never sees a test trajectory. Affordable protocol (measured: one
1000-step run of 4 tasks takes 6–15 s on one core, the metric measured at every step doubled that): the
validation split is 4 tasks × 1 seed (:data:`VALIDATION`, not the test's 4 × 5), the grid starts at five rates
half a decade apart around the recipe's (±1 decade, :data:`GRID`) and widens while its edge wins, the
metric is measured only at the reported steps, and a loss whose tuned rate is the fixed one is trained once.

With ``adaptation`` the learned losses keep learning online (:mod:`ml3cli.engine.online`; their validation loss is
the torque MSE on each task's training samples, never the held-out trajectories), at tuning as at test; torque MSE
does not adapt.

Environment samples: the data sets are simulated offline (one inverse-dynamics and mass-matrix query per time
point): each meta-training counts its split's 2,400 samples, the meta-test counts the test and the validation
splits once per call (every loss trains on the same data).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from ml3cli.engine.online import Adaptation
from ml3cli.errors import ML3Error
from ml3cli.evaluate import LossCurves, NamedLoss, evaluate
from ml3cli.experiments.protocol import Context, EvalSizes, comparison_record, tune_interior
from ml3cli.losses import LossSpec, builtin_loss
from ml3cli.tasks import make_task

#: the validation trajectories: the meta_test split generated from this data_seed (the test's is 0)
VALIDATION_DATA_SEED = 1
#: (tasks, seeds) of the validation split
VALIDATION = (4, 1)
#: the tuning grid: half a decade apart, ±1 decade around the recipe's rate to start (widened while an edge wins)
GRID = EvalSizes(grid_span=1.0)
REPORT_STEPS = (0, 10, 100, 500, 1000)
BASELINE = "torque_mse"


def compare_robot(
    context: Context, robot: str, prior: str, noprior: str, adaptation: Adaptation | None = None
) -> list[dict[str, Any]]:
    """The comparisons of one robot (``robot`` starts their labels): torque MSE tuned once, every learned loss of
    both recipes tuned on the validation trajectories, then every (loss, rate) trained once on the test
    trajectories; the learned losses adapt online with ``adaptation``."""
    recipe = context.recipe(prior, seed=context.meta_seeds[0])
    control = context.recipe(noprior, seed=context.meta_seeds[0])
    test = recipe.meta_test
    if control.meta_test != test or control.meta_test_lr != recipe.meta_test_lr:
        raise ML3Error(f"recipes {prior} and {noprior} must meta-test alike (meta_test and its lr) to be compared")
    where = "meta_test.task_options"
    task = make_task(test.task, test.task_options, where=where)
    validation = make_task(test.task, {**test.task_options, "data_seed": VALIDATION_DATA_SEED}, where=where)
    if validation.options.data_seed == task.options.data_seed:
        raise ML3Error(
            f"{where}.data_seed: the test trajectories must not be the validation ones ({VALIDATION_DATA_SEED})"
        )
    context.count_samples(task.environment_samples + validation.environment_samples)
    tasks, seeds = test.tasks, test.seeds
    tune_tasks, tune_seeds = VALIDATION
    if context.quick:
        tasks, seeds = context.experiment.quick_eval["tasks"], context.experiment.quick_eval["seeds"]
        tune_tasks, tune_seeds = min(tune_tasks, tasks), min(tune_seeds, seeds)
    steps, fixed = test.steps, recipe.meta_test_lr

    def tune(loss: NamedLoss) -> tuple[float, dict[float, float]]:
        return tune_interior(validation, loss, fixed, tune_tasks, tune_seeds, steps, sizes=GRID, adaptation=adaptation)

    started = time.perf_counter()
    losses: dict[str, NamedLoss] = {"baseline": builtin_loss(task, BASELINE, fixed)}
    for name, tag in ((prior, "prior"), (noprior, "noprior")):
        for m, path in context.artifact_paths[name].items():
            losses[f"{tag}{m}"] = LossSpec(str(path)).resolve(task, fixed, task.device).named
    tuned = {key: tune(loss) for key, loss in losses.items()}
    tuning_seconds = time.perf_counter() - started

    # every (loss, rate) once: a loss whose tuned rate is the fixed one has the same curves at both
    runs = {(key, lr): dataclasses.replace(loss, lr=lr, label=f"{key}@{lr!r}") for key, loss in losses.items()
            for lr in (fixed, tuned[key][0])}  # fmt: skip
    shown = sorted({*REPORT_STEPS, steps} & set(range(steps + 1)))
    started = time.perf_counter()
    found = evaluate(task, list(runs.values()), tasks, seeds, steps, seed=0, record_at=shown, adaptation=adaptation)
    by_run = dict(zip(runs, found, strict=True))
    test_seconds = time.perf_counter() - started
    curves = {f"{key}@{kind}": by_run[(key, fixed if kind == "fixed" else tuned[key][0])]
              for key in losses for kind in ("fixed", "tuned")}  # fmt: skip
    seconds = {"tuning": round(tuning_seconds, 2), "test": round(test_seconds, 2)}

    def learned(tag: str, as_name: str) -> dict[str, LossCurves]:
        return {
            f"{as_name}{m}@{kind}": curves[f"{tag}{m}@{kind}"]
            for m in context.meta_seeds
            for kind in ("fixed", "tuned")
        }

    def rates(tag: str) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
        """Per meta-train seed: the tuned rate, and the validation score of every rate tried."""
        found = {str(m): tuned[f"{tag}{m}"] for m in context.meta_seeds}
        return {m: lr for m, (lr, _) in found.items()}, {m: scores for m, (_, scores) in found.items()}

    torque_mse = {f"baseline@{kind}": curves[f"baseline@{kind}"] for kind in ("fixed", "tuned")}
    common = {
        "task": task.name, "metric": task.metric, "steps": steps, "tasks": tasks, "seeds": seeds,
        "meta_seeds": context.meta_seeds, "seconds": seconds, "report_steps": REPORT_STEPS,
    }  # fmt: skip

    def extra(chosen: dict[str, LossCurves]) -> dict[str, Any]:
        adapting = {"optimizer": "sgd", "adaptation": adaptation.record()} if adaptation is not None else {}
        return {"inertia_error": inertia_errors(chosen, steps), **adapting}

    validation_record = {"data_seed": VALIDATION_DATA_SEED, "tasks": tune_tasks, "seeds": tune_seeds}
    records = []
    for name, tag, is_control in ((prior, "prior", False), (noprior, "noprior", True)):
        learned_lrs, learned_scores = rates(tag)
        lr = {"fixed": fixed, "baseline_tuned": tuned["baseline"][0], "baseline_scores": tuned["baseline"][1],
              "learned_tuned": learned_lrs, "learned_scores": learned_scores,
              "validation": validation_record}  # fmt: skip
        which = "with" if tag == "prior" else "without"
        chosen = {**torque_mse, **learned(tag, "learned")}
        records.append(
            comparison_record(
                recipe=name, label=f"{robot}: learned {which} the prior vs {BASELINE}", baseline=BASELINE,
                curves=chosen, lr=lr, extra=extra(chosen), control=is_control,
                **common,
            )
        )  # fmt: skip
    prior_lrs, prior_scores = rates("prior")
    noprior_lrs, noprior_scores = rates("noprior")
    chosen = {**learned("noprior", "baseline"), **learned("prior", "learned")}
    lr = {"fixed": fixed, "baseline_tuned": noprior_lrs, "baseline_scores": noprior_scores,
          "learned_tuned": prior_lrs, "learned_scores": prior_scores, "validation": validation_record}  # fmt: skip
    records.append(
        comparison_record(
            recipe=prior, label=f"{robot}: learned with the prior vs learned without it", baseline=noprior,
            curves=chosen, lr=lr, extra=extra(chosen), **common,
        )
    )  # fmt: skip
    return records


def inertia_errors(curves: dict[str, LossCurves], steps: int) -> dict[str, float]:
    """Per curve: the mean inertia error ‖M_θ(q) − M(q)‖_F after ``steps`` (over test seeds and tasks): what the
    physics prior shapes, never seen by any loss at meta-test."""
    return {label: float(c.extras["inertia_error"][:, :, steps].mean()) for label, c in curves.items()}
