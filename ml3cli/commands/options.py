"""The options of the ``ml3`` commands, each group defined once as a frozen dataclass.

A field's default is THE default of that option (the CLI shows it, the command receives it); its metadata holds
the flag names and the help text that :mod:`ml3cli.cli` turns into Typer options. Commands receive one instance
per group, built by keyword, so reordering or adding a field cannot shift another's value. Torch-free, so that
``ml3 --help`` answers at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def option(default: Any, *flags: str, help: str, **click: Any) -> Any:
    """A dataclass field that is also a command-line option: ``flags`` (the first is the canonical one), ``help``,
    and further Typer settings (``min=1``, ``metavar=...``)."""
    return dataclasses.field(default=default, metadata={"flags": flags, "help": help, "click": click})


class OptionGroup:
    """Base of the option groups: repeated options arrive as lists and are kept as tuples (hashable, frozen)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))


def flags_of(group: type, name: str) -> tuple[str, ...]:
    """The flag names of field ``name`` of an option group."""
    return next(f.metadata["flags"] for f in dataclasses.fields(group) if f.name == name)


def to_argv(options: Any, skip: Sequence[str] = ()) -> list[str]:
    """The command-line words that give ``options`` (fields at their default are left out), in field order: the
    inverse of parsing, so that a command can start itself again in another process with the same settings."""
    words: list[str] = []
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.name in skip or value == f.default:
            continue
        flag = f.metadata["flags"][0]
        if isinstance(value, bool):
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                words += [flag, str(item)]
        else:
            words += [flag, str(value)]
    return words


# -- options shared by the commands that compute ----------------------------------------------------------------
# One meaning per flag in every command: --seed one seed, --seeds a list or range of seeds (0-4, 0,3,7),
# --num-seeds a count; --out a file, --out-dir a folder; --json PATH writes JSON to PATH, --json - to stdout.
SEED_HELP = "the one seed that controls everything"
SEEDS_SPEC = "a list or range, e.g. 0-4 or 0,3,7"
DEVICE_HELP = "cpu, cuda, cuda:N or auto"
THREADS_HELP = "torch intra-op threads"
#: the bounds of --seed and --threads (the recipe schema's; torch's seeds are 64-bit)
MAX_SEED, MAX_THREADS = 2**63 - 1, 1024
QUIET_HELP = "no progress bar"
JSON_HELP = "also write the numbers as JSON to PATH (`--json -`: to stdout, the table then goes to stderr)"
OUT_DIR_HELP = "folder for {files} and settings.json (default: a new runs/{command}/TASK/TIMESTAMP/)"
OVERWRITE_HELP = "replace the results an earlier run left in --out-dir or at --json (refused otherwise)"


@dataclass(frozen=True)
class MetaTrainOptions(OptionGroup):
    """``ml3 meta-train RECIPE``: where to write, what to override, how to run."""

    out: Path | None = option(
        None, "--out", help="artifact path (default from the recipe); one already there is replaced, with a warning"
    )
    seed: int | None = option(None, "--seed", min=0, max=MAX_SEED, help=SEED_HELP + " (default: the recipe's)")
    overrides: list[str] = option((), "--set", help="override a recipe field: --set outer.lr=3e-4 (repeatable)")
    device: str | None = option(None, "--device", help=DEVICE_HELP + " (default: the recipe's)")
    threads: int | None = option(
        None, "--threads", min=0, max=MAX_THREADS, help=THREADS_HELP + " (default: the recipe's)"
    )
    quiet: bool = option(False, "--quiet", "-q", help=QUIET_HELP)
    tune_inner_lr: bool = option(
        False,
        "--tune-inner-lr",
        help="first tune the baseline loss's learning rate on validation tasks of the meta-test family, then "
        "meta-train and meta-test at that rate (inner.lr and meta_test.lr): a learned loss that wins there wins "
        "by more than a larger step",
    )
    resume: str | None = option(
        None,
        "--resume",
        metavar="[CHECKPOINT]",
        help="continue an interrupted run from its checkpoint (default: ARTIFACT.checkpoint.safetensors next to the "
        "artifact) with the same recipe, --set and --seed; the final artifact is bit-identical to an uninterrupted "
        "run. Give RECIPE first: `ml3 meta-train RECIPE --resume [CHECKPOINT]`",
    )
    nproc: int | None = option(
        None,
        "--nproc",
        min=1,
        help="meta-train in N local processes (torchrun; each takes an equal share of outer.tasks). For several "
        "machines run torchrun yourself: `torchrun ... -m ml3cli meta-train RECIPE`",
    )
    seeds: str | None = option(
        None,
        "--seeds",
        help=f"meta-train one artifact per seed, {SEEDS_SPEC} (ARTIFACT-seedS.safetensors), then print a table "
        "across seeds",
    )
    jobs: int = option(1, "--jobs", min=1, help="with --seeds: seeds run in parallel processes")
    log_dir: Path | None = option(
        None,
        "--log-dir",
        help="also write the curves as TensorBoard event files here (same names as the CSV; needs the "
        "\\[tensorboard] extra); with --seeds, one subfolder per seed",
    )

    def recipe_overrides(self) -> list[str]:
        """The ``--set`` overrides with ``--device`` and ``--threads`` added as recipe fields."""
        extra = list(self.overrides)
        extra += [f"device={self.device}"] if self.device is not None else []
        extra += [f"threads={self.threads}"] if self.threads is not None else []
        return extra


