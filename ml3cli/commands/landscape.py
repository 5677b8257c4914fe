"""``ml3 landscape``: one of the three views of :mod:`ml3cli.landscape` for each loss, its figure of merit
printed, the figure, CSV and JSON written."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from ml3cli import artifacts, files, plots, shipped
from ml3cli.commands.options import LandscapeOptions
from ml3cli.commands.output import progress_bar
from ml3cli.commands.parsing import parse_fix
from ml3cli.commands.runs import check_out_dir, exclusive_outputs, new_run_dir, write_json, write_settings
from ml3cli.errors import ML3Error
from ml3cli.landscape import MODES, Landscape1D, function_view, landscape_1d, landscape_2d, pointwise_fn
from ml3cli.losses import (
    FALLBACK_LR,
    artifact_infos,
    baseline_name,
    builtin_loss,
    make_test_task,
    recorded_test_settings,
    resolve_losses,
)
from ml3cli.runtime import configure, resolve_device
from ml3cli.tasks import Task


def check(options: LandscapeOptions) -> None:
    """Refuse out-of-range options before any work."""
    if options.mode not in MODES:
        raise ML3Error(f"--mode {options.mode!r}: expected one of {', '.join(MODES)}")
    if options.points is not None and options.points < 3:
        raise ML3Error("--points must be at least 3")
    if options.tasks < 1:
        raise ML3Error("--tasks must be at least 1")
    if options.span <= 0:
        raise ML3Error("--span must be positive")


def default_loss(task_name: str | None, folder: Path = Path("artifacts")) -> tuple[str, str]:
    """The loss ``ml3 landscape`` plots without ``--loss``, and where it came from: the most recently written
    artifact in ``folder`` (for ``task_name``'s family when given), else a shipped loss (``sine`` first)."""
    candidates = [p for p in folder.glob("*.safetensors") if not p.name.endswith(".checkpoint.safetensors")]
    for path in sorted(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True):
        try:
            info = artifacts.read_info(path)
        except ML3Error:  # not a loss artifact (or a damaged one): not a candidate
            continue
        if task_name is None or task_name in (info.get("task"), info.get("test_task")):
            return str(path), f"the newest artifact in {folder}/"
    entries = shipped.read_index()
    for name in sorted(entries, key=lambda name: name != "sine"):
        if task_name is None or task_name in (entries[name]["task"], entries[name]["test_task"]):
            where = f"no artifact in {folder}/" if task_name is None else f"no artifact for {task_name} in {folder}/"
            return name, f"the shipped loss ({where})"
    raise ML3Error(
        f"give --loss: no artifact{f' for {task_name}' if task_name else ''} in {folder}/ and no shipped loss for it"
    )


def run(specs: Sequence[str], options: LandscapeOptions, console: Console) -> dict[str, Any]:
    """Compute the view for each loss (and the task's baseline when none is given), print, write PNG+CSV+JSON
    (to ``--out-dir``, else a new ``runs/landscape/TASK/TIMESTAMP/``) with the settings used.

    Without ``specs``: :func:`default_loss` against the task's hand-written loss, in the function view when the
    1-D view would need ``--param`` (an optimizee with more than one parameter)."""
    check(options)
    with exclusive_outputs(options.out_dir, options.json_path):
        return plot_landscape(specs, options, console)


def plot_landscape(specs: Sequence[str], options: LandscapeOptions, console: Console) -> dict[str, Any]:
    """What :func:`run` does once it holds the outputs."""
    check_out_dir(options.out_dir, OUTPUT_FILES, options.overwrite, options.json_path)
    chosen = None
    if not specs:
        spec, why = default_loss(options.task)
        specs, chosen = [spec], f"no --loss given: plotting {spec}, {why}"
    configure(options.threads, options.seed)
    device = resolve_device(options.device)
    infos = artifact_infos(specs, options.task)
    name = options.task
    if name is None:
        if not infos:
            raise ML3Error("give --task (no artifact among the --loss values to take it from)")
        name = infos[0]["test_task"] or infos[0]["task"]
        if name is None:  # an artifact saved from user code need not record a task
            raise ML3Error(f"{specs[0]} records no task to plot the loss on; give --task (`ml3 tasks` lists them)")
    task = make_test_task(name, recorded_test_settings(infos, name), options.task_options, device)

    resolved = resolve_losses(specs, task, options.lr, device)
    losses = [r.named for r in resolved]
    pointwise = {
        r.named.label: pointwise_fn(r.named, r.module, task.builtin_losses[r.builtin] if r.builtin else None)
        for r in resolved
    }
    baseline = baseline_name(task)
    if not any(r.builtin for r in resolved):
        losses.append(builtin_loss(task, baseline, options.lr or FALLBACK_LR))
        pointwise[baseline] = pointwise_fn(losses[-1], None, task.builtin_losses[baseline])
    if chosen is not None:
        chosen += f", against {baseline} on {task.name}"
        count = scalar_count(task)
        if options.mode == "1d" and options.param is None and count != 1:
            options = dataclasses.replace(options, mode="function")
            chosen += (
                f"; the function view, as the optimizee has {count:,} parameters (--mode 1d --param NAME:INDEX "
                "sweeps one)"
            )
        console.print(chosen, soft_wrap=True)

    function = options.mode == "function"
    low, high = options.value_range if options.value_range is not None else (None, None)
    low = low if low is not None else (-1.5 if function else -7.0)
    high = high if high is not None else (1.5 if function else 7.0)
    if not low < high:
        raise ML3Error(f"--range {low:g} {high:g}: expected LOW < HIGH")
    summary: dict[str, Any] = {
        "task": task.name,
        "task_options": task.options.model_dump(mode="json"),
        "mode": options.mode,
        "seed": options.seed,
        "losses": {loss.label: {"source": loss.source} for loss in losses},
    }

    if options.mode == "1d":
        points = options.points or 281
        with progress_bar(console, options.quiet) as progress:
            bar = progress.add_task(f"landscape {task.name}: task", total=options.tasks)
            on_task = lambda done: progress.update(bar, completed=done)  # noqa: E731
            view = landscape_1d(task, losses, options.tasks, options.seed, options.param, low, high, points, on_task)
        fractions = view.slope_fractions()
        summary.update(param=view.param, range=[low, high], points=points, targets=view.targets,
                       target_source=view.target_source)  # fmt: skip
        for label, per_task in fractions.items():
            summary["losses"][label].update(slope_toward_target=per_task, mean=float(np.mean(per_task)))
        png = plots.landscape_1d_plot(view.values, view.losses, view.targets, view.axis, fractions,
                                      f"{task.name}: loss against {view.axis}")  # fmt: skip
        csv_text = view.to_csv()
        print_1d(console, task, view, fractions)
    elif options.mode == "2d":
        points = options.points or 41
        center_loss = next((loss for loss in losses if loss.label == baseline), losses[-1])
        with progress_bar(console, options.quiet) as progress:
            bar = progress.add_task(f"landscape {task.name}: loss", total=len(losses))
            on_loss = lambda done: progress.update(bar, completed=done)  # noqa: E731
            view2 = landscape_2d(
                task, losses, options.seed, options.span, points, options.center_steps, center_loss, on_loss
            )
        fractions2 = view2.slope_fractions()
        summary.update(span=options.span, points=points, center=view2.center, target=list(view2.target),
                       target_source=view2.target_source)  # fmt: skip
        for label, value in fractions2.items():
            summary["losses"][label].update(slope_toward_target=value)
        png = plots.landscape_2d_plot(view2.alphas, view2.betas, view2.grids, view2.target, fractions2,
                                      f"{task.name}: filter-normalised plane around {view2.center}")  # fmt: skip
        csv_text = view2.to_csv()
        console.print(f"[bold]{task.name}[/]: plane around {view2.center}; target: {view2.target_source} "
                      f"at (α, β) = ({view2.target[0]:.3g}, {view2.target[1]:.3g})")  # fmt: skip
        for label, value in fractions2.items():
            console.print(f"  {label}: slope toward target on {value:.3f} of the grid")
    else:
        points = options.points or 101
        axes = function_axes(task, options.axes)
        view3 = function_view(task, pointwise, axes, low, high, points, parse_fix(options.fix))
        summary.update(axes=list(axes), range=[low, high], points=points, fixed=view3.fixed)
        png = plots.function_view_plot(view3.a_values, view3.b_values, view3.grids, view3.axes, view3.fixed,
                                       f"{task.name}: per-sample loss")  # fmt: skip
        csv_text = view3.to_csv()
        fixed_text = ", ".join(f"{k} = {v:g}" for k, v in view3.fixed.items()) or "nothing else"
        console.print(f"[bold]{task.name}[/]: per-sample loss over {axes[0]} × {axes[1]} in [{low:g}, {high:g}] "
                      f"with {fixed_text}")  # fmt: skip
    out = Path(options.out_dir) if options.out_dir else new_run_dir("landscape", task.name)
    paths = write_outputs(out, csv_text, png, summary)
    used = dataclasses.asdict(options) | {
        "losses": list(specs) + ([] if any(r.builtin for r in resolved) else [baseline]),
        "task": task.name,
        "task_options": task.options.model_dump(mode="json"),
        "task_option_overrides": list(options.task_options),
        "range": [low, high],
        "points": points,
        "lr": {loss.label: loss.lr for loss in losses},
        "out_dir": str(out),
        "device": str(device),
    }
    write_settings(out, "landscape", used)
    write_json(options.json_path, summary)
    console.print(f"wrote {', '.join(p.name for p in paths)} and settings.json to {out}")
    return summary


#: what ``landscape`` writes in its folder
OUTPUT_FILES = ("landscape.csv", "landscape.png", "landscape.json")


def scalar_count(task: Task) -> int:
    """How many numbers θ of the task's optimizee holds."""
    return sum(p.numel() for p in task.build_optimizee().parameters())


def function_axes(task: Task, axes_text: str | None) -> tuple[str, str]:
    """The two loss inputs of the function view: ``--axes A,B``, else (y_pred, y_true) or the first two."""
    names = [item.name for item in task.loss_inputs_spec]
    if axes_text is None:
        axes = ("y_pred", "y_true") if {"y_pred", "y_true"} <= set(names) else tuple(names[:2])
        if len(axes) < 2:
            raise ML3Error(f"{task.name!r} has a single loss input; there is no 2-D function view")
    else:
        axes = tuple(part.strip() for part in axes_text.split(","))
        if len(axes) != 2:
            raise ML3Error(f"--axes {axes_text!r}: expected two loss inputs, e.g. y_pred,y_true")
    return axes  # type: ignore[return-value]


def write_outputs(out_dir: Path, csv_text: str, png: bytes, summary: dict[str, Any]) -> list[Path]:
    """``landscape.csv``, ``landscape.png`` and ``landscape.json`` in ``out_dir``, each written atomically."""
    paths = [out_dir / "landscape.csv", out_dir / "landscape.png", out_dir / "landscape.json"]
    files.write_text_atomic(paths[0], csv_text)
    files.write_bytes_atomic(paths[1], png)
    files.write_text_atomic(paths[2], json.dumps(summary, indent=2, allow_nan=True) + "\n")
    return paths


def print_1d(console: Console, task: Task, view: Landscape1D, fractions: dict[str, list[float]]) -> None:
    """The 1-D figure of merit: per target, the share of the grid where the slope points toward it."""
    console.print(f"[bold]{task.name}[/]: share of the grid where the slope points toward the target "
                  f"({view.axis} ∈ [{view.values[0]:g}, {view.values[-1]:g}], target: {view.target_source})")  # fmt: skip
    table = Table()
    table.add_column("target", justify="right")  # one row per task, one column per loss: fits 80 columns
    for label in fractions:
        table.add_column(label, justify="right")
    for k, target in enumerate(view.targets):
        cells = (f"{per_task[k]:.3f}" for per_task in fractions.values())
        table.add_row(f"{target:.3g}", *cells, end_section=k == len(view.targets) - 1)
    table.add_row("mean", *(f"{float(np.mean(per_task)):.3f}" for per_task in fractions.values()))
    console.print(table)
