"""What each CLI command does, as library functions: load, run, report, write. The CLI only parses flags."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ml3cli import artifacts, checkpoints, distributed, plots
from ml3cli.engine import meta_train
from ml3cli.errors import DivergenceError, ML3Error, RunInterrupted
from ml3cli.evaluate import LossCurves, NamedLoss, evaluate, paired_difference, tune_lr
from ml3cli.recipes import Recipe, apply_overrides, checkpoint_path_for, recipe_to_dict
from ml3cli.report_metrics import print_task_report, report_from_curves
from ml3cli.runtime import configure, resolve_device
from ml3cli.tasks import TASKS, make_task, task_class
from ml3cli.tasks.base import Task

#: learning rates tried by ``--tune-baseline-lr`` (on the meta-train task family only).
BASELINE_LR_SWEEP = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
#: tuning uses seeds far from the test seeds so that it never sees a test task.
TUNING_SEED_OFFSET = 10_000


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


# -- meta-train -----------------------------------------------------------------------------------------------
def run_meta_train(
    recipe: Recipe,
    out: str | Path | None,
    console: Console,
    quiet: bool = False,
    resume: str | Path | bool | None = None,
) -> Path:
    """``ml3 meta-train``: learn φ, meta-test it, write the artifact with its curves beside it.

    ``resume``: True or "" continues from the checkpoint next to the artifact, a path from that checkpoint.
    SIGINT/SIGTERM finish the current outer step, write a checkpoint and raise :class:`RunInterrupted`.
    Under torchrun (several processes, see :mod:`ml3cli.distributed`) every process meta-trains its share of the
    task batch; rank 0 alone writes checkpoints, the artifact and the meta-test, the others log to
    ``ARTIFACT.rankN.log``.
    """
    stop = _StopRequest()
    configure(recipe.threads, recipe.seed)
    device = resolve_device(recipe.device)
    shard = distributed.join(device)
    try:
        with stop.installed(), contextlib.ExitStack() as logs:
            if shard is not None and not shard.is_main:
                out_path = Path(out) if out else recipe.artifact_path
                log = logs.enter_context(open(out_path.with_suffix(f".rank{shard.rank}.log"), "w", encoding="utf-8"))
                console, quiet = Console(file=log, highlight=False), True
            return _run_meta_train(recipe, out, console, quiet, resume, stop, device, shard)
    finally:
        distributed.leave()


def _run_meta_train(
    recipe: Recipe, out, console: Console, quiet: bool, resume, stop: _StopRequest, device, shard
) -> Path:
    main = shard is None or shard.is_main
    out_path = Path(out) if out else recipe.artifact_path
    if out_path.suffix != ".safetensors":
        raise ML3Error(f"--out {out_path}: an artifact path must end in .safetensors")
    if main:
        artifacts.check_writable(out_path)
    task = make_task(recipe.task, recipe.task_options, device)
    if shard is not None:
        shard.bounds(recipe.outer.tasks)  # refuse an uneven split before any work
        console.print(f"process {shard.rank} of {shard.world}: tasks {shard.bounds(recipe.outer.tasks)} of the batch")
    checkpoint = checkpoint_path_for(out_path)
    base_info = {"task": recipe.task, "test_task": recipe.meta_test.task, "seed": recipe.seed}
    base_info["recipe"] = recipe_to_dict(recipe)
    start = None
    if resume is not None and resume is not False:
        resume_path = checkpoint if resume is True or str(resume) == "" else Path(resume)
        if not resume_path.is_file():
            raise ML3Error(f"--resume: no checkpoint at {resume_path} (nothing to resume; run without --resume)")
        loaded = checkpoints.load_checkpoint(resume_path, checkpoints.batch_type_of(task), device)
        checkpoints.check_resumable(loaded, base_info["recipe"], recipe.outer.steps)
        checkpoints.validate_state(loaded, recipe, task)
        start = loaded.state
        if not quiet:
            console.print(f"resuming from {resume_path} at outer step {start.step} of {recipe.outer.steps}")
    elif checkpoint.is_file() and not quiet:
        console.print(f"note: starting afresh; {checkpoint} of an earlier run will be overwritten (--resume continues)")
    stop.checkpoint = str(checkpoint)

    with _progress(console, quiet) as progress:
        bar = progress.add_task(f"meta-train {recipe.name}", total=recipe.outer.steps)

        def on_step(step: int, record: dict[str, float] | None) -> None:
            if record is not None:
                progress.update(bar, description=f"meta-train {recipe.name}  task loss {record['meta/task_loss']:.4g}")
            progress.update(bar, completed=step)

        def on_state(step: int, snapshot) -> None:
            every = recipe.checkpoint_every
            stopping = stop.signum is not None
            if shard is not None:  # every process stops after the same step
                stopping = shard.any(stopping)
            if main and (stopping or (every and (step % every == 0 or step == recipe.outer.steps))):
                checkpoints.save_checkpoint(checkpoint, snapshot(), base_info["recipe"], out_path)
                stop.kept_step = step
            if stopping:
                raise RunInterrupted(stop.signum or signal.SIGTERM, step, str(checkpoint))

        if start is not None:
            progress.update(bar, completed=start.step)
        try:
            stop.training = True
            result = meta_train(recipe, task, on_step=on_step, resume=start, on_state=on_state, shard=shard)
            stop.training = False
        except DivergenceError as err:
            if checkpoint.is_file():
                raise DivergenceError(err.outer_step, err.what, kept=str(checkpoint)) from None
            raise

    if not main:
        console.print(f"process {shard.rank}: meta-training done in {result.seconds:.1f} s; rank 0 writes {out_path}")
        return out_path

    test = recipe.meta_test
    test_task = make_task(test.task, test.task_options, device, where="meta_test.task_options")
    learned = NamedLoss("learned", result.metaloss.as_loss_fn(), recipe.meta_test_lr, str(out_path))
    baseline_name = test.baseline or next(iter(test_task.builtin_losses))
    baseline = _builtin_loss(test_task, baseline_name, recipe.meta_test_lr)
    curves = evaluate(test_task, [learned, baseline], test.tasks, test.seeds, test.steps, recipe.seed)
    metrics = {
        "meta_train": {k: v for k, v in result.final.items() if k != "step"} | {"outer_steps": recipe.outer.steps},
        "meta_train_seconds": round(result.seconds, 3),
        "meta_test": {
            "task": test.task,
            "metric": test_task.metric,
            "steps": test.steps,
            "tasks": test.tasks,
            "seeds": test.seeds,
            "final": {c.label: float(c.at(test.steps).mean()) for c in curves},
            "final_per_seed": {c.label: [float(v) for v in c.at(test.steps)] for c in curves},
            "baseline": baseline_name,
        },
    }
    artifacts.save_loss(out_path, result.metaloss, base_info | {"metrics": metrics})
    if not recipe.checkpoint_every:  # no end-of-run checkpoint: one left by an interrupt is spent now
        checkpoint.unlink(missing_ok=True)
    curves_path = out_path.with_suffix(".curves.csv")
    artifacts.write_text_atomic(curves_path, artifacts.csv_text(result.curves))
    artifacts.write_bytes_atomic(
        out_path.with_suffix(".curves.png"), plots.meta_train_plot(result.curves, f"meta-train {recipe.name}")
    )

    final = metrics["meta_test"]["final"]
    console.print(
        f"[bold]meta-train {recipe.name}[/]: {recipe.outer.steps} outer steps in {result.seconds:.1f} s; "
        f"task loss {_fmt(result.final['meta/task_loss_before'])} → {_fmt(result.final['meta/task_loss'])} "
        f"over {recipe.inner.steps} inner step(s)"
    )
    console.print(
        f"meta-test on {test.task} ({test.tasks} tasks × {test.seeds} seeds, {test.steps} steps): "
        f"{test_task.metric} learned {_fmt(final['learned'])} vs {baseline_name} {_fmt(final[baseline_name])}"
    )
    console.print(f"wrote {out_path}  (curves: {curves_path})")
    return out_path


class _StopRequest:
    """SIGINT/SIGTERM during meta-training: the first one lets the current outer step finish and asks for a
    checkpoint (see ``on_state``); a second one, or one outside the outer loop, stops at once."""

    def __init__(self) -> None:
        self.checkpoint: str | None = None
        self.signum: int | None = None
        self.training = False
        self.kept_step: int | None = None

    def handle(self, signum: int, frame: Any) -> None:
        if self.training and self.signum is None:
            self.signum = signum
            return
        kept = self.checkpoint if self.checkpoint and Path(self.checkpoint).is_file() else None
        note = " (the current outer step was dropped)" if self.training else ""
        raise RunInterrupted(signum, self.kept_step, kept, note)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():  # signals can only be caught there
            yield self
            return
        previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _progress(console: Console, quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
        transient=False,
    )


# -- losses by name -------------------------------------------------------------------------------------------
def _builtin_loss(task: Task, name: str, lr: float, label: str | None = None) -> NamedLoss:
    fn = task.builtin_losses[name]
    return NamedLoss(label or name, lambda inputs: fn(**inputs), lr, "builtin")


@dataclass(frozen=True)
class LossSpec:
    """A ``--loss`` value: a built-in name (``mse``), optionally with a learning rate (``mse@0.01``), or a path."""

    text: str

    def resolve(self, task: Task, default_lr: float | None, device: torch.device) -> tuple[NamedLoss, dict | None]:
        body, _, lr_text = self.text.partition("@")
        lr = None
        if lr_text:
            try:
                lr = float(lr_text)
            except ValueError:
                raise ML3Error(
                    f"--loss {self.text!r}: the part after @ must be a learning rate, e.g. mse@0.01"
                ) from None
            if not lr > 0:
                raise ML3Error(f"--loss {self.text!r}: the learning rate must be positive")
        if body in task.builtin_losses:
            chosen = lr or default_lr or 1e-3
            label = body if not lr_text else f"{body}@{lr_text}"
            return _builtin_loss(task, body, chosen, label), None
        path = Path(body)
        if not path.exists():
            raise ML3Error(
                f"--loss {self.text!r}: neither a built-in loss of {task.name!r} ({', '.join(task.builtin_losses)}) "
                "nor an existing artifact file"
            )
        module = artifacts.load_loss(path, expect_inputs=task.loss_inputs_spec).to(device)
        info = module.info
        chosen = lr or default_lr or (info["recipe"].get("inner") or {}).get("lr") or 1e-3
        label = path.stem if not lr_text else f"{path.stem}@{lr_text}"
        return NamedLoss(label, module.as_loss_fn(), chosen, str(path)), info


# -- meta-test and compare ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSettings:
    tasks: int | None = None
    seeds: int | None = None
    steps: int | None = None
    lr: float | None = None
    seed: int = 0
    threshold: float | None = None
    device: str = "cpu"
    threads: int = 1
    at: tuple[int, ...] | None = None  # steps shown in the tables (default 0, 1, 10, 50, 100 and the last)
    task_options: tuple[str, ...] = ()  # KEY=VALUE overrides of the test task's options (--task-option)


def run_comparison(
    task_name: str,
    loss_specs: Sequence[str],
    settings: EvalSettings,
    console: Console,
    *,
    command: str,
    json_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    tune_baseline_lr: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """``ml3 meta-test`` / ``ml3 compare``: train fresh optimizees with each loss, same seeds, and report."""
    configure(settings.threads, settings.seed)
    device = resolve_device(settings.device)
    if not loss_specs:
        raise ML3Error("give at least one --loss (an artifact path or a built-in name such as mse)")
    task_class(task_name)

    # Settings the artifact was meta-tested with are the defaults when it is tested on the same task family.
    artifact_infos = []
    for spec in loss_specs:
        path = Path(spec.partition("@")[0])
        if spec.partition("@")[0] not in task_class(task_name).builtin_losses and path.is_file():
            artifact_infos.append(artifacts.read_info(path))
    recorded_tests = [info["recipe"].get("meta_test") or {} for info in artifact_infos]
    recorded = next((test for test in recorded_tests if test.get("task") == task_name), {})
    task_options = recorded.get("task_options", {})
    if settings.task_options:  # e.g. architecture=mlp: the same held-out tasks with another optimizee
        bad = [item for item in settings.task_options if "=" not in item or not item.partition("=")[0].strip()]
        if bad:
            raise ML3Error(f"--task-option {bad[0]!r}: expected KEY=VALUE, e.g. --task-option architecture=mlp")
        task_options = apply_overrides(dict(task_options), list(settings.task_options))
    tasks = settings.tasks or recorded.get("tasks", 10)
    seeds = settings.seeds or recorded.get("seeds", 5)
    steps = settings.steps or recorded.get("steps", 100)
    _table_steps(steps, settings.at)  # refuse --at beyond the steps before any training
    default_lr = settings.lr or recorded.get("lr")
    where = "--task-option" if settings.task_options else "task_options"
    task = make_task(task_name, task_options, device, where=where)

    losses: list[NamedLoss] = []
    for spec in loss_specs:
        named, _ = LossSpec(spec).resolve(task, default_lr, device)
        losses.append(named)
    labels = [loss.label for loss in losses]
    if len(set(labels)) != len(labels):
        raise ML3Error(f"two --loss values share the label {labels}; give each loss once")

    tuning = None
    if tune_baseline_lr:
        if not artifact_infos:
            raise ML3Error("--tune-baseline-lr chooses the rate on an artifact's meta-train task: give an artifact")
        info = artifact_infos[0]
        if info["task"] not in TASKS:
            raise ML3Error(f"--tune-baseline-lr: the artifact records no known meta-train task ({info['task']!r})")
        train_task = make_task(info["task"], info["recipe"].get("task_options"), device)
        baseline_name = next(iter(task.builtin_losses))
        base = _builtin_loss(train_task, baseline_name, 1.0)
        best, scores = tune_lr(
            train_task, base, BASELINE_LR_SWEEP, tasks, seeds, steps, settings.seed + TUNING_SEED_OFFSET
        )
        losses.append(_builtin_loss(task, baseline_name, best, f"{baseline_name} (tuned lr)"))
        tuning = {"loss": baseline_name, "on_task": info["task"], "best_lr": best, "final_by_lr": scores}

    with _progress(console, quiet) as progress:
        bar = progress.add_task(f"{command} {task_name}: {len(losses)} losses, seed", total=seeds)
        curves = evaluate(
            task, losses, tasks, seeds, steps, settings.seed, on_seed=lambda done: progress.update(bar, completed=done)
        )

    initial = float(curves[0].at(0).mean())
    threshold = settings.threshold if settings.threshold is not None else 0.5 * initial
    document = _results_document(task, task_options, curves, tasks, seeds, steps, settings, threshold, tuning)
    _print_results(console, task, curves, steps, seeds, tasks, threshold, document, settings.at)
    report = report_from_curves(curves, _table_steps(steps, settings.at))
    if report:  # tasks with Task.report_metrics (e.g. |θ − ν| for sine_frequency)
        document["report_metrics"] = report
        print_task_report(console, task, report, tasks * seeds)

    out = Path(out_dir) if out_dir else Path("runs") / f"{command}_{task_name}"
    artifacts.write_json_atomic(out / "results.json", document)
    artifacts.write_text_atomic(out / "curves.csv", _curves_csv(curves))
    artifacts.write_bytes_atomic(
        out / "curves.png", plots.meta_test_plot(curves, f"{command} on {task_name}", task.metric)
    )
    if json_path:
        artifacts.write_json_atomic(json_path, document)
    console.print(f"wrote {out / 'results.json'}, {out / 'curves.csv'}, {out / 'curves.png'}")
    return document


def _table_steps(steps: int, at: Sequence[int] | None = None) -> list[int]:
    """The steps shown in tables: ``at`` (each at most ``steps``; step 0 always), else 0, 1, 10, 50, 100 and the last."""
    if at:
        if max(at) > steps:
            raise ML3Error(f"--at {max(at)}: beyond the {steps} steps trained (raise --steps)")
        return sorted({0, *at})
    return sorted({s for s in (0, 1, 10, 50, 100, steps) if s <= steps})


def _results_document(task, task_options, curves, tasks, seeds, steps, settings, threshold, tuning) -> dict:
    reference = curves[0]
    return {
        "task": task.name,
        "task_options": task.options.model_dump(mode="json"),
        "metric": task.metric,
        "tasks": tasks,
        "seeds": list(range(settings.seed, settings.seed + seeds)),
        "steps": steps,
        "recorded_steps": list(range(steps + 1)),
        "threshold": threshold,
        "losses": [
            {
                "name": c.label,
                "source": c.source,
                "lr": c.lr,
                "per_seed": [[float(v) for v in row] for row in c.per_seed],
                "mean": [float(v) for v in c.per_seed.mean(axis=0)],
                "std": [float(v) for v in c.per_seed.std(axis=0)],
                "steps_to_threshold": c.steps_to(threshold),
            }
            for c in curves
        ],
        "paired": [
            {
                "reference": d.reference,
                "other": d.other,
                "step": steps,
                "mean_difference": d.mean,
                "ci95": [d.low, d.high],
                "reference_better_on": d.reference_wins,
                "seeds": d.seeds,
            }
            for d in (paired_difference(reference, other, steps) for other in curves[1:])
        ],
        "baseline_lr_tuning": tuning,
    }


def _print_results(console, task, curves: list[LossCurves], steps, seeds, tasks, threshold, document, at=None) -> None:
    table = Table(
        title=f"{task.name}: task {task.metric} on held-out points ({tasks} tasks × {seeds} seeds, mean ± std over seeds)"
    )
    table.add_column("loss")
    table.add_column("lr", justify="right")
    shown = _table_steps(steps, at)
    for s in shown:
        table.add_column(f"step {s}", justify="right")
    table.add_column(f"steps to ≤ {_fmt(threshold)}", justify="right")
    for c in curves:
        cells = [f"{_fmt(float(c.at(s).mean()))} ± {_fmt(float(c.at(s).std()))}" for s in shown]
        reached = [n for n in c.steps_to(threshold) if n is not None]
        when = f"{sorted(reached)[len(reached) // 2]} ({len(reached)}/{seeds})" if reached else f"never (0/{seeds})"
        table.add_row(c.label, f"{c.lr:g}", *cells, when)
    console.print(table)
    for pair in document["paired"]:
        low, high = pair["ci95"]
        console.print(
            f"{pair['other']} − {pair['reference']} at step {steps}: {_fmt(pair['mean_difference'])} "
            f"(95% CI {_fmt(low)} … {_fmt(high)}); {pair['reference']} better on "
            f"{pair['reference_better_on']}/{pair['seeds']} seeds"
        )
    tuning = document["baseline_lr_tuning"]
    if tuning:
        console.print(
            f"baseline lr tuned on {tuning['on_task']}: best {tuning['best_lr']:g} of "
            + ", ".join(f"{lr:g}→{_fmt(v)}" for lr, v in tuning["final_by_lr"].items())
        )


def _curves_csv(curves: list[LossCurves]) -> str:
    rows = []
    for c in curves:
        for seed_index, row in enumerate(c.per_seed):
            for step, value in enumerate(row):
                rows.append(
                    {
                        "loss": c.label,
                        "lr": c.lr,
                        "seed_index": seed_index,
                        "step": step,
                        "metric": float(value),
                    }
                )
    return artifacts.csv_text(rows)


# -- inspect and tasks ----------------------------------------------------------------------------------------
def inspect_artifact(path: str | Path, console: Console, as_json: bool = False) -> dict[str, Any]:
    """``ml3 inspect``: what an artifact is, after the same checks a load does."""
    module = artifacts.load_loss(path)
    info = module.info
    if as_json:
        console.print_json(json.dumps(info))
        return info
    arch = info["architecture"]
    inputs = ", ".join(f"{i['name']}[{i['size']}]" for i in arch["inputs"])
    n_params = sum(p.numel() for p in module.parameters())
    console.print(f"[bold]{path}[/]  (ml3 {info['ml3_version']}, torch {info['torch_version']}, {info['created']})")
    console.print(f"task: {info['task']}   meta-test task: {info['test_task']}   seed: {info['seed']}")
    console.print(f"inputs: ({inputs}) → M_φ per row, summed over class axes, mean over samples")
    console.print(
        f"meta-loss: MLP {arch['hidden']} {arch['activation']}, bias={arch['bias']}, output {arch['output']}; "
        f"{n_params} parameters" + ("; also outputs the inner learning rate (learned_lr)" if arch["learned_lr"] else "")
    )
    metrics = info.get("metrics", {})
    if "meta_test" in metrics:
        mt = metrics["meta_test"]
        finals = ", ".join(f"{k} {_fmt(v)}" for k, v in mt["final"].items())
        console.print(f"meta-test {mt['task']} after {mt['steps']} steps ({mt['metric']}): {finals}")
    if "meta_train" in metrics:
        finals = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics["meta_train"].items())
        console.print(f"meta-train: {finals}")
    if info["recipe"]:
        console.print("recipe:")
        console.print(yaml.safe_dump(info["recipe"], sort_keys=False).rstrip(), markup=False, highlight=False)
    return info


def list_tasks(console: Console) -> None:
    """``ml3 tasks``: the registered task families and what their losses see."""
    for name, cls in sorted(TASKS.items()):
        inputs = ", ".join(f"{i.name}[{i.size}]" for i in cls.loss_inputs_spec)
        console.print(f"[bold]{name}[/]  {cls.summary}")
        console.print(
            f"    loss inputs: {inputs}   metric: {cls.metric}   built-in losses: {', '.join(cls.builtin_losses)}"
            f"   extra terms: {', '.join(cls.extra_term_names) or '—'}"
        )


# -- several seeds ---------------------------------------------------------------------------------------------
def seed_artifact_path(base: Path, seed: int) -> Path:
    """``artifacts/sine.safetensors`` → ``artifacts/sine-seed3.safetensors``."""
    return base.with_name(f"{base.stem}-seed{seed}{base.suffix}")


def run_seed_sweep(
    recipe: Recipe,
    seeds: Sequence[int],
    jobs: int,
    out: str | Path | None,
    command_for: Any,
    console: Console,
) -> list[Path]:
    """``ml3 meta-train RECIPE --seeds ... --jobs J``: one meta-training process per seed, J at a time, then a
    table across seeds. ``command_for(seed, artifact)`` gives the ``ml3`` arguments of one seed's run; each run's
    output goes to ``ARTIFACT.log``. Raises ML3Error naming the seeds that failed (after all have run)."""
    import subprocess
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor

    base = Path(out) if out else recipe.artifact_path
    if base.suffix != ".safetensors":
        raise ML3Error(f"--out {base}: an artifact path must end in .safetensors")
    paths = {seed: seed_artifact_path(base, seed) for seed in seeds}
    for path in paths.values():
        artifacts.check_writable(path)
    console.print(f"meta-training {recipe.name} for seeds {list(seeds)}, {jobs} at a time (logs: ARTIFACT.log)")

    def one(seed: int) -> tuple[int, int, float]:
        started = time.perf_counter()
        log_path = paths[seed].with_suffix(".log")
        with open(log_path, "w", encoding="utf-8") as log:
            code = subprocess.call(
                [sys.executable, "-m", "ml3cli", *command_for(seed, paths[seed])], stdout=log, stderr=subprocess.STDOUT
            )
        seconds = time.perf_counter() - started
        console.print(
            f"seed {seed}: {'done' if code == 0 else f'FAILED (exit {code})'} in {seconds:.1f} s → {log_path}"
        )
        return seed, code, seconds

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(one, seeds))
    wall = time.perf_counter() - started

    rows: list[dict[str, Any]] = []
    for seed, code, seconds in results:
        row: dict[str, Any] = {
            "seed": seed,
            "exit": code,
            "wall_seconds": round(seconds, 2),
            "artifact": str(paths[seed]),
        }
        if code == 0:
            metrics = artifacts.read_info(paths[seed])["metrics"]
            test = metrics["meta_test"]
            row |= {
                "meta_train_seconds": metrics["meta_train_seconds"],
                "meta_task_loss": metrics["meta_train"].get("meta/task_loss", math.nan),
                "learned": test["final"]["learned"],
                test["baseline"]: test["final"][test["baseline"]],
            }
        rows.append(row)
    done = [row for row in rows if row["exit"] == 0]
    columns = [k for k in (done[0] if done else {}) if k not in ("seed", "exit", "wall_seconds", "artifact")]
    table = Table(title=f"{recipe.name}: {len(done)} of {len(rows)} seeds, {wall:.1f} s wall with {jobs} job(s)")
    table.add_column("seed", justify="right")
    for column in columns:
        table.add_column(column, justify="right")
    for row in done:
        table.add_row(str(row["seed"]), *(_fmt(float(row[c])) for c in columns))
    if len(done) > 1:
        values = {c: np.array([float(row[c]) for row in done]) for c in columns}
        table.add_row("mean ± sd", *(f"{_fmt(v.mean())} ± {_fmt(v.std(ddof=1))}" for v in values.values()))
    console.print(table)
    summary = base.with_name(f"{base.stem}-seeds.json")
    artifacts.write_text_atomic(
        summary, json.dumps({"recipe": recipe.name, "wall_seconds": wall, "runs": rows}, indent=2)
    )
    console.print(f"wrote {summary}")
    failed = [row for row in rows if row["exit"] != 0]
    if failed:
        raise ML3Error(
            "meta-training failed for seed(s) "
            + ", ".join(
                f"{row['seed']} (exit {row['exit']}, see {Path(row['artifact']).with_suffix('.log')})" for row in failed
            )
        )
    return [paths[seed] for seed in seeds]