@dataclass(frozen=True)
class EvalOptions(OptionGroup):
    """``ml3 meta-test`` and ``ml3 compare``: the meta-test protocol and where its results go. Unset counts come
    from what the artifact recorded for the task (see :mod:`ml3cli.losses`), else the defaults named here."""

    tasks: int | None = option(None, "--tasks", min=1, help="test tasks per seed (default: the artifact's, else 10)")
    seeds: str | None = option(
        None,
        "--seeds",
        help=f"the evaluation seeds, {SEEDS_SPEC}; each draws its own test tasks and θ₀ "
        "(default: --num-seeds seeds from --seed)",
    )
    num_seeds: int | None = option(
        None, "--num-seeds", min=1, help="how many evaluation seeds, from --seed on (default: the artifact's, else 5)"
    )
    seed: int | None = option(None, "--seed", min=0, max=MAX_SEED, help="the first evaluation seed (default 0)")
    steps: int | None = option(None, "--steps", min=1, help="steps per optimizee (default: the artifact's, else 100)")
    lr: float | None = option(None, "--lr", min=0.0, help="learning rate of the steps (default: the recipe's)")
    optimizer: str | None = option(
        None,
        "--optimizer",
        metavar="sgd|momentum|adam",
        help="how every optimizee trains: sgd, momentum (heavy ball) or adam, at --lr; momentum's β and Adam's "
        "betas and eps are the artifact's (default: the artifact's recorded inner.optimizer, else sgd)",
    )
    threshold: float | None = option(
        None, "--threshold", help="report steps to reach this metric (default: half the initial)"
    )
    at: str | None = option(
        None, "--at", help="steps shown in the tables, e.g. 10,100,500,1000 (default 0,1,10,50,100 and the last)"
    )
    tune_baseline_lr: bool = option(
        False,
        "--tune-baseline-lr",
        help="add the baseline at its best lr, chosen on validation tasks of the test family (never the test tasks)",
    )
    task_options: list[str] = option(
        (),
        "--task-option",
        help="KEY=VALUE override of the test task's options (default: those the artifact was meta-tested with), "
        "e.g. architecture=mlp; repeatable",
    )
    adapt: bool = option(
        False,
        "--adapt",
        help="online loss adaptation: every learned loss keeps learning while its optimizees train, by the "
        "meta-gradient of the task loss on the tasks' training (support) data, never the test points; "
        "hand-written losses stay fixed",
    )
    adapt_every: int | None = option(
        None, "--adapt-every", min=1, help="with --adapt: optimizee steps between updates of φ (default 1)"
    )
    adapt_lr: float | None = option(
        None, "--adapt-lr", min=0.0, help="with --adapt: Adam's learning rate on φ (default 1e-3; 0: φ stays fixed)"
    )
    adapt_unroll: int | None = option(
        None,
        "--adapt-unroll",
        min=1,
        help="with --adapt: inner steps the meta-gradient flows back through, at most --adapt-every (default 1)",
    )
    json_path: Path | None = option(None, "--json", metavar="PATH", help=JSON_HELP)
    out_dir: Path | None = option(
        None, "--out-dir", help=OUT_DIR_HELP.format(files="results.json, curves.csv, curves.png", command="COMMAND")
    )
    overwrite: bool = option(False, "--overwrite", help=OVERWRITE_HELP)
    device: str = option("cpu", "--device", help=DEVICE_HELP)
    threads: int = option(1, "--threads", min=0, max=MAX_THREADS, help=THREADS_HELP)
    quiet: bool = option(False, "--quiet", "-q", help=QUIET_HELP)

    #: used where the option is unset and the artifact recorded nothing
    DEFAULT_TASKS = 10
    DEFAULT_SEEDS = 5
    DEFAULT_STEPS = 100


