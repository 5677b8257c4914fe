"""``ml3 meta-test`` and ``ml3 compare``: train fresh optimizees with each loss on held-out tasks and report.

Every loss starts from the same θ₀ on the same tasks per seed (:func:`ml3cli.evaluate.evaluate`), so the table's
differences are paired. ``meta-test`` is ``compare`` of one learned loss against the task's baseline. Unset counts,
the learning rate and the inner optimizer come from what the artifact recorded (:mod:`ml3cli.losses`); every loss
trains with the same optimizer. With ``--adapt`` every learned loss keeps learning while its optimizees train
(:mod:`ml3cli.engine.online`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ml3cli import files, plots
from ml3cli.commands.options import EvalOptions
from ml3cli.commands.output import fmt, fmt_spread, progress_bar
from ml3cli.commands.parsing import evaluation_seeds, parse_steps
from ml3cli.commands.runs import check_out_dir, exclusive_outputs, new_run_dir, write_json, write_settings
from ml3cli.engine import Adaptation, InnerOptimizer
from ml3cli.errors import ML3Error
from ml3cli.evaluate import LossCurves, NamedLoss, evaluate, paired_difference, step_size_ratio, tune_lr
from ml3cli.losses import (
    LossSpec,
    artifact_infos,
    baseline_name,
    builtin_loss,
    inner_optimizer,
    make_test_task,
    recorded_inner,
    recorded_test_settings,
    resolve_losses,
)
from ml3cli.report_metrics import print_task_report, report_from_curves
from ml3cli.runtime import configure, resolve_device
from ml3cli.tasks import Task, task_class


def meta_test(loss: str, task_name: str, baseline: str | None, options: EvalOptions, console: Console) -> dict:
    """``ml3 meta-test``: the loss ``loss`` against ``baseline`` (default: the task's first built-in loss)."""
    other = baseline or next(iter(task_class(task_name).builtin_losses))
    specs = [loss] if LossSpec(loss).body == other else [loss, other]  # a built-in tested alone is its own baseline
    return run(task_name, specs, options, console, command="meta-test")


def run(
    task_name: str, loss_specs: Sequence[str], options: EvalOptions, console: Console, *, command: str = "compare"
) -> dict[str, Any]:
    """``ml3 compare``: train fresh optimizees with each loss, same seeds, print the table, write the results
    (to ``--out-dir``, else a new ``runs/COMMAND/TASK/TIMESTAMP/``) with the settings used."""
    with exclusive_outputs(options.out_dir, options.json_path):
        return compare(task_name, loss_specs, options, console, command)


def compare(
    task_name: str, loss_specs: Sequence[str], options: EvalOptions, console: Console, command: str
) -> dict[str, Any]:
    """What :func:`run` does once it holds the outputs."""
    configure(options.threads, options.seed or 0)
    device = resolve_device(options.device)
    if not loss_specs:
        raise ML3Error("give at least one --loss (an artifact path or a built-in name such as mse)")
    task_class(task_name)
    at = parse_steps(options.at)
    check_out_dir(options.out_dir, RESULT_FILES, options.overwrite, options.json_path)

    infos = artifact_infos(loss_specs, task_name)
    recorded = recorded_test_settings(infos, task_name)
    optimizer = inner_optimizer(options.optimizer, recorded_inner(infos))
    tasks = options.tasks or recorded.tasks or EvalOptions.DEFAULT_TASKS
    seeds = evaluation_seeds(
        options.seeds, options.seed, options.num_seeds, recorded.seeds or EvalOptions.DEFAULT_SEEDS
    )
    steps = options.steps or recorded.steps or EvalOptions.DEFAULT_STEPS
    table_steps(steps, at)  # refuse --at beyond the steps before any training
    adaptation = adaptation_from(options)
    task = make_test_task(task_name, recorded, options.task_options, device)
    losses = [r.named for r in resolve_losses(loss_specs, task, options.lr or recorded.lr, device)]
    if adaptation is not None:
        task.check_validation_split()
        if all(loss.metaloss is None for loss in losses):
            raise ML3Error("--adapt adapts learned losses, and every --loss is a hand-written one: give a learned loss")

    tuning = None
    if options.tune_baseline_lr:  # on validation tasks of the test family: never a test task
        name = baseline_name(task)
        center = options.lr or recorded.lr or 1e-3
        best, scores = tune_lr(  # the same seed numbers as the test, drawn from the validation stream
            task, builtin_loss(task, name, center), center, tasks, seeds, steps, optimizer=optimizer
        )
        losses.append(builtin_loss(task, name, best, f"{name} (tuned lr)"))
        tuning = {"loss": name, "on_task": task.name, "stream": "validation", "best_lr": best, "final_by_lr": scores}

    with progress_bar(console, options.quiet) as progress:
        bar = progress.add_task(f"{command} {task_name}: {len(losses)} losses, seed", total=len(seeds))
        curves = evaluate(
            task, losses, tasks, seeds, steps, on_seed=lambda done: progress.update(bar, completed=done),
            optimizer=optimizer, adaptation=adaptation,
        )  # fmt: skip

    initial = float(curves[0].at(0).mean())
    threshold = options.threshold if options.threshold is not None else 0.5 * initial
    document = results_document(task, curves, tasks, seeds, steps, threshold, tuning, optimizer, adaptation)
    print_results(console, task, curves, steps, len(seeds), tasks, threshold, document, at)
    # the ratio describes a fixed loss: an adapting one is another loss at every step
    ratios = {} if adaptation is not None else learned_step_sizes(task, losses, tasks, seeds[0], steps, optimizer)
    if ratios:
        document["step_size_ratio"] = ratios
        for label, r in ratios.items():
            console.print(
                f"{label}: its steps are {fmt(r['mean'])}× {r['baseline']}'s at the same rate (10–90%: "
                f"{fmt(r['low'])}–{fmt(r['high'])}, along its own trajectories, seed {seeds[0]})"
            )
    report = report_from_curves(curves, table_steps(steps, at))
    if report:  # tasks with Task.report_metrics (e.g. |θ − ν| for sine_frequency)
        document["report_metrics"] = report
        print_task_report(console, task, report, tasks * len(seeds))

    out = Path(options.out_dir) if options.out_dir else new_run_dir(command, task_name)
    files.write_json_atomic(out / "results.json", document)
    files.write_text_atomic(out / "curves.csv", curves_csv(curves))
    files.write_bytes_atomic(out / "curves.png", plots.meta_test_plot(curves, f"{command} on {task_name}", task.metric))
    specs = [*loss_specs, *(["(--tune-baseline-lr)"] if tuning else [])]
    used = dataclasses.asdict(options) | {
        "task": task_name,
        "losses": [
            {"spec": spec, "label": c.label, "lr": c.lr, "source": c.source}
            for spec, c in zip(specs, curves, strict=True)
        ],
        "tasks": tasks,
        "seeds": seeds,
        "num_seeds": len(seeds),
        "seed": seeds[0],
        "steps": steps,
        "threshold": threshold,
        "at": table_steps(steps, at),
        "task_options": task.options.model_dump(mode="json"),
        "task_option_overrides": list(options.task_options),
        "out_dir": str(out),
        "device": str(device),
        "inner_optimizer": document["inner_optimizer"],
        "online_adaptation": document["online_adaptation"],
    }
    write_settings(out, command, used)
    write_json(options.json_path, document)
    console.print(f"wrote {', '.join(RESULT_FILES)} and settings.json to {out}")
    return document


def adaptation_from(options: EvalOptions) -> Adaptation | None:
    """The online adaptation ``--adapt`` asks for (None without it), its settings checked in one line each."""
    given = {
        flag: value
        for flag, value in (
            ("--adapt-every", options.adapt_every),
            ("--adapt-lr", options.adapt_lr),
            ("--adapt-unroll", options.adapt_unroll),
        )
        if value is not None
    }
    if not options.adapt:
        if given:
            raise ML3Error(f"{next(iter(given))} is a setting of online adaptation: add --adapt")
        return None
    defaults = Adaptation()
    every = options.adapt_every or defaults.every
    unroll = options.adapt_unroll or defaults.unroll
    lr = options.adapt_lr if options.adapt_lr is not None else defaults.lr
    if not (math.isfinite(lr) and lr >= 0):
        raise ML3Error(f"--adapt-lr {lr}: expected a finite rate, 0 or more")
    if unroll > every:
        raise ML3Error(
            f"--adapt-unroll {unroll} exceeds --adapt-every {every}: the meta-gradient flows back only through "
            "steps taken with the current φ; lower --adapt-unroll or raise --adapt-every"
        )
    return Adaptation(every=every, lr=lr, unroll=unroll)


def learned_step_sizes(
    task: Task, losses: Sequence[NamedLoss], tasks: int, seed: int, steps: int, optimizer: InnerOptimizer
) -> dict[str, dict[str, Any]]:
    """Each learned loss's :class:`~ml3cli.evaluate.StepSizeRatio` against the task's baseline loss at the learned
    loss's own rate, on the first evaluation seed's tasks (label → the ratio's fields and the baseline's name)."""
    name = baseline_name(task)
    return {
        loss.label: dataclasses.asdict(
            step_size_ratio(task, loss, builtin_loss(task, name, loss.lr), tasks, [seed], steps, optimizer=optimizer)
        )
        | {"baseline": name, "seed": seed}
        for loss in losses
        if loss.source != "builtin"
    }


#: what ``meta-test`` and ``compare`` write in their folder
RESULT_FILES = ("results.json", "curves.csv", "curves.png")


def table_steps(steps: int, at: Sequence[int] | None = None) -> list[int]:
    """The steps shown in tables: ``at`` (each at most ``steps``; step 0 always), else 0, 1, 10, 50, 100 and the last."""
    if at:
        if max(at) > steps:
            raise ML3Error(f"--at {max(at)}: beyond the {steps} steps trained (raise --steps)")
        return sorted({0, *at})
    return sorted({s for s in (0, 1, 10, 50, 100, steps) if s <= steps})


def results_document(
    task: Task,
    curves: list[LossCurves],
    tasks: int,
    seeds: list[int],
    steps: int,
    threshold: float,
    tuning,
    optimizer: InnerOptimizer,
    adaptation: Adaptation | None = None,
) -> dict[str, Any]:
    """The comparison as JSON: every loss's curve per seed, mean and std, and the paired differences at the end."""
    reference = curves[0]
    return {
        "task": task.name,
        "task_options": task.options.model_dump(mode="json"),
        "metric": task.metric,
        "tasks": tasks,
        "seeds": seeds,
        "steps": steps,
        "recorded_steps": list(range(steps + 1)),
        "threshold": threshold,
        "losses": [
            {
                "name": c.label,
                "source": c.source,
                "lr": c.lr,
                "adapts": c.adapts,
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
        "inner_optimizer": {"name": optimizer.name, **dataclasses.asdict(optimizer)},
        "online_adaptation": None
        if adaptation is None
        else adaptation.record() | {"validation": "the task loss on each task's training (support) data"},
    }


def print_results(console, task, curves: list[LossCurves], steps, seeds, tasks, threshold, document, at=None) -> None:
    """The comparison table (one row per shown step, one column per loss: mean ± std over seeds, so that it fits
    80 columns), the steps to reach the threshold, the paired differences and the tuning."""
    trained = document["inner_optimizer"]["name"]
    title = f"{task.name}: held-out {task.metric}, mean ± std over {seeds} seeds × {tasks} tasks"
    title = title if trained == "sgd" else f"{title}, trained with {trained}"
    online = document.get("online_adaptation")
    if online:
        title += (
            f"; learned losses adapt online every {online['every']} steps through {online['unroll']} "
            f"(Adam, lr {online['lr']:g}, on the training data)"
        )
    table = Table(title=title)
    table.add_column("")
    for c in curves:
        table.add_column(f"{c.label}\nlr {c.lr:g}" + ("\nadapting" if c.adapts else ""), justify="right")
    shown = table_steps(steps, at)
    for s in shown:
        cells = (f"{fmt(float(c.at(s).mean()))} ± {fmt_spread(float(c.at(s).std()))}" for c in curves)
        table.add_row(f"step {s}", *cells, end_section=s == shown[-1])
    cells = []
    for c in curves:
        reached = [n for n in c.steps_to(threshold) if n is not None]
        cells.append(
            f"{sorted(reached)[len(reached) // 2]} ({len(reached)}/{seeds})" if reached else f"never (0/{seeds})"
        )
    table.add_row(f"steps to ≤ {fmt(threshold)}", *cells)
    console.print(table)
    for pair in document["paired"]:
        low, high = pair["ci95"]
        interval = f"95% CI {fmt(low)} … {fmt(high)}" if pair["seeds"] > 1 else "no interval from one seed"
        console.print(
            f"{pair['other']} − {pair['reference']} at step {steps}: {fmt(pair['mean_difference'])} "
            f"({interval}); {pair['reference']} better on "
            f"{pair['reference_better_on']}/{pair['seeds']} seeds"
        )
    tuning = document["baseline_lr_tuning"]
    if tuning:
        console.print(
            f"baseline lr tuned on validation tasks of {tuning['on_task']}: best {tuning['best_lr']:g} of "
            + ", ".join(f"{lr:g}→{fmt(v)}" for lr, v in tuning["final_by_lr"].items())
        )


def curves_csv(curves: list[LossCurves]) -> str:
    """Every loss's metric per seed and step, one row each."""
    rows = [
        {"loss": c.label, "lr": c.lr, "seed_index": seed_index, "step": step, "metric": float(value)}
        for c in curves
        for seed_index, row in enumerate(c.per_seed)
        for step, value in enumerate(row)
    ]
    return files.csv_text(rows)
