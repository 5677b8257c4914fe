"""The ``ml3`` command line: parses flags into the option groups of :mod:`ml3cli.commands.options` and calls the
command's module in :mod:`ml3cli.commands`. User errors exit with code 2.

Nothing heavy is imported here: each command imports its module (and with it torch) only when it runs, so that
``ml3 --help`` answers at once.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import os
import signal
import sys
import threading
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from ml3cli.commands.options import EvalOptions, LandscapeOptions, MetaTrainOptions, ReproduceOptions
from ml3cli.errors import ML3Error, RunInterrupted

app = typer.Typer(
    name="ml3",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _load(name: str) -> types.ModuleType:
    """The command module ``ml3cli.commands.NAME``, imported while Ctrl-C ends the process at once (exit 130).

    The commands import torch, whose native code runs Python's signal handlers from inside pybind11: a
    KeyboardInterrupt raised there cannot unwind and aborts the process (SIGABRT, "terminate called after throwing
    an instance of 'pybind11::error_already_set'"). Once the module is loaded, Ctrl-C is a KeyboardInterrupt again.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return importlib.import_module(f"ml3cli.commands.{name}")
    previous = signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    try:
        return importlib.import_module(f"ml3cli.commands.{name}")
    finally:
        signal.signal(signal.SIGINT, previous)


def _version(value: bool) -> None:
    if value:
        from importlib import metadata

        import ml3cli

        try:
            torch = f"torch {metadata.version('torch')}"
        except metadata.PackageNotFoundError:
            torch = "torch not installed"
        typer.echo(f"ml3 {ml3cli.__version__} ({torch}, Python {sys.version.split()[0]})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version of ml3 and exit."),
    ] = False,
) -> None:
    """Meta-learn loss functions (ML³) and train new models with them.

    Flags mean the same in every command: --seed one seed, --seeds a list or range of seeds (0-4 or 0,3,7), --num-seeds a count of seeds.

    --out is a file, --out-dir a folder; --json PATH writes JSON to PATH, --json - to standard output.

    Results are never replaced silently: without --out-dir each run gets a new runs/COMMAND/TASK/TIMESTAMP/ folder with settings.json beside the results; an --out-dir that holds results needs --overwrite.
    """


def with_options(**groups: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the options of each option group: the group's fields become Typer options (flags, help and
    defaults from the one definition in :mod:`ml3cli.commands.options`), and the command receives one instance per
    group, built by keyword, under the parameter name given here."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items() if name not in groups]
        added = []
        for group in groups.values():
            hints = typing.get_type_hints(group)
            for field in dataclasses.fields(group):
                meta = field.metadata
                flag = typer.Option(*meta["flags"], help=meta["help"], **meta["click"])
                default = list(field.default) if isinstance(field.default, tuple) else field.default
                added.append(
                    inspect.Parameter(
                        field.name,
                        inspect.Parameter.KEYWORD_ONLY,
                        default=default,
                        annotation=Annotated[hints[field.name], flag],
                    )
                )

        @functools.wraps(command)
        def parsed(**values: Any) -> Any:
            for name, group in groups.items():
                values[name] = group(**{f.name: values.pop(f.name) for f in dataclasses.fields(group)})
            return command(**values)

        parsed.__signature__ = inspect.Signature(own + added)  # type: ignore[attr-defined]
        return parsed

    return decorate


def _console(json_path: Path | None = None) -> Console:
    """The console for a command's human output: stdout, or stderr when ``--json -`` keeps stdout for the JSON."""
    return Console(highlight=False, stderr=json_path is not None and str(json_path) == "-")


@app.command("meta-train")
@with_options(options=MetaTrainOptions)
def meta_train_command(
    recipe: Annotated[
        Path, typer.Argument(help="a packaged recipe's name (see `ml3 recipes`), e.g. sine, or a YAML recipe file")
    ],
    options: MetaTrainOptions,
) -> None:
    """Learn a loss from RECIPE and save it as a safetensors artifact.

    A checkpoint of the full training state is written every `checkpoint_every` outer steps (recipe field) and at
    the end. Ctrl-C (SIGINT) or SIGTERM finishes the current outer step, writes a checkpoint, prints the command
    that resumes and exits with 130 / 143.
    """
    meta_train = _load("meta_train")

    meta_train.run(recipe, options, _console())


@app.command("meta-test")
@with_options(options=EvalOptions)
def meta_test_command(
    loss: Annotated[
        str,
        typer.Option("--loss", help="a learned-loss artifact, a shipped loss (sine; see `ml3 losses`) or a built-in"),
    ],
    task: Annotated[str, typer.Option("--task", help="the task family to test on (see `ml3 tasks`)")],
    options: EvalOptions,
    baseline: Annotated[str | None, typer.Option("--baseline", help="hand-written loss to compare with")] = None,
) -> None:
    """Train fresh optimizees on TASK with the learned loss only, next to the task's hand-written baseline."""
    compare = _load("compare")

    compare.meta_test(loss, task, baseline, options, _console(options.json_path))


