"""Task-steps per second on a GPU: the eager engine against the same meta-step replayed from a CUDA graph.

What is measured
    One meta-step of the sine reference networks (``recipes/sine_reference.yaml``: optimizee 1→100→10→1, M_φ
    2→50→50→1, 100 support and 100 query points, K inner steps) for ``n`` tasks, as ``ml3 meta-train`` computes it
    (:func:`ml3cli.engine.estimator_for`), eager and through :class:`ml3cli.engine.graphs.GraphedEstimator`. A
    task-step is one task's inner step: task-steps/s = n · K / seconds per meta-step. Each round times both,
    alternating which goes first, after a warm-up (the graph's capture included); the speed-up is eager time ÷
    graphed time per round, its median reported. The two meta-gradients are compared before anything is timed.

Usage (on a machine with CUDA; elsewhere it says so and exits)
    python benchmarks/cuda_graph.py                                  # 1 … 4,096 tasks, K = 1
    python benchmarks/cuda_graph.py --tasks 64,4096 --steps 5 --out results/benchmarks/cuda_graph.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._pytree import tree_map

from ml3cli.engine import build_metaloss, estimator_for, task_objective
from ml3cli.engine.graphs import GraphedEstimator
from ml3cli.recipes import load_recipe
from ml3cli.runtime import generator
from ml3cli.tasks import make_task


def seconds_per_call(estimate, arguments, min_time: float) -> float:
    """The mean wall time of ``estimate(*arguments)`` over enough calls to last ``min_time`` seconds."""
    calls, started = 0, time.perf_counter()
    while True:
        estimate(*arguments)
        calls += 1
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if elapsed >= min_time:
            return elapsed / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="1,8,64,512,4096")
    parser.add_argument("--steps", type=int, default=1, help="K, inner steps per meta-step")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: this benchmark needs a GPU (the CPU-side tests are tests/test_graphs.py)")
        sys.exit(0)

    recipe = load_recipe("sine_reference", [f"inner.steps={args.steps}", f"inner.reset_every={args.steps}"])
    task = make_task(recipe.task, recipe.task_options, "cuda")
    results = {}
    for n in (int(t) for t in args.tasks.split(",")):
        gen = generator(0)
        metaloss = build_metaloss(recipe, task, gen).cuda()
        phi = {name: value.detach() for name, value in metaloss.named_parameters()}
        batch, theta = tree_map(lambda t: t.cuda(), (task.sample_tasks(n, gen), task.init_theta(n, gen)))
        eager = estimator_for(recipe.inner, task, task_objective(task, recipe.task_loss))
        graphed = GraphedEstimator(eager)
        arguments = (metaloss, phi, theta, batch)
        a, b = eager.estimate(*arguments), graphed.estimate(*arguments)
        worst = max(float((a.gradient[k] - b.gradient[k]).abs().max()) for k in phi)
        scale = max(float(a.gradient[k].abs().max()) for k in phi)
        assert worst <= 1e-4 * scale + 1e-7, f"graphed meta-gradient differs: {worst} (scale {scale})"
        times: dict[str, list[float]] = {"eager": [], "graphed": []}
        for round_ in range(args.rounds):
            order = (("eager", eager), ("graphed", graphed))
            for name, estimator in order if round_ % 2 == 0 else order[::-1]:
                times[name].append(seconds_per_call(estimator.estimate, arguments, args.min_time))
        ratios = [e / g for e, g in zip(times["eager"], times["graphed"], strict=True)]
        row = {
            "eager_ms": 1e3 * statistics.median(times["eager"]),
            "graphed_ms": 1e3 * statistics.median(times["graphed"]),
            "speedup": statistics.median(ratios),
            "max_gradient_difference": worst,
        }
        row["eager_task_steps_per_s"] = n * args.steps / (row["eager_ms"] / 1e3)
        row["graphed_task_steps_per_s"] = n * args.steps / (row["graphed_ms"] / 1e3)
        results[n] = row
        print(
            f"{n:5d} tasks × K={args.steps}: eager {row['eager_ms']:.2f} ms ({row['eager_task_steps_per_s']:,.0f} "
            f"task-steps/s), graphed {row['graphed_ms']:.2f} ms ({row['graphed_task_steps_per_s']:,.0f}), "
            f"speed-up {row['speedup']:.2f}×, max |Δ∇φ| {worst:.2e}",
            flush=True,
        )
    if args.out:
        from ml3cli import files
        from ml3cli.commands.runs import benchmark_record

        document = benchmark_record("cuda_graph") | {
            "device": torch.cuda.get_device_name(),
            "steps": args.steps,
            "rounds": args.rounds,
            "results": results,
        }
        files.write_json_atomic(args.out, document)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
