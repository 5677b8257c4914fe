"""Environment steps per second of the model-free rollouts: gymnasium's step loop against the batched one.

What is measured
    One *rollout* is :meth:`ml3cli.rl.EnvPool.rollout` as the recipes call it: ``tasks`` goals × ``episodes``
    episodes of ``horizon`` steps of the task's Gaussian policy (θ₀ of the recipe's policy), one batched policy
    call per time step, every environment stepped once per time step; env-steps/s = tasks × episodes × horizon
    ÷ the rollout's time (resets included). Three ways of running the same rollout:

    * ``gymnasium`` – the loop before the batched stepping: each environment through its gymnasium ``step``
      (control check, ``mj_rnePostConstraint``, observation, reward and distance per environment) and the
      policy through ``vmap(functional_call)``;
    * ``batched``   – the tasks' rollout on one thread: :class:`ml3cli.envs.mujoco_batch.MujocoBatch` steps the
      environments' own MuJoCo data with one ``mj_step`` each and computes observations, rewards and distances
      with numpy over all of them; the policy through :func:`ml3cli.rl.stacked_policy`;
    * ``threads``   – the same with the environments stepped on ``--threads`` threads (default: one per usable
      core), as the ant task does with ``task_options.sim_threads`` (the reacher is never threaded: its step is
      shorter than a thread hand-off, see ``ReacherGoalMFBatch``).

    Beside them, ``mj_step only``: the same resets and the same MuJoCo calls (the controls of one recorded
    rollout) with nothing else, on one thread: the most any one-thread loop could reach with these physics.

Correctness first
    Before anything is timed, the three rollouts are compared for the same seeds: every tensor (observations,
    actions, rewards, distances) must be equal, bit for bit; the script stops otherwise.

Timing
    Per environment: warm-up rollouts, then ``--repeats`` rounds; each round times one sample of every variant
    back to back, the order alternating between rounds, so that the load of a shared machine hits all alike.
    A sample is the mean over enough rollouts to last at least ``--min-time`` seconds. Reported: the median
    env-steps/s, and the speed-up ``batched ÷ gymnasium`` (and ``threads ÷ gymnasium``) as the median of the
    per-round paired ratios, with their interquartile range. Absolute numbers move with the machine's load; the
    ratios much less.

Results
    ``--out PATH`` (``results/benchmarks/rollout.json`` for the committed one) gets the settings, the source
    commit, the versions (ml3, Python, torch, numpy, MuJoCo, gymnasium), the cores and the load, every sample and
    the summary, and the total wall time; ``ml3 report`` makes docs/speed.md's rollout table from it.

Usage (from the repository root)
    python benchmarks/rollout.py                   # ant and model-free reacher, recipe-sized rollouts
    python benchmarks/rollout.py --quick           # fewer, shorter rounds
    python benchmarks/rollout.py --envs ant_goal --threads 4
    python benchmarks/rollout.py --out results/benchmarks/rollout.json && ml3 report   # the doc's table
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path

import mujoco
import torch
from rich.console import Console
from rich.table import Table
from torch.func import vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ml3cli import files  # noqa: E402
from ml3cli.commands.meta_train import source_commit  # noqa: E402
from ml3cli.commands.runs import versions  # noqa: E402
from ml3cli.rl import EnvPool, Rollout, stacked_policy  # noqa: E402
from ml3cli.runtime import generator  # noqa: E402
from ml3cli.tasks import make_task  # noqa: E402

#: the rollouts of the recipes: one inner or task-loss rollout of recipes/mfrl_ant.yaml and mfrl_reacher.yaml
SETTINGS = {
    "ant_goal": {"tasks": 2, "episodes": 4, "options": {"hidden": [64, 64], "init_log_std": -0.5, "horizon": 200}},
    "reacher_goal_mf": {"tasks": 4, "episodes": 4, "options": {"hidden": [64, 64], "init_log_std": -0.5}},
}
VARIANTS = ("gymnasium", "batched", "threads")
FLOOR = "mj_step only"

console = Console()
if not console.is_terminal:  # piped or redirected: rich would fall back to 80 columns and wrap the table
    console = Console(width=140)


def rollout_calls(name: str, threads: int, seed: int) -> tuple[dict[str, Callable[[], object]], int, bool]:
    """One zero-argument rollout per variant (each draws from its own generator seeded alike), the number of
    environment steps one rollout takes, and whether the threaded variant uses threads (the environment's batch
    class is threaded; otherwise it times the batched loop a second time, a measure of the noise)."""
    setting = SETTINGS[name]
    task = make_task(name, setting["options"])
    gen = generator(seed)
    goals, theta = task.sample_goals(setting["tasks"], gen), task.init_theta(setting["tasks"], gen)
    episodes, horizon = setting["episodes"], task.options.horizon
    vmapped = vmap(task.policy)
    policies = {
        "gymnasium": lambda obs: vmapped(theta, obs),
        "batched": stacked_policy(task.optimizee, theta),
        "threads": stacked_policy(task.optimizee, theta),
    }
    pools = {
        "gymnasium": EnvPool(task.spec, batched=False),
        "batched": EnvPool(task.spec, threads=1),
        "threads": EnvPool(task.spec, threads=threads),
    }
    calls = {
        variant: (
            lambda pool=pools[variant], policy=policies[variant]: pool.rollout(
                policy, goals, episodes, horizon, generator(seed + 1)
            )
        )
        for variant in VARIANTS
    }
    calls[FLOOR] = mj_step_only(pools["batched"], calls["batched"](), seed)
    return calls, setting["tasks"] * episodes * horizon, pools["threads"].threaded


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the platform tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def mj_step_only(pool: EnvPool, recorded: Rollout, seed: int) -> Callable[[], None]:
    """The MuJoCo work of ``recorded`` alone: reset the pool's environments, then ``mj_step`` each with the
    rollout's (clipped) actions, one environment after the other, nothing read back."""
    count = recorded.action.shape[0] * recorded.action.shape[1]
    envs = [env.unwrapped for env in pool.envs[:count]]
    space = envs[0].action_space
    controls = recorded.action.reshape(count, recorded.action.shape[2], -1).double().numpy().clip(space.low, space.high)
    controls = list(controls.transpose(1, 0, 2))  # T arrays [count, act_dim]
    goals = [env.goal for env in envs]

    def call() -> None:
        for j, env in enumerate(envs):
            env.reset(seed=seed + j, options={"goal": goals[j]})
        sims = [(env.model, env.data, env.frame_skip) for env in envs]
        for step in controls:
            for (model, data, frame_skip), control in zip(sims, step, strict=True):
                data.ctrl[:] = control
                mujoco.mj_step(model, data, nstep=frame_skip)

    return call


