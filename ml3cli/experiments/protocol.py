"""What every reproduced experiment shares: its declaration, the meta-training plan with artifact reuse, the fair
comparison (tuned against tuned), paired statistics over meta-train × test seeds, the verdict and its provenance.

The fair comparison, for one recipe (a learned loss from each meta-train seed against the task's baseline):

1. Every loss runs at the recipe's fixed meta-test learning rate (the paper's own comparison) AND at its own rate,
   chosen on a validation split: tasks of the TEST family drawn from the ``validation`` random stream (never a test
   task; :func:`ml3cli.runtime.stream_seed`). The grid is a log grid around the fixed rate, widened until the
   choice is interior (:func:`tune_interior`); each learned loss (one per meta-train seed) gets its own rate.
2. Every loss is then trained on the same test tasks (the ``test`` stream) from the same θ₀, and the final metric
   is paired by test seed: learned(meta-train seed m) − baseline for every (m, test seed) pair, with a 95% interval
   (Student t over all pairs).
3. The verdict (:func:`verdict`) compares tuned against tuned; the same-rate numbers stay beside it. A learned loss
   that wins only at the baseline's untuned rate has learned a step size, and the verdict says so.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from ml3cli import artifacts
from ml3cli.engine import InnerOptimizer, LossFn
from ml3cli.engine.inner_optimizers import SGD, optimizer_for
from ml3cli.engine.online import Adaptation
from ml3cli.errors import ML3Error
from ml3cli.evaluate import LossCurves, NamedLoss, evaluate, metric_at, t_quantile_975, tune_lr
from ml3cli.evaluate import widen_until_interior as widen_rates
from ml3cli.launchers import Finished, Launcher, Run
from ml3cli.losses import LossSpec, baseline_name, builtin_loss
from ml3cli.recipes import InnerConfig, Recipe, find_recipe, load_recipe, recipe_to_dict
from ml3cli.tasks import make_task
from ml3cli.tasks.base import Task

#: the three verdicts an experiment can reach
VERDICTS = ("reproduced", "partly", "not reproduced")


@dataclass(frozen=True)
class Experiment:
    """One paper experiment, declared: what it claims, what it meta-trains, how it is judged.

    ``run(context)`` is the protocol after meta-training: it returns the comparisons (one dict per compared
    recipe, see :func:`compare_losses`); the command writes them with the verdict and the provenance.
    """

    name: str
    paper: str  # section and figure, e.g. "4.1.1, figure 2"
    claim: str  # the paper's claim in one sentence
    recipes: tuple[str, ...]  # names of packaged recipes (ml3 recipes lists them)
    run: Callable[[Context], list[dict[str, Any]]]
    meta_seeds: int = 3
    # --set overrides for a smoke run (--quick): one tuple for every recipe, or recipe name → its tuple
    quick: tuple[str, ...] | dict[str, tuple[str, ...]] = ()
    quick_eval: dict[str, int] = field(default_factory=lambda: {"tasks": 4, "seeds": 2})
    cost: str = ""  # measured wall time of the full run on the reference machine, in words

    def quick_overrides(self, recipe: str) -> list[str]:
        """The --quick overrides of ``recipe``."""
        return list(self.quick.get(recipe, ()) if isinstance(self.quick, dict) else self.quick)


def source_of(paper: str) -> str:
    """Where an experiment comes from, for headings: "paper 4.1.1, figure 2", or an ``Experiment.paper`` that is
    not a section of the paper as it is ("beyond the paper")."""
    return f"paper {paper}" if paper[:1].isdigit() else paper


@dataclass
class Context:
    """What the protocol of an experiment gets: the effective recipes, the meta-trained artifacts, the mode."""

    experiment: Experiment
    quick: bool
    meta_seeds: list[int]
    overrides: dict[str, list[str]]  # recipe name → --set overrides in force
    artifact_paths: dict[str, dict[int, Path]]  # recipe name → meta-train seed → artifact
    #: figures beyond the comparison figure that the protocol draws: file name (``trajectories.png``) → PNG bytes
    figures: dict[str, bytes] = field(default_factory=dict)
    #: environment samples (simulator steps) the protocol spends at meta-test, baselines included
    meta_test_samples: int = 0
    #: where progress goes (the command's console)
    say: Callable[[str], None] = field(default=lambda _: None, repr=False)
    #: a folder beside the artifacts where a protocol may keep finished parts of a long baseline, so that a run
    #: interrupted (or spread over several sessions) resumes them (None: nothing is kept)
    work_dir: Path | None = None

    def count_samples(self, samples: int) -> None:
        """Add ``samples`` environment steps spent at meta-test (by any loss or baseline)."""
        self.meta_test_samples += int(samples)

    def recipe(self, name: str, seed: int | None = None) -> Recipe:
        """The effective recipe ``name`` (with the mode's overrides), for meta-train seed ``seed``."""
        return load_recipe(find_recipe(name), self.overrides[name], seed=seed)


# -- meta-training --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetaTrainJob:
    """One artifact of the plan: a recipe at a meta-train seed, with the overrides in force."""

    recipe: str
    seed: int
    overrides: tuple[str, ...]
    artifact: Path

    def run(self) -> Run:
        """The ``ml3 meta-train`` run that writes the artifact."""
        sets = [word for item in self.overrides for word in ("--set", item)]
        return Run(("meta-train", self.recipe, "--seed", str(self.seed), "--quiet", *sets), self.artifact)

    def effective_recipe(self) -> dict[str, Any]:
        """The recipe as the artifact must record it, without the output path."""
        recipe = recipe_to_dict(load_recipe(find_recipe(self.recipe), list(self.overrides), seed=self.seed))
        recipe.pop("artifact", None)
        return recipe

    def reusable(self) -> bool:
        """Whether the artifact exists and was meta-trained by exactly this recipe and seed."""
        if not self.artifact.is_file():
            return False
        try:
            recorded = dict(artifacts.read_info(self.artifact)["recipe"])
        except ML3Error:
            return False
        recorded.pop("artifact", None)
        return recorded == self.effective_recipe()


def meta_train_all(
    jobs: Sequence[MetaTrainJob], launcher: Launcher, say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Meta-train every job whose artifact is not reusable, by ``launcher`` (processes here, or a Ray cluster);
    one record per job (seed, artifact, reused, wall seconds, meta-train seconds). Raises ML3Error naming the
    failed runs and logs."""
    todo = [job for job in jobs if not job.reusable()]
    for job in jobs:
        if job not in todo:
            say(f"reusing {job.artifact} ({job.recipe}, seed {job.seed}: same recipe)")
    by_run = {job.run(): job for job in todo}
    count = iter(range(1, len(todo) + 1))

    def on_finished(finished: Finished) -> None:
        job = by_run[finished.run]
        done_so_far = f"[{next(count)}/{len(todo)}]"
        say(
            f"{done_so_far} meta-trained {job.recipe} seed {job.seed} in {finished.seconds:.1f} s"
            if finished.code == 0
            else f"{done_so_far} FAILED: {job.recipe} seed {job.seed}"
        )

    done = {by_run[f.run]: (f.code, f.seconds) for f in launcher.run_all(list(by_run), on_finished)}
    failed = [job for job, (code, _) in done.items() if code != 0]
    if failed:
        raise ML3Error(
            "meta-training failed for "
            + ", ".join(f"{job.recipe} seed {job.seed} (see {job.artifact.with_suffix('.log')})" for job in failed)
        )
    records = []
    for job in jobs:
        info = artifacts.read_info(job.artifact)
        records.append(
            {
                "recipe": job.recipe,
                "seed": job.seed,
                "artifact": str(job.artifact),
                "reused": job not in done,
                "wall_seconds": round(done[job][1], 2) if job in done else None,
                "meta_train_seconds": info["metrics"].get("meta_train_seconds"),
                # simulator steps meta-training spent (recorded by tasks that roll out a real environment)
                "environment_samples": int(info["metrics"].get("environment_samples", 0)),
                # and the meta-test that `ml3 meta-train` runs after it (none recorded by artifacts before it was counted)
                "meta_test_environment_samples": int(
                    info["metrics"].get("meta_test", {}).get("environment_samples", 0)
                ),
            }
        )
    return records


# -- the fair comparison --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSizes:
    """The evaluation sizes of one comparison where they differ from the recipe's meta-test (None: the recipe's,
    or --quick's): SGD steps, test tasks and seeds, the validation split the rates are tuned on (None: as large as
    the test; smaller where one evaluation is costly), and the tuning grid (:func:`ml3cli.evaluate.lr_grid` around the fixed rate,
    widened by :func:`widen_until_interior`)."""

    steps: int | None = None
    tasks: int | None = None
    seeds: int | None = None
    validation_tasks: int | None = None
    validation_seeds: int | None = None
    grid_span: float = 2.0  # decades either side of the fixed rate
    grid_step: float = 0.5  # decades between two rates
    max_widenings: int = 3


def tune_interior(
    task, loss: NamedLoss, center: float, tasks: int, seeds: int, steps: int, metric: str | None = None,
    sizes: EvalSizes | None = None, optimizer: InnerOptimizer = SGD(), adaptation: Adaptation | None = None,
) -> tuple[float, dict[float, float]]:  # fmt: skip
    """:func:`ml3cli.evaluate.tune_lr` on the grid of ``sizes``: the rate of ``loss`` with the lowest final metric
    on ``tasks`` × ``seeds`` validation tasks, chosen where it is interior, trained with ``optimizer`` (and
    ``adaptation`` for a learned loss). Returns the rate and every score."""
    sizes = sizes or EvalSizes()
    return tune_lr(
        task, loss, center, tasks, seeds, steps, metric, sizes.grid_span, sizes.grid_step, sizes.max_widenings,
        optimizer, adaptation,
    )  # fmt: skip


def widen_until_interior(
    score: Callable[[list[float]], dict[float, float]], center: float, sizes: EvalSizes | None = None
) -> tuple[float, dict[float, float]]:
    """:func:`ml3cli.evaluate.widen_until_interior` on the grid of ``sizes``, for a baseline with a learning rate
    that is not a loss over the task's inputs."""
    sizes = sizes or EvalSizes()
    return widen_rates(score, center, sizes.grid_span, sizes.grid_step, sizes.max_widenings)


@dataclass(frozen=True)
class Paired:
    """learned − baseline of the final metric over every (meta-train seed, test seed) pair (lower is better)."""

    mean: float
    low: float
    high: float
    learned_better_on: int
    pairs: int

    @classmethod
    def of(cls, learned: np.ndarray, baseline: np.ndarray) -> Paired:
        """``learned[m, s]`` against ``baseline[s]`` (broadcast over meta-train seeds m), or against
        ``baseline[m, s]`` where the baseline itself depends on the meta-train seed (a model learned with it)."""
        baseline = np.asarray(baseline)
        diff = (learned - (baseline if baseline.ndim == 2 else baseline[None, :])).reshape(-1)
        n = diff.size
        half = t_quantile_975(n - 1) * float(diff.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
        mean = float(diff.mean())
        return cls(mean, mean - half, mean + half, int((diff < 0).sum()), n)

    @property
    def significant(self) -> bool:
        """The whole 95% interval lies below 0: the learned loss is better."""
        return self.high < 0


@dataclass(frozen=True)
class Baseline:
    """A baseline other than the test task's built-in loss, for :func:`compare_losses`.

    ``make(meta_seed)`` gives the task object the baseline trains on and its loss: a task of the test family whose
    tasks and θ₀ are drawn exactly as the test task's (the same options but for how the gradient is taken, e.g. the
    final distance differentiated through a dynamics model or through a simulator), so the pairs stay paired. With
    ``per_meta_seed`` there is one baseline per meta-train seed (``make(m)``: e.g. the dynamics model learned with
    that seed), tuned and tested on its own, and paired with that seed's learned loss; without, ``make(None)``.
    """

    name: str  # for tables, e.g. "task loss through P"
    make: Callable[[int | None], tuple[Task, LossFn]]
    per_meta_seed: bool = False


def compare_losses(
    context: Context,
    recipe_name: str,
    metric: str | None = None,
    report_steps: Sequence[int] = (0, 1, 10, 50, 100),
    test_task: str | None = None,
    test_options: dict[str, Any] | None = None,
    label: str | None = None,
    baseline: Baseline | None = None,
    sizes: EvalSizes | None = None,
    extra: Callable[[dict[str, LossCurves]], dict[str, Any]] | None = None,
    curves_out: dict[str, LossCurves] | None = None,
    control: bool = False,
    optimizer: str | None = None,
    adaptation: Adaptation | None = None,
) -> dict[str, Any]:
    """The fair comparison of one recipe's learned losses (one per meta-train seed) against its baseline, on the
    task's metric (its task loss), or on one of its report metrics (``metric``, e.g. ``|θ−ν|``), lower is better.
    The learning rates are chosen on the same metric. By default on the recipe's meta-test tasks; ``test_task``
    and ``test_options`` (merged over the recipe's meta-test options) give a transfer row, named ``label``.

    ``baseline``: another baseline than the task's built-in loss (:class:`Baseline`). ``sizes``: evaluation sizes
    other than the recipe's (:class:`EvalSizes`). ``extra(curves)``: numbers beyond the comparison from every
    loss's whole test curves (label → :class:`LossCurves`), stored under ``extra``; ``curves_out`` receives the
    same curves. ``control``: a comparison shown beside the claim, left out of the experiment's verdict. The
    environment samples the tasks spend (tuning and test, baselines included) are added to the context.

    ``optimizer``: how every optimizee trains, baseline included (``sgd``, ``momentum``, ``adam``; default: the
    recipe's ``inner.optimizer``, with its settings); each loss's rate is tuned for it. ``adaptation``: the learned
    losses adapt online (:mod:`ml3cli.engine.online`) while they train, at tuning as at test; the baseline is a
    fixed hand-written loss either way.
    """
    recipe = context.recipe(recipe_name, seed=context.meta_seeds[0])
    test = recipe.meta_test
    options = (
        {**test.task_options, **(test_options or {})} if test_task in (None, test.task) else dict(test_options or {})
    )
    task = make_task(test_task or test.task, options, where="meta_test.task_options")
    sizes = sizes or EvalSizes()
    quick = context.experiment.quick_eval if context.quick else {}
    steps, fixed = sizes.steps or test.steps, recipe.meta_test_lr
    inner = recipe.inner if optimizer in (None, recipe.inner.optimizer) else InnerConfig(optimizer=optimizer)
    rule = optimizer_for(inner)
    tasks = sizes.tasks or quick.get("tasks") or test.tasks
    seeds = sizes.seeds or quick.get("seeds") or test.seeds
    tune_tasks = min(sizes.validation_tasks or tasks, tasks)
    tune_seeds = min(sizes.validation_seeds or seeds, seeds)
    if baseline is None:
        name = test.baseline or baseline_name(task)
        baseline = Baseline(name, lambda _: (task, builtin_loss(task, name, fixed).fn))
    keys: list[int | None] = list(context.artifact_paths[recipe_name]) if baseline.per_meta_seed else [None]
    counted: dict[int, tuple[Task, int]] = {id(task): (task, task.environment_samples)}  # task → samples before

    def samples() -> int:
        return sum(t.environment_samples - before for t, before in counted.values())

    def tune(on: Task, loss: NamedLoss) -> tuple[float, dict[float, float]]:
        return tune_interior(on, loss, fixed, tune_tasks, tune_seeds, steps, metric, sizes, rule, adaptation)

    shown_label = label or f"{recipe_name} on {task.name}"
    context.say(
        f"comparing {shown_label}: tuning the rates of {len(keys) + len(context.artifact_paths[recipe_name])} "
        f"losses on {tune_tasks} validation tasks × {tune_seeds} seeds"
    )
    started = time.perf_counter()
    base: dict[int | None, tuple[Task, NamedLoss, float, dict[float, float]]] = {}
    for key in keys:
        base_task, fn = baseline.make(key)
        counted.setdefault(id(base_task), (base_task, base_task.environment_samples))
        loss = NamedLoss(baseline.name, fn, fixed, "builtin")
        base[key] = (base_task, loss, *tune(base_task, loss))
    learned: dict[int, NamedLoss] = {}
    learned_tuned: dict[int, tuple[float, dict[float, float]]] = {}
    for m, path in context.artifact_paths[recipe_name].items():
        learned[m] = LossSpec(str(path)).resolve(task, fixed, task.device).named
        learned_tuned[m] = tune(task, learned[m])
    tuning_seconds, tuning_samples = time.perf_counter() - started, samples()
    context.say(f"  tuned in {tuning_seconds:.0f} s; testing on {tasks} tasks × {seeds} seeds")

    def at(loss: NamedLoss, lr: float, label: str) -> NamedLoss:
        return dataclasses.replace(loss, lr=lr, label=label)

    candidates = []
    for m, loss in learned.items():
        candidates += [at(loss, fixed, f"learned{m}@fixed"), at(loss, learned_tuned[m][0], f"learned{m}@tuned")]
    started = time.perf_counter()
    curves = {
        c.label: c
        for c in evaluate(task, candidates, tasks, seeds, steps, seed=0, optimizer=rule, adaptation=adaptation)
    }
    for key, (base_task, loss, tuned_lr, _) in base.items():
        tag = "baseline" if key is None else f"baseline{key}"
        pair = [at(loss, fixed, f"{tag}@fixed"), at(loss, tuned_lr, f"{tag}@tuned")]
        curves.update({c.label: c for c in evaluate(base_task, pair, tasks, seeds, steps, seed=0, optimizer=rule)})
    test_seconds = time.perf_counter() - started
    if curves_out is not None:
        curves_out.update(curves)

    extras: dict[str, Any] = {  # the task's other report metrics (e.g. accuracy) after the last step
        "report_metrics": {
            label: {name: float(metric_at(c, steps, name).mean()) for name in c.extras} for label, c in curves.items()
        }
    }
    if not any(extras["report_metrics"].values()):
        del extras["report_metrics"]
    extras.update(extra(curves) if extra is not None else {})
    if inner.optimizer != "sgd" or adaptation is not None:  # how the optimizees trained, where not plain SGD
        extras["optimizer"] = inner.optimizer
        if adaptation is not None:
            extras["adaptation"] = adaptation.record()
    total = samples()
    context.count_samples(total)
    if total:
        extras["environment_samples"] = {"tuning": tuning_samples, "test": total - tuning_samples}

    def per_key(values: dict[int | None, Any]) -> Any:
        return values[None] if keys == [None] else {str(m): value for m, value in values.items()}

    return comparison_record(
        recipe=recipe_name,
        label=shown_label,
        task=task.name,
        metric=metric or task.metric,
        report_metric=metric,
        baseline=baseline.name,
        steps=steps,
        tasks=tasks,
        seeds=seeds,
        meta_seeds=list(learned),
        curves=curves,
        lr={
            "fixed": fixed,
            "baseline_tuned": per_key({key: b[2] for key, b in base.items()}),
            "baseline_scores": per_key({key: b[3] for key, b in base.items()}),
            "learned_tuned": {str(m): lr for m, (lr, _) in learned_tuned.items()},
            "learned_scores": {str(m): scores for m, (_, scores) in learned_tuned.items()},
            "validation": {"tasks": tune_tasks, "seeds": tune_seeds},
            "grid": {"span_decades": sizes.grid_span, "step_decades": sizes.grid_step},
        },
        seconds={"tuning": round(tuning_seconds, 2), "test": round(test_seconds, 2)},
        report_steps=report_steps,
        extra=extras,
        control=control,
    )


def comparison_record(
    *,
    recipe: str,
    label: str,
    task: str,
    metric: str,
    baseline: str,
    steps: int,
    tasks: int,
    seeds: int,
    meta_seeds: Sequence[int],
    curves: Mapping[str, LossCurves],
    lr: dict[str, Any],
    seconds: dict[str, float],
    report_steps: Sequence[int] = (0, 1, 10, 50, 100),
    report_metric: str | None = None,
    extra: dict[str, Any] | None = None,
    control: bool = False,
) -> dict[str, Any]:
    """A comparison as ``results.json`` stores it, from the test curves (:func:`compare_losses`, or a protocol of
    its own).

    ``curves`` holds ``learned{m}@fixed`` and ``learned{m}@tuned`` for every meta-train seed m, and the baseline's
    as ``baseline@fixed`` / ``baseline@tuned``, or, for a baseline per meta-train seed (another learned loss, a
    model learned with that seed), ``baseline{m}@fixed`` / ``baseline{m}@tuned``: each is then paired with the
    learned loss of its seed, and ``baseline@…`` in the stored curves is their mean. ``lr`` as in
    :func:`compare_losses` (``baseline_tuned`` a dict per meta-train seed for a baseline per seed). The final metric
    is read at ``steps`` (the task loss, or the report metric ``report_metric``, named ``metric``)."""
    per_seed = "baseline@fixed" not in curves

    def final(label: str) -> np.ndarray:
        return metric_at(curves[label], steps, report_metric)

    def stack(kind: str) -> np.ndarray:
        return np.stack([final(f"learned{m}@{kind}") for m in meta_seeds])

    def base(kind: str) -> np.ndarray:
        return np.stack([final(f"baseline{m}@{kind}") for m in meta_seeds]) if per_seed else final(f"baseline@{kind}")

    same = Paired.of(stack("fixed"), base("fixed"))
    tuned = Paired.of(stack("tuned"), base("tuned"))
    shown = [s for s in report_steps if s <= steps] + ([steps] if steps not in report_steps else [])
    table = {
        label: {str(s): float(metric_at(c, s, report_metric).mean()) for s in shown} for label, c in curves.items()
    }
    if per_seed:  # the figure and the tables read baseline@…: the mean over meta-train seeds
        for kind in ("fixed", "tuned"):
            table[f"baseline@{kind}"] = {
                str(s): float(np.mean([table[f"baseline{m}@{kind}"][str(s)] for m in meta_seeds])) for s in shown
            }
    return {
        "recipe": recipe,
        "label": label,
        "task": task,
        "metric": metric,
        "baseline": baseline,
        "steps": steps,
        "tasks": tasks,
        "test_seeds": seeds,
        "meta_seeds": list(meta_seeds),
        "lr": lr,
        "final": {  # [meta-train seed][test seed]; the baseline's [test seed], or [meta-train seed][test seed]
            "learned_fixed": stack("fixed").tolist(),
            "learned_tuned": stack("tuned").tolist(),
            "baseline_fixed": base("fixed").tolist(),
            "baseline_tuned": base("tuned").tolist(),
        },
        "curves": table,
        "same_lr": dataclasses.asdict(same),
        "tuned": dataclasses.asdict(tuned),
        "verdict": verdict(same, tuned),
        "seconds": seconds,
        "extra": extra or {},
        "control": control,
    }


def verdict(same: Paired, tuned: Paired) -> dict[str, str]:
    """Tuned against tuned decides; the same-rate comparison explains a partial result."""
    if tuned.significant:
        return {"verdict": "reproduced", "why": "better than the baseline at both tuned rates (95% interval below 0)"}
    if same.significant and tuned.mean >= 0:
        why = "better only at the baseline's untuned rate: the learned loss has learned a step size"
        return {"verdict": "partly", "why": why}
    if same.significant or tuned.mean < 0:
        return {"verdict": "partly", "why": "better on average, but the tuned 95% interval includes 0"}
    return {"verdict": "not reproduced", "why": "not better than the baseline at tuned rates"}


def overall_verdict(comparisons: Sequence[dict[str, Any]]) -> str:
    """All comparisons reproduced → reproduced; none better in any sense → not reproduced; else partly. Controls
    (``control``: a comparison shown beside the claim, not part of it) do not count."""
    judged = [c for c in comparisons if not c.get("control")] or list(comparisons)
    found = [c["verdict"]["verdict"] for c in judged]
    if found and all(v == "reproduced" for v in found):
        return "reproduced"
    if all(v == "not reproduced" for v in found):
        return "not reproduced"
    return "partly"


# -- provenance -----------------------------------------------------------------------------------------------------
def provenance() -> dict[str, Any]:
    """Where and with what the numbers were made: commit (and whether the tree was dirty), versions, machine."""
    import torch

    import ml3cli

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "ml3_version": ml3cli.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "machine": f"{platform.machine()}, {platform.system()}, {__import__('os').cpu_count()} CPUs",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# -- the schema of results.json -------------------------------------------------------------------------------------
class PairedRecord(BaseModel):
    """A :class:`Paired` as stored."""

    mean: float
    low: float
    high: float
    learned_better_on: int
    pairs: int


class VerdictRecord(BaseModel):
    """A verdict and the reason for it."""

    verdict: Literal["reproduced", "partly", "not reproduced"]
    why: str


class ComparisonRecord(BaseModel):
    """One comparison of :func:`compare_losses`."""

    model_config = ConfigDict(extra="forbid")

    recipe: str
    label: str
    task: str
    metric: str
    baseline: str
    steps: int
    tasks: int
    test_seeds: int
    meta_seeds: list[int]
    lr: dict[str, Any]
    final: dict[Literal["learned_fixed", "learned_tuned", "baseline_fixed", "baseline_tuned"], list]
    curves: dict[str, dict[str, float]]
    same_lr: PairedRecord
    tuned: PairedRecord
    verdict: VerdictRecord
    seconds: dict[str, float]
    #: what an experiment reports beyond the learned-vs-baseline comparison (another baseline such as iLQR or PPO,
    #: samples to 80% of the final gain, ...), named by the experiment
    extra: dict[str, Any] = {}
    #: a control shown beside the claim (e.g. a loss learned WITHOUT the extra information against the baseline,
    #: where the paper expects no gain): it has its verdict, but the experiment's verdict leaves it out
    control: bool = False


class ResultsRecord(BaseModel):
    """The whole of ``results/NAME/results.json``, as ``ml3 reproduce`` writes it and ``ml3 report`` reads it."""

    model_config = ConfigDict(extra="forbid")

    experiment: str
    paper: str
    claim: str
    quick: bool
    command: str
    verdict: Literal["reproduced", "partly", "not reproduced"]
    comparisons: list[ComparisonRecord]
    meta_train: list[dict[str, Any]]
    wall_seconds: dict[str, float]
    jobs: int
    #: where the meta-trainings ran (local, or ray [at ADDRESS]); results written before it was recorded lack it
    launcher: str = "local"
    environment_samples: dict[str, int]
    provenance: dict[str, Any]


def validate_results(document: Any, source: str) -> dict[str, Any]:
    """``document`` checked against :class:`ResultsRecord`; a malformed one is an ML3Error naming ``source``."""
    from pydantic import ValidationError

    from ml3cli.errors import describe_validation_error

    try:
        ResultsRecord.model_validate(document)
    except ValidationError as err:
        raise ML3Error(f"{source}: {describe_validation_error(err)}") from None
    return document