@dataclass(frozen=True)
class LandscapeOptions(OptionGroup):
    """``ml3 landscape``: which view of which task, on what grid, and where the figure goes."""

    task: str | None = option(None, "--task", help="task family (default: the artifact's)")
    mode: str = option("1d", "--mode", help="1d (one parameter), 2d (random plane) or function")
    param: str | None = option(None, "--param", help="1d: parameter NAME or NAME:INDEX")
    value_range: tuple[float, float] | None = option(
        None, "--range", help="1d: parameter values (default -7 7); function: input values (-1.5 1.5)"
    )
    points: int | None = option(None, "--points", help="grid points per axis")
    tasks: int = option(4, "--tasks", help="1d: tasks (targets) to draw, one panel each")
    span: float = option(1.0, "--span", help="2d: α, β ∈ [−span, span]")
    center_steps: int = option(0, "--center-steps", min=0, help="2d: centre on θ after N SGD steps with the baseline")
    lr: float | None = option(None, "--lr", min=0.0, help="SGD learning rate (default: the recipe's)")
    axes: str | None = option(None, "--axes", help="function: two inputs, e.g. y_pred,y_true")
    fix: list[str] = option((), "--fix", help="function: NAME=VALUE for another input (repeatable)")
    task_options: list[str] = option((), "--task-option", help="KEY=VALUE task option override (repeatable)")
    seed: int = option(0, "--seed", min=0, max=MAX_SEED, help=SEED_HELP)
    json_path: Path | None = option(None, "--json", metavar="PATH", help=JSON_HELP)
    out_dir: Path | None = option(
        None, "--out-dir", help=OUT_DIR_HELP.format(files="landscape.png, .csv, .json", command="landscape")
    )
    overwrite: bool = option(False, "--overwrite", help=OVERWRITE_HELP)
    device: str = option("cpu", "--device", help=DEVICE_HELP)
    threads: int = option(1, "--threads", min=0, max=MAX_THREADS, help=THREADS_HELP)
    quiet: bool = option(False, "--quiet", "-q", help=QUIET_HELP)


@dataclass(frozen=True)
class ReproduceOptions(OptionGroup):
    """``ml3 reproduce``: which mode, how many meta-train seeds, how many processes, where the results go."""

    list: bool = option(False, "--list", help="list the experiments (paper section, recipes, measured time) and exit")
    quick: bool = option(False, "--quick", help="tiny settings: a smoke run of the whole protocol in minutes")
    meta_seeds: int | None = option(
        None, "--meta-seeds", min=1, help="meta-train seeds 0 … N−1 (default: the experiment's, 2 with --quick)"
    )
    jobs: int = option(
        1, "--jobs", min=1, help="meta-trainings run in parallel processes (with --launcher ray and no --address: "
        "the CPUs of the local Ray cluster)"
    )  # fmt: skip
    launcher: str = option(
        "local",
        "--launcher",
        help="where the meta-trainings run: local (processes on this machine) or ray (a Ray cluster; needs the "
        "\\[ray] extra)",
    )
    address: str | None = option(
        None, "--address", help="with --launcher ray: the cluster to use (auto, or ray://HOST:PORT); default: a "
        "cluster started on this machine"
    )  # fmt: skip
    threads: int = option(
        1, "--threads", min=1, max=MAX_THREADS, help=THREADS_HELP + " of the comparison (meta-training: the recipe's)"
    )
    out_dir: Path | None = option(
        None, "--out-dir", help="results folder (default results/NAME, or runs/reproduce/NAME-quick with --quick)"
    )
