"""Meta-steps per second: the ml3 engine against `higher` and a plain PyTorch autograd loop.

What is measured
    One *meta-step* is one evaluation of ∇_φ L_T(φ) for a batch of ``n`` sine tasks (the expensive part of an
    outer step of algorithm 1; the Adam update of φ is not timed):

        θ_{k+1} = θ_k − α ∇_θ mean_points M_φ(f_θk(x_support), y_support)      k = 0 … K−1, per task
        L_T(φ)  = mean_tasks MSE(f_θK(x_query), y_query)
        ∇_φ L_T                                                                (second order through all K steps)

    on the networks of the public reference implementation (``recipes/sine_reference.yaml``): optimizee
    1→100→10→1 ReLU, meta-loss M_φ 2→50→50→1 ReLU without biases and a Softplus output, 100 support and 100
    query points per task, α = 1e-3, float32 on the CPU.

    * ``engine``   – :func:`ml3cli.engine.meta_gradient`: θ as a dict of tensors with a leading task axis, the
      tasks' forward passes in one ``vmap``, each inner step's gradients for all tasks from one
      ``torch.autograd.grad(create_graph=True)`` of the summed losses, one reverse pass w.r.t. φ through it all.
    * ``autograd`` – the same math written the way one would without ``torch.func``: φ as leaf tensors, a Python
      loop over the tasks, each inner step with ``torch.autograd.grad(..., create_graph=True)``, one backward
      per task into φ, summed (the forward passes are written out with ``torch.nn.functional``, so this is
      also an independent re-implementation that the engine is checked against).

    The engine is timed as ``ml3 meta-train`` calls it on the outer steps that are not logged
    (``diagnostics=False``): the gradient and θ_K, without the two extra forward passes that logged steps add.

Correctness first
    For every configuration the two meta-gradients are compared before anything is timed: in float64, where
    they must agree to rounding (asserted with rtol=1e-7), and in float32 on the very inputs that are timed
    (asserted with a loose tolerance; the max abs difference is printed). A benchmark of two implementations
    that disagree would be meaningless, so the script stops on a mismatch.

Timing
    Per configuration: warm-up calls, then ``--repeats`` rounds. Each round times one sample of each
    implementation back to back, alternating which goes first, so that machine noise (other processes, CPU
    frequency) hits both alike; a sample is the mean over enough calls to last at least ``--min-time`` seconds.
    The garbage collector is off inside the timed calls. The table reports the median time per meta-step and
    its inverse, meta-steps per second.

Reading the ratio
    ``speed-up = engine meta-steps/s ÷ autograd meta-steps/s`` (= autograd time ÷ engine time), computed per
    round from the paired samples and summarised by its median, with the interquartile range of the rounds in
    brackets. Above 1: the engine is faster; below 1: the plain loop is faster. Expect the engine to win more as
    the number of tasks grows (``vmap`` batches the tasks into one set of larger kernels, the loop pays Python
    and dispatch overhead per task), and to be level at a single task, where the engine skips ``vmap`` and
    runs the same autograd calls as the loop. An IQR that straddles 1 means "no measurable difference here".

Memory
    ``peak MiB`` is the growth of the process's peak resident set size during one meta-step (after warm-up),
    measured per configuration by releasing free heap memory (glibc ``malloc_trim``), resetting the kernel's
    high-water mark (writing 5 to ``/proc/self/clear_refs``, Linux ≥ 4.0), running one call and reading
    ``VmHWM`` − ``VmRSS`` before. It counts everything the step touches (tensors, the autograd graph, allocator
    slack), with a resolution of a few hundred KiB; values under ~1 MiB are noise. Where this is not available
    (not Linux/glibc, or ``clear_refs`` not writable) the columns are left out. ``resource.getrusage`` is not
    used: its maximum cannot be reset, so it is not per configuration.

Usage (from the repository root)
    python benchmarks/meta_step.py                      # tasks 1,8,64,256 × K 1,5,20, one thread
    python benchmarks/meta_step.py --quick              # fewer, shorter rounds: a smoke test
    python benchmarks/meta_step.py --tasks 8,64 --steps 5 --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ml3cli.engine import Phi, meta_gradient, task_objective  # noqa: E402
from ml3cli.metaloss import MetaLoss  # noqa: E402
from ml3cli.recipes import InnerConfig, TaskLossConfig  # noqa: E402
from ml3cli.runtime import generator, keep_freed_memory  # noqa: E402
from ml3cli.tasks import make_task  # noqa: E402
from ml3cli.tasks.base import Task, Theta  # noqa: E402
from ml3cli.tasks.sine import SineBatch  # noqa: E402

# The reference sine setting (recipes/sine_reference.yaml).
OPTIMIZEE_HIDDEN = [100, 10]
METALOSS_HIDDEN = (50, 50)
INNER_LR = 1e-3

console = Console()
if not console.is_terminal:  # piped or redirected: rich would fall back to 80 columns and wrap the table
    console = Console(width=140)


# -- the problem ----------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """Everything one meta-step needs, for one (tasks, K) configuration."""

    task: Task
    metaloss: MetaLoss
    phi: Phi
    theta: Theta  # θ₀, leading task axis
    batch: SineBatch
    steps: int  # K

    def to(self, dtype: torch.dtype) -> Problem:
        return Problem(
            self.task,
            self.metaloss,
            {k: v.to(dtype) for k, v in self.phi.items()},
            {k: v.to(dtype) for k, v in self.theta.items()},
            SineBatch(*(t.to(dtype) for t in self.batch)),
            self.steps,
        )


def make_problem(tasks: int, steps: int, seed: int) -> Problem:
    task = make_task("sine", {"hidden": OPTIMIZEE_HIDDEN})
    gen = generator(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        metaloss = MetaLoss(task.loss_inputs_spec, hidden=METALOSS_HIDDEN, bias=False, output="softplus")
    # The hand-written loop below hard-codes these; fail loudly if the defaults ever move.
    assert task.options.activation == "relu" and metaloss.activation == "relu"
    assert [item.name for item in task.loss_inputs_spec] == ["y_pred", "y_true"]
    phi = {name: p.detach() for name, p in metaloss.named_parameters()}
    return Problem(task, metaloss, phi, task.init_theta(tasks, gen), task.sample_tasks(tasks, gen), steps)


# -- the two implementations ----------------------------------------------------------------------------------
def engine_meta_gradient(problem: Problem) -> Phi:
    """∇_φ through the ml3 engine (vmap over tasks, batched autograd inner steps)."""
    inner = InnerConfig(lr=INNER_LR, steps=problem.steps)
    objective = task_objective(problem.task, TaskLossConfig())
    gradient, _ = meta_gradient(
        problem.metaloss, problem.phi, problem.task, problem.theta, problem.batch, inner, objective, diagnostics=False
    )
    return gradient


def _layers(params: dict[str, Tensor]) -> list[tuple[Tensor, Tensor | None]]:
    """``{"0.weight", "0.bias", "2.weight", …}`` → ``[(W0, b0), (W2, b2), …]`` in module order."""
    groups: dict[str, dict[str, Tensor]] = {}
    for name, value in params.items():
        prefix, _, kind = name.rpartition(".")
        groups.setdefault(prefix, {})[kind] = value
    return [(g["weight"], g.get("bias")) for g in groups.values()]


def _relu_mlp(layers: list[tuple[Tensor, Tensor | None]], x: Tensor) -> Tensor:
    for j, (weight, bias) in enumerate(layers):
        x = F.linear(x, weight, bias)
        if j < len(layers) - 1:
            x = F.relu(x)
    return x


def autograd_meta_gradient(problem: Problem) -> Phi:
    """∇_φ with plain autograd: a loop over tasks, ``torch.autograd.grad(create_graph=True)`` inner steps."""
    phi = {k: v.detach().requires_grad_() for k, v in problem.phi.items()}
    phi_layers = _layers(phi)
    names = list(problem.theta)
    batch = problem.batch
    n = batch.x_support.shape[0]
    total = {k: torch.zeros_like(v) for k, v in problem.phi.items()}
    for i in range(n):
        theta = [problem.theta[k][i].detach().requires_grad_() for k in names]
        for _ in range(problem.steps):
            y_pred = _relu_mlp(_layers(dict(zip(names, theta, strict=True))), batch.x_support[i])
            features = torch.cat([y_pred.reshape(-1, 1), batch.y_support[i].reshape(-1, 1)], dim=-1)
            learned_loss = F.softplus(_relu_mlp(phi_layers, features)).mean()
            grads = torch.autograd.grad(learned_loss, theta, create_graph=True)
            theta = [p - INNER_LR * g for p, g in zip(theta, grads, strict=True)]
        y_query = _relu_mlp(_layers(dict(zip(names, theta, strict=True))), batch.x_query[i])
        task_loss = ((y_query - batch.y_query[i]) ** 2).mean()
        for k, g in zip(phi, torch.autograd.grad(task_loss / n, list(phi.values())), strict=True):
            total[k] += g
    return total


def higher_meta_gradient(problem: Problem) -> Phi:
    """∇_φ with ``higher`` (the public reference's library): per task, a monkey-patched copy of the optimizee
    module and a differentiable SGD optimizer, ``diffopt.step(M_φ)`` K times, one backward per task into φ."""
    import higher

    phi = {k: v.detach().requires_grad_() for k, v in problem.phi.items()}
    phi_layers = _layers(phi)
    batch = problem.batch
    n = batch.x_support.shape[0]
    total = {k: torch.zeros_like(v) for k, v in problem.phi.items()}
    module = problem.task.build_optimizee().to(batch.x_support.dtype)
    for i in range(n):
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(problem.theta[name][i])
        sgd = torch.optim.SGD(module.parameters(), lr=INNER_LR)
        with higher.innerloop_ctx(module, sgd, copy_initial_weights=True) as (fmodel, diffopt):
            for _ in range(problem.steps):
                y_pred = fmodel(batch.x_support[i])
                features = torch.cat([y_pred.reshape(-1, 1), batch.y_support[i].reshape(-1, 1)], dim=-1)
                diffopt.step(F.softplus(_relu_mlp(phi_layers, features)).mean())
            task_loss = ((fmodel(batch.x_query[i]) - batch.y_query[i]) ** 2).mean()
            for k, g in zip(phi, torch.autograd.grad(task_loss / n, list(phi.values())), strict=True):
                total[k] += g
    return total


def higher_available() -> bool:
    try:
        import higher  # noqa: F401
    except ImportError:
        return False
    return True


IMPLEMENTATIONS: dict[str, Callable[[Problem], Phi]] = {
    "engine": engine_meta_gradient,
    "higher": higher_meta_gradient,
    "autograd": autograd_meta_gradient,
}


# -- correctness ----------------------------------------------------------------------------------------------
def max_abs_diff(a: Phi, b: Phi) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def max_abs(a: Phi) -> float:
    return max(v.abs().max().item() for v in a.values())


def check_agreement(problem: Problem, names: list[str]) -> tuple[float, float, float]:
    """Every implementation's meta-gradient against the autograd loop's, in float64 and float32; raises if they
    disagree. Returns (|∇|, the largest Δ in float64, in float32)."""
    diffs, scale = [], 0.0
    for dtype, rtol in ((torch.float64, 1e-7), (torch.float32, 1e-3)):
        p = problem.to(dtype)
        reference = autograd_meta_gradient(p)
        scale = max_abs(reference)
        worst = 0.0
        for name in names:
            if name == "autograd":
                continue
            other = IMPLEMENTATIONS[name](p)
            for k in reference:
                torch.testing.assert_close(
                    other[k],
                    reference[k],
                    rtol=rtol,
                    atol=rtol * scale,
                    msg=lambda m, k=k, d=dtype, i=name: f"{i} and autograd meta-gradients disagree on {k} in {d}: {m}",  # noqa: B023
                )
            worst = max(worst, max_abs_diff(other, reference))
        diffs.append(worst)
    return scale, diffs[0], diffs[1]  # scale: of the float32 gradient, the one that is timed


# -- memory ---------------------------------------------------------------------------------------------------
class PeakRss:
    """Peak RSS growth of one call (see the module docstring); ``available`` is False where it cannot work."""

    def __init__(self) -> None:
        self.available = False
        self.reason = ""
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._libc.malloc_trim  # noqa: B018  (glibc only)
            self._reset()
            self._status("VmHWM")
            self.available = True
        except (OSError, AttributeError, ValueError) as err:
            self.reason = f"{type(err).__name__}: {err}"

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise ValueError(f"{key} not in /proc/self/status")

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def measure(self, fn: Callable[[], object]) -> float:
        """MiB by which the peak RSS rose above the RSS before the call."""
        gc.collect()
        self._libc.malloc_trim(0)
        before = self._status("VmRSS")
        self._reset()
        result = fn()
        peak = self._status("VmHWM")
        del result
        return max(peak - before, 0) / 2**20


# -- timing ---------------------------------------------------------------------------------------------------
@dataclass
class Result:
    tasks: int
    steps: int
    grad_scale: float  # max |∇φ|
    diff64: float  # max |implementation − autograd| in float64
    diff32: float  # … in float32
    seconds: dict[str, list[float]]  # per implementation: seconds per meta-step, one sample per round
    mib: dict[str, float | None]  # per implementation: peak RSS growth of one meta-step

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def speedups(self, other: str) -> list[float]:
        """Per-round paired ratios: ``other``'s time ÷ the engine's (= engine steps/s ÷ other steps/s)."""
        return [o / e for e, o in zip(self.seconds["engine"], self.seconds[other], strict=True)]


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


def benchmark(tasks: int, steps: int, args: argparse.Namespace, peak_rss: PeakRss | None) -> Result:
    problem = make_problem(tasks, steps, args.seed)
    grad_scale, diff64, diff32 = check_agreement(problem, args.implementations)
    calls = {name: (lambda fn=IMPLEMENTATIONS[name]: fn(problem)) for name in args.implementations}

    # Warm-up, and a first estimate of each call's duration to size the samples.
    number = {}
    for name, call in calls.items():
        estimate = min(time_calls(call, 1) for _ in range(args.warmup))
        number[name] = max(1, math.ceil(args.min_time / max(estimate, 1e-6)))

    mib: dict[str, float | None] = {name: None for name in calls}
    if peak_rss is not None:
        for name, call in calls.items():
            mib[name] = peak_rss.measure(call)
        for call in calls.values():  # fault the pages back in after malloc_trim
            call()

    samples: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for round_ in range(args.repeats):
        for name in order if round_ % 2 == 0 else reversed(order):
            samples[name].append(time_calls(calls[name], number[name]))
    return Result(tasks, steps, grad_scale, diff64, diff32, samples, mib)


# -- report ---------------------------------------------------------------------------------------------------
def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def ratio_cell(result: Result, other: str) -> str:
    ratios = result.speedups(other)
    low, high = quartiles(ratios)
    style = "green" if low > 1 else "red" if high < 1 else "yellow"
    return f"[{style}]{statistics.median(ratios):.2f}×[/] ({low:.2f}–{high:.2f})"


def render(results: list[Result], names: list[str], memory: bool, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    others = [name for name in names if name != "engine"]
    headers = ["tasks", "K", "max|Δ∇φ| f64 / f32"]
    headers += [f"{name} ms" for name in names]
    headers += ["engine task-steps/s"]
    headers += [f"ml3/{name} (IQR)" for name in others]
    if memory:
        headers.append("peak MiB " + " / ".join(names))
    for header in headers:
        table.add_column(header, justify="right")
    for r in results:
        row = [str(r.tasks), str(r.steps), f"{r.diff64:.1e} / {r.diff32:.1e}"]
        row += [f"{r.median(name) * 1e3:.2f}" for name in names]
        row.append(f"{r.tasks * r.steps / r.median('engine'):,.0f}")
        row += [ratio_cell(r, name) for name in others]
        if memory:
            row.append(" / ".join(f"{r.mib[name]:.1f}" for name in names))
        table.add_row(*row)
    return table


def truncation_memory(args: argparse.Namespace, peak_rss: PeakRss) -> Table:
    """Peak memory and time of one engine meta-step against K, full second order vs ``truncate``."""
    table = Table(title=f"engine memory against K ({args.memory_tasks} tasks)", title_justify="left")
    for header in ("K", "full MiB", "truncated MiB", "full ms", "truncated ms"):
        table.add_column(header, justify="right")
    for steps in args.memory_steps:
        problem = make_problem(args.memory_tasks, steps, args.seed)
        cells = {}
        for truncate in (False, True):
            inner = InnerConfig(lr=INNER_LR, steps=steps, truncate=truncate)
            objective = task_objective(problem.task, TaskLossConfig())

            def call(inner=inner, objective=objective, problem=problem):
                return meta_gradient(
                    problem.metaloss,
                    problem.phi,
                    problem.task,
                    problem.theta,
                    problem.batch,
                    inner,
                    objective,
                    diagnostics=False,
                )

            call()
            cells[truncate] = (peak_rss.measure(call) if peak_rss else math.nan, time_calls(call, 3))
        table.add_row(
            str(steps),
            f"{cells[False][0]:.1f}",
            f"{cells[True][0]:.1f}",
            f"{cells[False][1] * 1e3:.1f}",
            f"{cells[True][1] * 1e3:.1f}",
        )
    return table


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--tasks", type=int_list, default=[1, 8, 64, 256], help="tasks per meta-batch (default: 1,8,64,256)"
    )
    parser.add_argument("--steps", type=int_list, default=[1, 5, 20], help="inner steps K (default: 1,5,20)")
    parser.add_argument(
        "--memory-steps", type=int_list, default=[1, 5, 20, 50], help="K of the truncation memory table"
    )
    parser.add_argument("--memory-tasks", type=int, default=8, help="tasks of the truncation memory table (default 8)")
    parser.add_argument("--no-higher", action="store_true", help="leave out `higher` (pip install higher)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--quick", action="store_true", help="fewer and shorter rounds (a smoke test)")
    parser.add_argument("--repeats", type=int, help="timed rounds per configuration (default: 21, quick: 5)")
    parser.add_argument("--min-time", type=float, help="seconds per sample, at least (default: 0.1, quick: 0.02)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per implementation (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of φ, θ₀ and the tasks (default: 0)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS columns")
    parser.add_argument(
        "--malloc-defaults",
        action="store_true",
        help="leave glibc's malloc settings alone instead of keeping freed memory for reuse as `ml3` does",
    )
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 21
    if args.min_time is None:
        args.min_time = 0.02 if args.quick else 0.1
    if args.repeats < 1 or args.warmup < 1 or args.threads < 1:
        parser.error("--repeats, --warmup and --threads must be at least 1")
    args.implementations = ["engine", "higher", "autograd"]
    if args.no_higher or not higher_available():
        args.implementations.remove("higher")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    kept = False if args.malloc_defaults else keep_freed_memory()  # as `ml3` does (ml3cli.runtime.configure)

    peak_rss = None
    if not args.no_memory:
        peak_rss = PeakRss()
        if not peak_rss.available:
            console.print(f"[dim]peak memory not measured: {peak_rss.reason}[/]")
            peak_rss = None

    console.print(
        f"torch {torch.__version__} · python {platform.python_version()} · {platform.machine()} · "
        f"{torch.get_num_threads()} thread(s) · float32 on cpu · {args.repeats} rounds ≥ {args.min_time:g} s · "
        f"freed memory {'kept for reuse' if kept else 'returned to the kernel (glibc defaults)'}"
    )
    console.print(
        f"optimizee 1→{'→'.join(map(str, OPTIMIZEE_HIDDEN))}→1 ReLU · M_φ 2→{'→'.join(map(str, METALOSS_HIDDEN))}→1 "
        f"no bias, softplus · 100 support + 100 query points · α = {INNER_LR:g}"
    )
    results = []
    for tasks in args.tasks:
        for steps in args.steps:
            with console.status(f"tasks={tasks} K={steps}: checking the gradients, then timing …"):
                t0 = time.perf_counter()
                results.append(benchmark(tasks, steps, args, peak_rss))
            r = results[-1]
            console.print(
                f"[dim]tasks={tasks:>3} K={steps}: gradients agree (max|∇φ| {r.grad_scale:.1e}, max|Δ∇φ| "
                f"{r.diff64:.1e} in float64, {r.diff32:.1e} in float32); checked and timed in "
                f"{time.perf_counter() - t0:.1f} s[/]"
            )

    names = args.implementations
    if "higher" not in names:
        console.print("[dim]higher is not installed (pip install -c constraints.txt -e '.[bench]'): left out[/]")
    console.print(
        render(results, names, peak_rss is not None, "meta-gradient ∇φ L_T: ml3 engine vs " + ", ".join(names[1:]))
    )
    console.print(
        "ml3/X = engine steps/s ÷ X steps/s (median of per-round paired ratios, IQR in brackets); "
        ">1: the engine is faster. task-steps/s = tasks × K ÷ engine time.\n"
        "max|Δ∇φ|: largest elementwise difference from the autograd loop's meta-gradient (asserted close before timing)."
    )
    console.print(truncation_memory(args, peak_rss))
    console.print(f"total wall time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