@app.command("compare")
@with_options(options=EvalOptions)
def compare_command(
    task: Annotated[str, typer.Option("--task", help="the task family (see `ml3 tasks`)")],
    losses: Annotated[
        list[str],
        typer.Option(
            "--loss", help="artifact path, shipped loss (sine) or built-in name (mse, mse@0.01 …); repeatable"
        ),
    ],
    options: EvalOptions,
) -> None:
    """Compare any number of losses on one task family: same seeds, same initialisations, paired statistics."""
    compare = _load("compare")

    compare.run(task, losses, options, _console(options.json_path))


@app.command("landscape")
@with_options(options=LandscapeOptions)
def landscape_command(
    options: LandscapeOptions,
    losses: Annotated[
        list[str] | None,
        typer.Option(
            "--loss",
            help="artifact path, shipped loss (sine) or built-in name (mse …); repeatable (default: the newest "
            "artifact in artifacts/, else the shipped sine loss, against its task's hand-written loss)",
        ),
    ] = None,
) -> None:
    """Plot loss landscapes (1-D sweep, 2-D filter-normalised plane, or the loss as a function of its inputs)."""
    landscape = _load("landscape")

    landscape.run(losses or [], options, _console(options.json_path))


@app.command("inspect")
def inspect_command(
    artifact: Annotated[Path, typer.Argument(help="a learned-loss artifact, or a shipped loss's name (sine)")],
    json_path: Annotated[
        Path | None,
        typer.Option(
            "--json", metavar="PATH", help="write the metadata as JSON to PATH (`--json -` or a bare --json: stdout)"
        ),
    ] = None,
) -> None:
    """Show what an artifact is: task, inputs, architecture, recipe, metrics."""
    inspect_artifact = _load("inspect")

    inspect_artifact.run(artifact, _console(json_path), json_path)


@app.command("tasks")
def tasks_command() -> None:
    """List the registered task families and their loss inputs."""
    tasks = _load("tasks")

    tasks.run(_console())


@app.command("reproduce")
@with_options(options=ReproduceOptions)
def reproduce_command(
    names: Annotated[list[str] | None, typer.Argument(help="experiment name(s), or all")] = None,
    *,
    options: ReproduceOptions,
) -> None:
    """Reproduce a paper experiment end to end: meta-train every seed, compare tuned against tuned, judge, plot."""
    reproduce = _load("reproduce")

    reproduce.run(list(names or []), options, _console())


@app.command("report")
def report_command(
    check: Annotated[bool, typer.Option("--check", help="only check that the committed pages are current")] = False,
) -> None:
    """Regenerate docs/results.md (and the README's status table) from results/*/results.json."""
    report = _load("report")

    report.run(_console(), check=check)


@app.command("recipes")
def recipes_command() -> None:
    """List the recipes shipped with ml3: `ml3 meta-train NAME` runs one from any folder."""
    recipes = _load("recipes")

    recipes.run(_console())


@app.command("losses")
def losses_command(
    build: Annotated[
        str | None,
        typer.Option(
            "--build",
            metavar="NAME",
            help="maintainers: meta-train the shipped loss NAME again from its recorded recipe and seed (a new NAME: "
            "the packaged recipe NAME at its defaults), copy it into the package and record it in the index",
        ),
    ] = None,
    source: Annotated[
        Path | None,
        typer.Option(
            "--from",
            metavar="ARTIFACT",
            help="with --build: ship this artifact instead of meta-training again (e.g. seed 0 of `ml3 reproduce`); "
            "refused unless it was meta-trained by exactly the recipe and seed --build would use",
        ),
    ] = None,
) -> None:
    """List the learned losses shipped with ml3: any --loss and load_loss() take their names (e.g. sine)."""
    losses = _load("losses")

    if source is not None and build is None:
        raise typer.BadParameter("--from needs --build NAME", param_hint="--from")
    if build is not None:
        losses.build(build, _console(), source=source)
    else:
        losses.run(_console())


#: options whose value may be left out, and the value they then take
OPTIONAL_VALUES = {"--resume": "", "--json": "-"}


def _bare_options(args: list[str]) -> list[str]:
    """``--resume`` without a value (last, or before another option) means the default checkpoint, ``--resume=``;
    a bare ``--json`` means standard output, ``--json=-``.

    Typer's parser has no options with an optional value, so the bare flag is spelled out before parsing."""

    def bare(i: int) -> bool:
        return i + 1 == len(args) or (args[i + 1].startswith("-") and args[i + 1] != "-")

    return [
        f"{arg}={OPTIONAL_VALUES[arg]}" if arg in OPTIONAL_VALUES and bare(i) else arg for i, arg in enumerate(args)
    ]


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    try:
        app(args=_bare_options(sys.argv[1:]))
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
    except (MemoryError, RuntimeError) as err:
        # sizes within every bound can still multiply beyond this machine's memory: a user error, not a bug
        if not isinstance(err, MemoryError) and not any(m in str(err) for m in OUT_OF_MEMORY):
            raise
        Console(stderr=True, highlight=False).print(
            "[bold red]error:[/] out of memory: the run's sizes (tasks, points, widths, seeds) need more memory "
            "than this machine has; make them smaller",
            soft_wrap=True,
        )
        sys.exit(2)


#: how torch's allocators say that an allocation failed
OUT_OF_MEMORY = ("not enough memory", "DefaultCPUAllocator: can't allocate", "CUDA out of memory", "out of memory")


if __name__ == "__main__":
    main()
