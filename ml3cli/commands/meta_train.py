"""``ml3 meta-train RECIPE``: learn φ, meta-test it, write the artifact with its curves beside it.

Three ways to run, chosen from the options: one run in this process (:func:`run_meta_train`, with checkpoints,
SIGINT/SIGTERM handling and resume), one run over N local processes (``--nproc``: torchrun starts this command
again in each), or one run per seed in parallel processes with a table across seeds (``--seeds``, ``--jobs``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from ml3cli import artifacts, checkpoints, distributed, files, plots
from ml3cli.commands.options import MetaTrainOptions, to_argv
from ml3cli.commands.output import fmt, fmt_spread, progress_bar, warn_if_oversubscribed
from ml3cli.commands.parsing import parse_seeds
from ml3cli.engine import meta_train, optimizer_for
from ml3cli.errors import DivergenceError, ML3Error, RunInterrupted
from ml3cli.evaluate import NamedLoss, evaluate, step_size_ratio, tune_lr
from ml3cli.launchers import Finished, LocalLauncher, Run
from ml3cli.losses import baseline_name, builtin_loss
from ml3cli.recipes import Recipe, checkpoint_path_for, load_recipe, recipe_to_dict
from ml3cli.runtime import configure, resolve_device
from ml3cli.tasks import make_task
from ml3cli.tracking import TensorBoardLog


def run(recipe_path: Path, options: MetaTrainOptions, console: Console) -> None:
    """The command: load the recipe with the overrides, then run once, over ``--nproc`` processes or per seed."""
    recipe = load_recipe(recipe_path, options.recipe_overrides(), seed=options.seed)
    if options.tune_inner_lr:  # the tuned rate becomes two overrides, which every process and seed then shares
        rate = tuned_inner_lr(recipe, console)
        options = dataclasses.replace(
            options, tune_inner_lr=False, overrides=[*options.overrides, f"inner.lr={rate!r}", f"meta_test.lr={rate!r}"]
        )
        recipe = load_recipe(recipe_path, options.recipe_overrides(), seed=options.seed)

    def argv(**changes: Any) -> list[str]:
        """This command's own words with ``changes``, without --nproc/--seeds/--jobs, to start it elsewhere."""
        again = dataclasses.replace(options, **changes)
        return ["meta-train", str(recipe_path), *to_argv(again, skip=("nproc", "seeds", "jobs", "resume"))]

    if options.seeds is not None:
        if options.seed is not None or options.resume is not None or options.nproc is not None:
            raise ML3Error("--seeds runs whole meta-trainings: it cannot be combined with --seed, --resume or --nproc")
        run_seed_sweep(
            recipe, parse_seeds(options.seeds), options.jobs, options.out,
            lambda seed: argv(  # the launcher adds --out
                seed=seed, out=None, quiet=True, log_dir=options.log_dir / f"seed{seed}" if options.log_dir else None
            ), console,
        )  # fmt: skip
        return
    if options.nproc is not None and options.nproc > 1 and distributed.world_from_environment()[1] == 1:
        warn_if_oversubscribed(recipe.threads, options.nproc)
        resume = ["--resume", options.resume] if options.resume is not None else []
        code = distributed.launch(options.nproc, argv() + resume)
        if code:
            raise SystemExit(code)
        return
    try:
        run_meta_train(
            recipe, options.out, console, quiet=options.quiet, resume=options.resume, log_dir=options.log_dir
        )
    except RunInterrupted as err:
        if err.checkpoint:
            err.resume_command = shlex.join(["ml3", *argv(), "--resume", err.checkpoint])
        raise


def source_commit(root: Path | None = None) -> str | None:
    """The git commit of the ml3cli source that runs (``git rev-parse HEAD`` in ``root``, default the folder that
    holds the ml3cli package), with ``-dirty`` when tracked files differ from it; None when ``root`` is not the top
    of a git checkout (an installed package, also one inside another repository's tree) or git is missing."""
    root = (root or Path(__file__).resolve().parents[2]).resolve()

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:  # e.g. site-packages inside some other repository's tree
        return None
    head = git("rev-parse", "HEAD")
    if head is None:
        return None
    changes = git("status", "--porcelain", "--untracked-files=no")
    return head + ("-dirty" if changes else "")


