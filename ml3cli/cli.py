"""The ``ml3`` command line: parses flags and calls :mod:`ml3cli.workflows`. User errors exit with code 2."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ml3cli.errors import ML3Error, RunInterrupted

app = typer.Typer(
    name="ml3",
    help="Meta-learn loss functions (ML³) and train new models with them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Seed = Annotated[int | None, typer.Option("--seed", help="the one seed that controls everything")]
Device = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or auto")]
Threads = Annotated[int | None, typer.Option("--threads", help="torch intra-op threads (default 1)")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="also write the table's numbers as JSON here")]
OutDir = Annotated[Path | None, typer.Option("--out-dir", help="folder for curves.csv, curves.png, results.json")]
Tasks = Annotated[int | None, typer.Option("--tasks", min=1, help="test tasks per seed (default 10)")]
Seeds = Annotated[int | None, typer.Option("--seeds", min=1, help="seeds (default 5)")]
Steps = Annotated[int | None, typer.Option("--steps", min=1, help="SGD steps per optimizee (default 100)")]
Lr = Annotated[float | None, typer.Option("--lr", min=0.0, help="SGD learning rate (default: the recipe's)")]
Threshold = Annotated[
    float | None,
    typer.Option("--threshold", help="report steps to reach this metric (default: half the initial)"),
]
At = Annotated[
    str | None,
    typer.Option("--at", help="steps shown in the tables, e.g. 10,100,500,1000 (default 0,1,10,50,100 and the last)"),
]
TuneLr = Annotated[
    bool,
    typer.Option("--tune-baseline-lr", help="add the baseline at its best lr, chosen on the meta-train task"),
]
TestTaskOptions = Annotated[
    list[str] | None,
    typer.Option(
        "--task-option",
        help="KEY=VALUE override of the test task's options (default: those the artifact was meta-tested with), "
        "e.g. architecture=mlp; repeatable",
    ),
]


def _console() -> Console:
    return Console(highlight=False)


@app.command("meta-train")
def meta_train_command(
    recipe: Annotated[Path, typer.Argument(help="a YAML recipe, e.g. recipes/sine.yaml")],
    out: Annotated[Path | None, typer.Option("--out", help="artifact path (default from the recipe)")] = None,
    seed: Seed = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="override a recipe field: --set outer.lr=3e-4 (repeatable)"),
    ] = None,
    device: Device = None,
    threads: Threads = None,
    quiet: Quiet = False,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            metavar="[CHECKPOINT]",
            help="continue an interrupted run from its checkpoint (default: ARTIFACT.checkpoint.safetensors next "
            "to the artifact) with the same recipe, --set and --seed; the final artifact is bit-identical to an "
            "uninterrupted run. Give RECIPE first: `ml3 meta-train RECIPE --resume [CHECKPOINT]`",
        ),
    ] = None,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc",
            min=1,
            help="meta-train in N local processes (torchrun; each takes an equal share of outer.tasks). "
            "For several machines run torchrun yourself: `torchrun ... -m ml3cli meta-train RECIPE`",
        ),
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            "--seeds",
            help="meta-train one artifact per seed, e.g. 0-4 or 0,3,7 (ARTIFACT-seedS.safetensors), then print a "
            "table across seeds",
        ),
    ] = None,
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="with --seeds: seeds run in parallel processes")] = 1,
) -> None:
    """Learn a loss from RECIPE and save it as a safetensors artifact.

    A checkpoint of the full training state is written every `checkpoint_every` outer steps (recipe field) and at
    the end. Ctrl-C (SIGINT) or SIGTERM finishes the current outer step, writes a checkpoint, prints the command
    that resumes and exits with 130 / 143.
    """
    from ml3cli import distributed
    from ml3cli.recipes import load_recipe
    from ml3cli.workflows import run_meta_train, run_seed_sweep

    extra = list(overrides or [])
    if device is not None:
        extra.append(f"device={device}")
    if threads is not None:
        extra.append(f"threads={threads}")
    loaded = load_recipe(recipe, extra, seed=seed)

    def words(seed: int | None = seed, out: Path | None = out, quiet: bool = quiet) -> list[str]:
        """This command's own flags (without --nproc/--seeds/--jobs), to start it again elsewhere."""
        args = ["meta-train", str(recipe)]
        args += ["--out", str(out)] if out is not None else []
        args += ["--seed", str(seed)] if seed is not None else []
        for item in overrides or []:
            args += ["--set", item]
        args += ["--device", device] if device is not None else []
        args += ["--threads", str(threads)] if threads is not None else []
        args += ["--quiet"] if quiet else []
        return args

    if seeds is not None:
        if seed is not None or resume is not None or nproc is not None:
            raise ML3Error("--seeds runs whole meta-trainings: it cannot be combined with --seed, --resume or --nproc")
        run_seed_sweep(loaded, parse_seeds(seeds), jobs, out, lambda s, path: words(s, path, True), _console())
        return
    if nproc is not None and nproc > 1 and distributed.world_from_environment()[1] == 1:
        args = words() + (["--resume", resume] if resume is not None else [])
        code = distributed.launch(nproc, args)
        if code:
            raise typer.Exit(code)
        return
    try:
        run_meta_train(loaded, out, _console(), quiet=quiet, resume=resume)
    except RunInterrupted as err:
        if err.checkpoint:
            err.resume_command = shlex.join(["ml3", *words(), "--resume", err.checkpoint])
        raise