def check_equal(calls: dict[str, Callable[[], object]]) -> None:
    """Every variant's rollout equals gymnasium's, bit for bit (raises otherwise)."""
    reference = calls["gymnasium"]()
    for variant in VARIANTS[1:]:
        got = calls[variant]()
        for field in reference._fields:
            if not torch.equal(getattr(got, field), getattr(reference, field)):
                raise SystemExit(f"{variant} and gymnasium rollouts differ in {field}: not timing them")


def time_calls(fn: Callable[[], object], number: int) -> float:
    """Mean seconds per call over ``number`` back-to-back calls, with the garbage collector off."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - start) / number
    finally:
        gc.enable()


@dataclass
class Result:
    env: str
    env_steps: int  # per rollout
    threads: int
    threaded: bool  # False: the "threads" variant is the batched loop again (the environment is not threaded)
    seconds: dict[str, list[float]]  # per variant: seconds per rollout, one sample per round

    def steps_per_second(self, variant: str) -> float:
        return self.env_steps / statistics.median(self.seconds[variant])

    def ratios(self, variant: str) -> list[float]:
        """Per-round paired speed-ups: gymnasium's time ÷ the variant's (= its env-steps/s ÷ gymnasium's)."""
        return [g / v for g, v in zip(self.seconds["gymnasium"], self.seconds[variant], strict=True)]


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def benchmark(name: str, args: argparse.Namespace) -> Result:
    calls, env_steps, threaded = rollout_calls(name, args.threads, args.seed)
    check_equal(calls)
    number = {}
    for variant, call in calls.items():
        estimate = min(time_calls(call, 1) for _ in range(args.warmup))
        number[variant] = max(1, round(args.min_time / max(estimate, 1e-6)))
    timed = (*VARIANTS, FLOOR)
    samples: dict[str, list[float]] = {variant: [] for variant in timed}
    for round_ in range(args.repeats):
        for variant in timed if round_ % 2 == 0 else reversed(timed):
            samples[variant].append(time_calls(calls[variant], number[variant]))
    return Result(name, env_steps, args.threads, threaded, samples)


def summary(result: Result) -> dict[str, object]:
    document: dict[str, object] = {
        "env_steps_per_rollout": result.env_steps,
        "threaded": result.threaded,
        "env_steps_per_second": {variant: result.steps_per_second(variant) for variant in (*VARIANTS, FLOOR)},
    }
    for variant in VARIANTS[1:]:
        ratios = result.ratios(variant)
        document[f"speedup_{variant}"] = {"median": statistics.median(ratios), "iqr": quartiles(ratios)}
    return document


def render(results: list[Result]) -> Table:
    table = Table(title="model-free rollouts: env-steps/s (same trajectories, checked)", title_justify="left")
    headers = ("env", "env-steps / rollout", *(f"{v} steps/s" for v in (*VARIANTS, FLOOR)), "batched ×", "threads ×")
    for header in headers:
        table.add_column(header, justify="right")
    for r in results:
        name = r.env if r.threaded else f"{r.env} (not threaded)"
        row = [name, f"{r.env_steps:,}", *(f"{r.steps_per_second(v):,.0f}" for v in (*VARIANTS, FLOOR))]
        for variant in VARIANTS[1:]:
            ratios = r.ratios(variant)
            low, high = quartiles(ratios)
            row.append(f"{statistics.median(ratios):.2f}× ({low:.2f}–{high:.2f})")
        table.add_row(*row)
    return table


def library_versions() -> dict[str, str]:
    found = versions()
    for name in ("mujoco", "gymnasium"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--envs", default="ant_goal,reacher_goal_mf", help="comma-separated (default: both)")
    parser.add_argument("--threads", type=int, default=usable_cores(), help="threads of the threaded variant")
    parser.add_argument("--quick", action="store_true", help="fewer and shorter rounds (a smoke test)")
    parser.add_argument("--repeats", type=int, help="timed rounds per environment (default: 11, quick: 3)")
    parser.add_argument("--min-time", type=float, help="seconds per sample, at least (default: 1, quick: 0.2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rollouts per variant (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of θ₀, the goals and the rollouts (default: 0)")
    parser.add_argument("--out", type=Path, help="write the results JSON here (results/benchmarks/rollout.json)")
    args = parser.parse_args(argv)
    args.envs = [name.strip() for name in args.envs.split(",") if name.strip()]
    unknown = [name for name in args.envs if name not in SETTINGS]
    if unknown:
        parser.error(f"--envs: unknown {unknown}, choose from {sorted(SETTINGS)}")
    if args.repeats is None:
        args.repeats = 3 if args.quick else 11
    if args.min_time is None:
        args.min_time = 0.2 if args.quick else 1.0
    if args.repeats < 1 or args.warmup < 1 or args.threads < 1:
        parser.error("--repeats, --warmup and --threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    commit = source_commit()  # before the timing: a checkout edited meanwhile must not be recorded as measured
    torch.set_num_threads(1)  # as the recipes (threads: 1); the policy is tiny
    load_before = os.getloadavg()
    console.print(
        f"torch {torch.__version__} · mujoco {metadata.version('mujoco')} · gymnasium {metadata.version('gymnasium')}"
        f" · {usable_cores()} usable cores, threaded variant on {args.threads} · load {load_before[0]:.1f} · "
        f"{args.repeats} rounds ≥ {args.min_time:g} s"
    )
    results = []
    for name in args.envs:
        with console.status(f"{name}: checking the rollouts, then timing …"):
            t0 = time.perf_counter()
            results.append(benchmark(name, args))
        console.print(
            f"[dim]{name}: rollouts equal bit for bit; checked and timed in {time.perf_counter() - t0:.1f} s[/]"
        )
    console.print(render(results))
    console.print(
        "× = variant env-steps/s ÷ gymnasium env-steps/s (median of per-round paired ratios, IQR in brackets); "
        "gymnasium: per-env step() and vmap policy; batched: MujocoBatch + stacked_policy, 1 thread; threads: "
        "the same on the threaded variant's threads (the ant only); mj_step only: the same MuJoCo calls and "
        "resets alone, one thread."
    )
    wall = time.perf_counter() - started
    if args.out is None:
        console.print(f"total wall time: {wall:.1f} s (--out PATH keeps the results)")
        return
    document = {
        "benchmark": "rollout",
        "command": " ".join(["python", "benchmarks/rollout.py", *(argv if argv is not None else sys.argv[1:])]),
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": commit,
        "versions": library_versions(),
        "cpus": usable_cores(),
        "machine": platform.machine(),
        "load_before": load_before[0],
        "load_after": os.getloadavg()[0],
        "rounds": args.repeats,
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"rollouts": SETTINGS},
        "results": {r.env: summary(r) | {"samples": asdict(r)} for r in results},
        "wall_seconds": wall,
    }
    files.write_json_atomic(args.out, document)
    console.print(f"wrote {args.out} · total wall time: {wall:.1f} s")


if __name__ == "__main__":
    main()