def tuned_inner_lr(recipe: Recipe, console: Console) -> float:
    """The learning rate at which the meta-test family's baseline loss ends lowest, chosen on tasks of the
    ``validation`` random stream (never a meta-train or test task) at the recipe's meta-test sizes, on a grid
    around ``inner.lr`` widened until the choice is interior; trained with the recipe's inner optimizer."""
    configure(recipe.threads)
    test = recipe.meta_test
    task = make_task(test.task, test.task_options, resolve_device(recipe.device), where="meta_test.task_options")
    name = test.baseline or baseline_name(task)
    best, scores = tune_lr(
        task, builtin_loss(task, name, recipe.inner.lr), recipe.inner.lr, test.tasks, test.seeds, test.steps,
        optimizer=optimizer_for(recipe.inner),
    )  # fmt: skip
    tried = ", ".join(f"{lr:.3g} → {fmt(score)}" for lr, score in scores.items())
    console.print(
        f"tuned inner lr: {name} ends lowest at {best:.4g} on validation tasks of {task.name} after {test.steps} "
        f"steps ({tried}); meta-training and meta-testing at that rate"
    )
    return best


# -- one run ------------------------------------------------------------------------------------------------------
def run_meta_train(
    recipe: Recipe,
    out: str | Path | None,
    console: Console,
    quiet: bool = False,
    resume: str | Path | bool | None = None,
    log_dir: str | Path | None = None,
) -> Path:
    """Learn φ from ``recipe``, meta-test it, write the artifact with its curves beside it; return its path.

    ``log_dir``: also write the curves as TensorBoard event files there (:mod:`ml3cli.tracking`).

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
            tensorboard = None
            if log_dir is not None and (shard is None or shard.is_main):
                tensorboard = TensorBoardLog(log_dir)
                logs.callback(tensorboard.close)
            return _run_meta_train(recipe, out, console, quiet, resume, stop, device, shard, tensorboard)
    finally:
        distributed.leave()


def _run_meta_train(
    recipe: Recipe, out, console: Console, quiet: bool, resume, stop: _StopRequest, device, shard, tensorboard=None
) -> Path:
    main = shard is None or shard.is_main
    out_path = Path(out) if out else recipe.artifact_path
    if out_path.suffix != ".safetensors":
        raise ML3Error(f"--out {out_path}: an artifact path must end in .safetensors")
    if main:
        files.check_writable(out_path)
    with files.exclusive_output(out_path) if main else contextlib.nullcontext():
        if main:
            warn_if_replacing([out_path], resume)
        return _meta_train_into(recipe, out_path, console, quiet, resume, stop, device, shard, tensorboard)


def _meta_train_into(
    recipe: Recipe, out_path: Path, console: Console, quiet: bool, resume, stop: _StopRequest, device, shard,
    tensorboard=None,
) -> Path:  # fmt: skip
    main = shard is None or shard.is_main
    task = make_task(recipe.task, recipe.task_options, device)
    if shard is not None:
        shard.bounds(recipe.outer.tasks)  # refuse an uneven split before any work
        console.print(f"process {shard.rank} of {shard.world}: tasks {shard.bounds(recipe.outer.tasks)} of the batch")
    checkpoint = checkpoint_path_for(out_path)
    base_info = {"task": recipe.task, "test_task": recipe.meta_test.task, "seed": recipe.seed}
    base_info["commit"] = source_commit()
    base_info["recipe"] = recipe_to_dict(recipe)
    start = None
    if resume is not None and resume is not False:
        resume_path = checkpoint if resume is True or str(resume) == "" else Path(resume)
        if not resume_path.is_file():
            raise ML3Error(f"--resume: no checkpoint at {resume_path} (nothing to resume; run without --resume)")
        stop.resumed_from = str(resume_path)
        loaded = checkpoints.load_checkpoint(resume_path, checkpoints.batch_type_of(task), device)
        checkpoints.check_resumable(loaded, base_info["recipe"], recipe.outer.steps)
        checkpoints.validate_state(loaded, recipe, task)
        start = loaded.state
        if not quiet:
            console.print(f"resuming from {resume_path} at outer step {start.step} of {recipe.outer.steps}")
    elif checkpoint.is_file() and not quiet:
        console.print(f"note: starting afresh; {checkpoint} of an earlier run will be overwritten (--resume continues)")
    stop.checkpoint = str(checkpoint)

    with progress_bar(console, quiet) as progress:
        bar = progress.add_task(f"meta-train {recipe.name}", total=recipe.outer.steps)

        def on_step(step: int, record: dict[str, float] | None) -> None:
            if record is not None:
                progress.update(bar, description=f"meta-train {recipe.name}  task loss {record['meta/task_loss']:.4g}")
                if tensorboard is not None:
                    tensorboard.write(record)
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
    baseline = test.baseline or baseline_name(test_task)
    optimizer = optimizer_for(recipe.inner)  # the optimizees train the way meta-training's did
    with progress_bar(console, quiet) as progress:
        bar = progress.add_task(f"meta-test on {test.task}: seed", total=test.seeds)
        curves = evaluate(
            test_task, [learned, builtin_loss(test_task, baseline, recipe.meta_test_lr)], test.tasks, test.seeds,
            test.steps, recipe.seed, on_seed=lambda done: progress.update(bar, completed=done),
            record_at=(),  # only the final step is kept: measuring every step doubled a long meta-test
            optimizer=optimizer,
        )  # fmt: skip
        # how much of a win at one shared rate is a larger step: on the first meta-test seed's tasks
        ratio = step_size_ratio(test_task, learned, builtin_loss(test_task, baseline, recipe.meta_test_lr),
                                test.tasks, [recipe.seed], test.steps, optimizer=optimizer)  # fmt: skip
    metrics = {
        "meta_train": {k: v for k, v in result.final.items() if k != "step"} | {"outer_steps": recipe.outer.steps},
        "meta_train_seconds": round(result.seconds, 3),
        "environment_samples": task.environment_samples,
        "meta_test": {
            "task": test.task,
            "metric": test_task.metric,
            "steps": test.steps,
            "tasks": test.tasks,
            "seeds": test.seeds,
            "final": {c.label: float(c.at(test.steps).mean()) for c in curves},
            "final_per_seed": {c.label: [float(v) for v in c.at(test.steps)] for c in curves},
            "baseline": baseline,
            "step_size_ratio": dataclasses.asdict(ratio) | {"seed": recipe.seed},
            "environment_samples": test_task.environment_samples,  # its rollouts, not part of meta-training
        },
    }
    if task.provenance():
        metrics["task_data"] = task.provenance()
    artifacts.save_loss(out_path, result.metaloss, base_info | {"metrics": metrics})
    if not recipe.checkpoint_every:  # no end-of-run checkpoint: one left by an interrupt is spent now
        checkpoint.unlink(missing_ok=True)
    curves_path = out_path.with_suffix(".curves.csv")
    files.write_text_atomic(curves_path, files.csv_text(result.curves))
    files.write_bytes_atomic(
        out_path.with_suffix(".curves.png"), plots.meta_train_plot(result.curves, f"meta-train {recipe.name}")
    )

    final = metrics["meta_test"]["final"]
    console.print(
        f"[bold]meta-train {recipe.name}[/]: {recipe.outer.steps} outer steps in {result.seconds:.1f} s; "
        + summary_of_last_step(recipe, result.final)
    )
    console.print(
        f"meta-test on {test.task} ({test.tasks} tasks × {test.seeds} seeds, {test.steps} steps): "
        f"{test_task.metric} with the learned loss {fmt(final['learned'])} vs {baseline} {fmt(final[baseline])}"
    )
    console.print(f"wrote {out_path}  (curves: {curves_path})")
    return out_path


def summary_of_last_step(recipe: Recipe, final: dict[str, float]) -> str:
    """What the last logged outer step did: L_T where its unroll started and after its K inner steps, e.g.
    ``task loss at θ₀ 0.66 → after 10 inner steps 0.41 (outer step 500, mean over 8 tasks)``."""
    start = "θ₀" if recipe.inner.reset_period == recipe.inner.steps else "the unroll's first θ"
    steps = f"{recipe.inner.steps} inner step{'s' if recipe.inner.steps != 1 else ''}"
    return (
        f"task loss at {start} {fmt(final['meta/task_loss_before'])} → after {steps} {fmt(final['meta/task_loss'])} "
        f"(outer step {int(final.get('step', recipe.outer.steps))}, mean over {recipe.outer.tasks} tasks)"
    )


def warn_if_replacing(paths: Sequence[Path], resume: Any = None) -> None:
    """Before any work: say on stderr which existing artifacts this run will replace when it ends."""
    existing = [p for p in paths if p.is_file()]
    if not existing:
        return
    what = str(existing[0]) if len(existing) == 1 else f"{len(existing)} artifacts ({existing[0]}, …)"
    why = "the resumed run" if resume not in (None, False) else "this run"
    Console(stderr=True, highlight=False).print(
        f"[bold yellow]warning:[/] {what} exists and will be replaced when {why} ends (--out writes elsewhere)",
        soft_wrap=True,
    )


class _StopRequest:
    """SIGINT/SIGTERM during meta-training: the first one lets the current outer step finish and asks for a
    checkpoint (see ``on_state``); a second one, or one outside the outer loop, stops at once."""

    def __init__(self) -> None:
        self.checkpoint: str | None = None
        self.signum: int | None = None
        self.training = False
        self.kept_step: int | None = None
        #: the checkpoint a resumed run was read from: still there to resume from if a signal stops the run before
        #: it writes its own
        self.resumed_from: str | None = None

    def handle(self, signum: int, frame: Any) -> None:
        if self.training and self.signum is None:
            self.signum = signum
            return
        kept = next((p for p in (self.checkpoint, self.resumed_from) if p and Path(p).is_file()), None)
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


# -- several seeds ------------------------------------------------------------------------------------------------
def seed_artifact_path(base: Path, seed: int) -> Path:
    """``artifacts/sine.safetensors`` → ``artifacts/sine-seed3.safetensors``."""
    return base.with_name(f"{base.stem}-seed{seed}{base.suffix}")


def run_seed_sweep(
    recipe: Recipe,
    seeds: Sequence[int],
    jobs: int,
    out: str | Path | None,
    command_for: Callable[[int], list[str]],
    console: Console,
) -> list[Path]:
    """``ml3 meta-train RECIPE --seeds ... --jobs J``: one meta-training process per seed, J at a time
    (:class:`~ml3cli.launchers.LocalLauncher`), then a table across seeds. ``command_for(seed)`` gives the ``ml3``
    arguments of one seed's run, without ``--out``; each run's output goes to ``ARTIFACT.log``. Raises ML3Error
    naming the seeds that failed (after all have run)."""
    base = Path(out) if out else recipe.artifact_path
    if base.suffix != ".safetensors":
        raise ML3Error(f"--out {base}: an artifact path must end in .safetensors")
    paths = {seed: seed_artifact_path(base, seed) for seed in seeds}
    for path in paths.values():
        files.check_writable(path)
    warn_if_replacing(list(paths.values()))
    warn_if_oversubscribed(recipe.threads, jobs)
    console.print(f"meta-training {recipe.name} for seeds {list(seeds)}, {jobs} at a time (logs: ARTIFACT.log)")

    runs = {seed: Run(tuple(command_for(seed)), paths[seed]) for seed in seeds}
    seed_of = {run: seed for seed, run in runs.items()}

    def on_finished(done: Finished) -> None:
        console.print(
            f"seed {seed_of[done.run]}: {'done' if done.code == 0 else f'FAILED (exit {done.code})'} in "
            f"{done.seconds:.1f} s → {done.run.log}"
        )

    started = time.perf_counter()
    finished = LocalLauncher(jobs).run_all(list(runs.values()), on_finished)
    wall = time.perf_counter() - started
    results = [(seed_of[done.run], done.code, done.seconds) for done in finished]

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
    headers = {"meta_train_seconds": "meta-train\nseconds", "meta_task_loss": "meta-train\ntask loss"}
    for column in columns:
        table.add_column(headers.get(column, f"meta-test\n{column}"), justify="right")
    for row in done:
        table.add_row(str(row["seed"]), *(fmt(float(row[c])) for c in columns))
    if len(done) > 1:
        values = {c: np.array([float(row[c]) for row in done]) for c in columns}
        table.add_row("mean ± sd", *(f"{fmt(v.mean())} ± {fmt_spread(v.std(ddof=1))}" for v in values.values()))
    console.print(table)
    summary = base.with_name(f"{base.stem}-seeds.json")
    files.write_text_atomic(summary, json.dumps({"recipe": recipe.name, "wall_seconds": wall, "runs": rows}, indent=2))
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