def parse_steps(spec: str | None) -> tuple[int, ...] | None:
    """``10,100,500`` → (10, 100, 500) for ``--at``; None stays None."""
    if spec is None:
        return None
    try:
        steps = tuple(int(part) for part in spec.split(","))
    except ValueError:
        raise ML3Error(f"--at {spec!r}: expected comma-separated step numbers like 10,100,500") from None
    if not steps or min(steps) < 0:
        raise ML3Error(f"--at {spec!r}: expected non-negative step numbers like 10,100,500")
    return steps


def parse_seeds(spec: str) -> list[int]:
    """``0-4`` → [0, 1, 2, 3, 4]; ``0,3,7`` → [0, 3, 7]; ranges and lists combine: ``0-2,9``."""
    found: list[int] = []
    try:
        for item in spec.split(","):
            low, sep, high = item.strip().partition("-")
            first, last = int(low), int(high) if sep else int(low)
            if last < first or first < 0:
                raise ValueError
            found += [s for s in range(first, last + 1) if s not in found]
    except ValueError:
        raise ML3Error(f"--seeds {spec!r}: expected non-negative seeds like 0-4 or 0,3,7") from None
    if len(found) > 1000:
        raise ML3Error(f"--seeds {spec!r}: {len(found)} seeds is more than the 1,000 allowed at once")
    return found


@app.command("meta-test")
def meta_test_command(
    loss: Annotated[Path, typer.Option("--loss", help="a learned-loss artifact")],
    task: Annotated[str, typer.Option("--task", help="the task family to test on (see `ml3 tasks`)")],
    baseline: Annotated[str | None, typer.Option("--baseline", help="hand-written loss to compare with")] = None,
    tasks: Tasks = None,
    seeds: Seeds = None,
    steps: Steps = None,
    lr: Lr = None,
    seed: Seed = None,
    threshold: Threshold = None,
    at: At = None,
    tune_baseline_lr: TuneLr = False,
    task_options: TestTaskOptions = None,
    json_path: JsonOut = None,
    out_dir: OutDir = None,
    device: Device = None,
    threads: Threads = None,
    quiet: Quiet = False,
) -> None:
    """Train fresh optimizees on TASK with the learned loss only, next to the task's hand-written baseline."""
    from ml3cli.tasks import task_class
    from ml3cli.workflows import EvalSettings, run_comparison

    base = baseline or next(iter(task_class(task).builtin_losses))
    settings = EvalSettings(
        tasks, seeds, steps, lr, seed or 0, threshold, device or "cpu", 1 if threads is None else threads,
        parse_steps(at), tuple(task_options or ()),
    )  # fmt: skip
    run_comparison(
        task, [str(loss), base], settings, _console(), command="meta-test", json_path=json_path,
        out_dir=out_dir, tune_baseline_lr=tune_baseline_lr, quiet=quiet,
    )  # fmt: skip


