"""``ml3 reproduce NAME``: one paper experiment end to end: meta-train every meta-train seed (reusing artifacts
whose recipe and seed match), run its fair comparison, judge it, and write ``results.json`` and ``figure.png``.

Full runs write to ``results/NAME/`` (committed; ``ml3 report`` turns them into docs/results.md), ``--quick`` runs
to ``runs/reproduce/NAME-quick/``; artifacts go to ``artifacts/reproduce/NAME[-quick]/`` (not committed).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ml3cli import files, plots
from ml3cli.commands.options import ReproduceOptions
from ml3cli.commands.output import fmt, warn_if_oversubscribed
from ml3cli.errors import ML3Error
from ml3cli.experiments import REPRODUCIBLE, experiment
from ml3cli.experiments.protocol import (
    Context,
    Experiment,
    MetaTrainJob,
    meta_train_all,
    overall_verdict,
    provenance,
    source_of,
    validate_results,
)
from ml3cli.launchers import launcher_for
from ml3cli.runtime import configure

#: where full results live, one folder per experiment
RESULTS = Path("results")


def run(names: list[str], options: ReproduceOptions, console: Console) -> list[dict[str, Any]]:
    """``ml3 reproduce``: list the experiments, or run the named ones (``all``: every one, in the paper's order)."""
    if options.list:
        list_experiments(console)
        return []
    if not names:
        raise ML3Error("name an experiment (or all); `ml3 reproduce --list` shows them")
    chosen = list(REPRODUCIBLE) if names == ["all"] else names
    unknown = [name for name in chosen if name not in REPRODUCIBLE]
    if unknown:
        raise ML3Error(f"unknown experiment {unknown[0]!r}; known: {', '.join(REPRODUCIBLE)} (or all)")
    if options.out_dir is not None and len(chosen) > 1:
        raise ML3Error("--out-dir names one experiment's folder: give one experiment with it")
    launcher_for(options.launcher, options.jobs, options.address)  # refuse a bad --launcher before any work
    return [reproduce(experiment(name), options, console) for name in chosen]


def reproduce(exp: Experiment, options: ReproduceOptions, console: Console) -> dict[str, Any]:
    """Run one experiment and write its results; returns the results document."""
    configure(options.threads)  # small models: one thread is many times faster than two on a 2-core machine
    tag = f"{exp.name}-quick" if options.quick else exp.name
    out = options.out_dir or (Path("runs") / "reproduce" / tag if options.quick else RESULTS / exp.name)
    with files.exclusive_output(out.resolve(), "--out-dir"):  # two runs of one experiment would mix their results
        return run_experiment(exp, options, console, tag, out)


def run_experiment(exp: Experiment, options: ReproduceOptions, console: Console, tag: str, out: Path) -> dict[str, Any]:
    """What :func:`reproduce` does once it holds the results folder ``out``."""
    count = options.meta_seeds or (min(2, exp.meta_seeds) if options.quick else exp.meta_seeds)
    seeds = list(range(count))
    overrides = {recipe: exp.quick_overrides(recipe) if options.quick else [] for recipe in exp.recipes}
    plan = [
        MetaTrainJob(recipe, seed, tuple(overrides[recipe]), Path("artifacts") / "reproduce" / tag / f"{recipe}-seed{seed}.safetensors")
        for recipe in exp.recipes
        for seed in seeds
    ]  # fmt: skip
    console.print(
        f"[bold]{exp.name}[/] ({source_of(exp.paper)}): {len(plan)} meta-training(s) of {', '.join(exp.recipes)} "
        f"for seeds {seeds}, {options.jobs} at a time{' (quick)' if options.quick else ''}"
    )
    if options.address is None:  # every recipe of an experiment runs on one thread, here
        warn_if_oversubscribed(1, options.jobs)
    started = time.perf_counter()
    records = meta_train_all(plan, launcher_for(options.launcher, options.jobs, options.address), console.print)
    trained = time.perf_counter()
    if all(record["reused"] for record in records):
        console.print("no meta-training needed: every artifact was reused")
    paths = {recipe: {job.seed: job.artifact for job in plan if job.recipe == recipe} for recipe in exp.recipes}
    work_dir = Path("artifacts") / "reproduce" / tag / "baselines"
    context = Context(exp, options.quick, seeds, overrides, paths, say=console.print, work_dir=work_dir)
    comparisons = exp.run(context)
    finished = time.perf_counter()

    document = {
        "experiment": exp.name,
        "paper": exp.paper,
        "claim": exp.claim,
        "quick": options.quick,
        "command": f"ml3 reproduce {exp.name}" + (" --quick" if options.quick else "") + f" --meta-seeds {count}",
        "verdict": overall_verdict(comparisons),
        "comparisons": comparisons,
        "meta_train": records,
        "wall_seconds": {
            "meta_train": round(trained - started, 2),
            "compare": round(finished - trained, 2),
            "total": round(finished - started, 2),
            "meta_train_seconds_sum": round(sum(r["meta_train_seconds"] or 0.0 for r in records), 2),
        },
        "jobs": options.jobs,
        "launcher": options.launcher if options.address is None else f"{options.launcher} at {options.address}",
        "environment_samples": {  # simulator steps; supervised experiments simulate nothing
            "meta_train": sum(record["environment_samples"] for record in records),
            "meta_test": context.meta_test_samples,
        },
        "provenance": provenance(),
    }
    files.write_json_atomic(out / "results.json", validate_results(document, str(out / "results.json")))
    figures = {"figure.png": plots.comparison_figure(comparisons, f"{exp.name} ({source_of(exp.paper)})")}
    figures.update(context.figures)
    for name, png in figures.items():
        files.write_bytes_atomic(out / name, png)
    print_summary(console, document)
    console.print(f"wrote {out / 'results.json'}, " + ", ".join(str(out / name) for name in figures))
    return document


def print_summary(console: Console, document: dict[str, Any]) -> None:
    """Per comparison: final metric of each loss at the fixed and the tuned rates, the paired differences, verdict."""
    for c in document["comparisons"]:
        table = Table(title=f"{c['label']}: {c['metric']} after {c['steps']} steps", title_justify="left")
        for column in ("loss", "lr", "mean", "± sd", "learned − baseline", "95% CI"):
            table.add_column(column, justify="left" if column == "loss" else "right")
        for kind in ("fixed", "tuned"):
            summary = summarize(c, kind)
            paired = c["same_lr" if kind == "fixed" else "tuned"]
            table.add_row(f"{c['baseline']} @ {kind}", summary["baseline_lr"], fmt(summary["baseline"]), "", "", "")
            table.add_row(
                f"learned @ {kind}", summary["learned_lr"], fmt(summary["learned"]), fmt(summary["learned_sd"]),
                fmt(paired["mean"]), f"{fmt(paired['low'])} … {fmt(paired['high'])}",
            )  # fmt: skip
        console.print(table)
        control = (
            " (a control: not part of the claim, left out of the experiment's verdict)" if c.get("control") else ""
        )
        console.print(f"verdict: [bold]{c['verdict']['verdict']}[/]: {c['verdict']['why']}{control}")
    console.print(
        f"[bold]{document['experiment']}: {document['verdict']}[/] ({document['wall_seconds']['total']:.0f} s)"
    )


def summarize(comparison: dict[str, Any], kind: str) -> dict[str, Any]:
    """Means of the final metric at the ``fixed`` or ``tuned`` rates: the baseline over test seeds, the learned
    losses over meta-train seeds (each the mean over test seeds) with their standard deviation."""
    import numpy as np

    learned = np.array(comparison["final"][f"learned_{kind}"]).mean(axis=1)
    lr = comparison["lr"]
    learned_lrs = sorted(set(lr["learned_tuned"].values())) if kind == "tuned" else [lr["fixed"]]
    # a baseline per meta-train seed (one learned with it) has a tuned rate per seed
    base_lr = lr["baseline_tuned"] if kind == "tuned" else lr["fixed"]
    base_lrs = sorted(set(base_lr.values())) if isinstance(base_lr, dict) else [base_lr]
    return {
        "baseline": float(np.mean(comparison["final"][f"baseline_{kind}"])),
        "baseline_lr": "/".join(f"{v:.3g}" for v in base_lrs),
        "learned": float(learned.mean()),
        "learned_sd": float(learned.std(ddof=1)) if learned.size > 1 else float("nan"),
        "learned_lr": "/".join(f"{v:.3g}" for v in learned_lrs),
    }


def list_experiments(console: Console) -> None:
    """Every experiment: paper section, recipes, meta-train seeds and the measured wall time of its last runs."""
    table = Table(title="ml3 reproduce: the paper's experiments", title_justify="left")
    for column in ("name", "paper", "recipes", "seeds", "full", "--quick"):
        table.add_column(column, no_wrap=column == "name")  # the name is what to type: never broken
    for name in REPRODUCIBLE:
        exp = experiment(name)
        table.add_row(
            name,
            exp.paper,
            ", ".join(exp.recipes),
            str(exp.meta_seeds),
            measured(RESULTS / name) if (RESULTS / name / "results.json").is_file() else exp.cost or "—",
            measured(Path("runs") / "reproduce" / f"{name}-quick"),
        )
    console.print(table)


def measured(folder: Path) -> str:
    """The wall time recorded by the run in ``folder`` (meta-training as if nothing was reused), or "—"."""
    path = folder / "results.json"
    if not path.is_file():
        return "—"
    document = json.loads(path.read_text())
    seconds = document["wall_seconds"]  # meta-training as if no artifact had been reused
    total = seconds["compare"] + max(seconds["meta_train"], seconds["meta_train_seconds_sum"] / document["jobs"])
    return f"{total / 60:.1f} min" if total >= 60 else f"{total:.0f} s"