@app.command("compare")
def compare_command(
    task: Annotated[str, typer.Option("--task", help="the task family (see `ml3 tasks`)")],
    losses: Annotated[
        list[str], typer.Option("--loss", help="artifact path or built-in name (mse, mse@0.01 …); repeatable")
    ],
    tasks: Tasks = None,
    seeds: Seeds = None,
    steps: Steps = None,
    lr: Lr = None,
    seed: Seed = None,
    threshold: Threshold = None,
    at: At = None,
    tune_baseline_lr: TuneLr = False,
    task_options: TestTaskOptions = None,
    json_path: JsonOut = None,
    out_dir: OutDir = None,
    device: Device = None,
    threads: Threads = None,
    quiet: Quiet = False,
) -> None:
    """Compare any number of losses on one task family: same seeds, same initialisations, paired statistics."""
    from ml3cli.workflows import EvalSettings, run_comparison

    settings = EvalSettings(
        tasks, seeds, steps, lr, seed or 0, threshold, device or "cpu", 1 if threads is None else threads,
        parse_steps(at), tuple(task_options or ()),
    )  # fmt: skip
    run_comparison(
        task, losses, settings, _console(), command="compare", json_path=json_path, out_dir=out_dir,
        tune_baseline_lr=tune_baseline_lr, quiet=quiet,
    )  # fmt: skip


@app.command("landscape")
def landscape_command(
    losses: Annotated[list[str], typer.Option("--loss", help="artifact path or built-in name (mse …); repeatable")],
    task: Annotated[str | None, typer.Option("--task", help="task family (default: the artifact's)")] = None,
    mode: Annotated[str, typer.Option("--mode", help="1d (one parameter), 2d (random plane) or function")] = "1d",
    param: Annotated[str | None, typer.Option("--param", help="1d: parameter NAME or NAME:INDEX")] = None,
    value_range: Annotated[
        tuple[float, float] | None,
        typer.Option("--range", help="1d: parameter values (default -7 7); function: input values (-1.5 1.5)"),
    ] = None,
    points: Annotated[int | None, typer.Option("--points", help="grid points per axis")] = None,
    tasks: Annotated[int, typer.Option("--tasks", help="1d: tasks (targets) to draw, one panel each")] = 4,
    span: Annotated[float, typer.Option("--span", help="2d: α, β ∈ [−span, span]")] = 1.0,
    center_steps: Annotated[
        int, typer.Option("--center-steps", min=0, help="2d: centre on θ after N SGD steps with the baseline")
    ] = 0,
    lr: Lr = None,
    axes: Annotated[str | None, typer.Option("--axes", help="function: two inputs, e.g. y_pred,y_true")] = None,
    fix: Annotated[
        list[str] | None, typer.Option("--fix", help="function: NAME=VALUE for another input (repeatable)")
    ] = None,
    task_options: Annotated[
        list[str] | None, typer.Option("--task-option", help="KEY=VALUE task option override (repeatable)")
    ] = None,
    seed: Seed = None,
    json_path: JsonOut = None,
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="folder for landscape.png, .csv, .json")] = None,
    device: Device = None,
    threads: Threads = None,
) -> None:
    """Plot loss landscapes (1-D sweep, 2-D filter-normalised plane, or the loss as a function of its inputs)."""
    from ml3cli.landscape import LandscapeSettings, run_landscape

    low, high = value_range if value_range is not None else (None, None)
    settings = LandscapeSettings(
        mode, task, tuple(task_options or ()), param, low, high, points, tasks, seed or 0, lr, span,
        center_steps, axes, tuple(fix or ()), device or "cpu", 1 if threads is None else threads,
    )  # fmt: skip
    run_landscape(losses, settings, _console(), out_dir=out_dir, json_path=json_path)


@app.command("inspect")
def inspect_command(
    artifact: Annotated[Path, typer.Argument(help="a learned-loss artifact")],
    as_json: Annotated[bool, typer.Option("--json", help="print the metadata as JSON")] = False,
) -> None:
    """Show what an artifact is: task, inputs, architecture, recipe, metrics."""
    from ml3cli.workflows import inspect_artifact

    inspect_artifact(artifact, _console(), as_json)


@app.command("tasks")
def tasks_command() -> None:
    """List the registered task families and their loss inputs."""
    from ml3cli.workflows import list_tasks

    list_tasks(_console())


def _bare_resume(args: list[str]) -> list[str]:
    """``--resume`` without a value (last, or before another option) means the default checkpoint: ``--resume=``."""
    return [
        "--resume=" if arg == "--resume" and (i + 1 == len(args) or args[i + 1].startswith("-")) else arg
        for i, arg in enumerate(args)
    ]


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    try:
        app(args=_bare_resume(sys.argv[1:]))
    except RunInterrupted as err:
        console = Console(stderr=True, highlight=False)
        console.print(f"[bold yellow]{escape(str(err))}[/]", soft_wrap=True)
        if err.resume_command:
            console.print(f"resume with: {escape(err.resume_command)}", soft_wrap=True)
        sys.exit(err.exit_code)
    except ML3Error as err:
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
