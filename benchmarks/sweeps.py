"""A learning-rate search (``ml3 compare --tune-baseline-lr``) trained one seed and rate at a time against all
of them in one batched computation (``ml3cli.evaluate.evaluate_together``).

What is measured
    :func:`ml3cli.evaluate.validation_scores` over the search's first grid (nine rates, two decades either side of
    the recipe's meta-test rate in half-decade steps) for the baseline loss of a task, with the task, seeds, task
    count and steps of a packaged recipe's meta-test (``--steps`` shortens it). ``looped`` trains each (seed, rate)
    pair by itself, as every sweep did before; ``batched`` trains them together. Each round times both, alternating
    which goes first; the speed-up is looped time ÷ batched time per round, summarised by its median. The scores
    of the two are asserted equal (to float32 rounding) before anything is reported.

Results (2 shared cores, 1 thread; the machine's load moves absolute times by 2×, ratios less)
    ``sine``: batched 6.4× faster. ``mnist_binary`` (``--steps 10``): 1.4× (looped 13.9 s, batched 10.1 s), and 1.2–1.5×
    faster than the looped sweep with vmap's grouped convolution (same-run rounds); the
    time is LeNet's convolutions, and the batch only helps since they run one optimizee at a time
    (:func:`ml3cli.functional.per_optimizee_conv2d`; with vmap's grouped convolution batched was 0.87–0.89× of
    looped). One LeNet step of 64 images is ~145 MFLOP, ~10 ms per optimizee here: within about 3× of what a
    core's GEMM peak (~30 GFLOP/s measured) would allow at all.

Usage (from the repository root)
    python benchmarks/sweeps.py                                      # sine_shifted and mnist_binary
    python benchmarks/sweeps.py --recipes sine --rounds 3 --out results/benchmarks/sweeps.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from ml3cli import evaluate as evaluation
from ml3cli.evaluate import lr_grid, validation_scores
from ml3cli.losses import baseline_name, builtin_loss
from ml3cli.recipes import load_recipe
from ml3cli.runtime import configure
from ml3cli.tasks import make_task


def timed(together: bool, *args) -> tuple[float, dict[float, float]]:
    """Seconds of one validation sweep, and its scores."""
    original = evaluation.evaluate

    def evaluate(*a, **k):
        return original(*a, **k, together=together)

    evaluation.evaluate = evaluate  # validation_scores calls evaluate by this module's name
    try:
        started = time.perf_counter()
        scores = validation_scores(*args)
        return time.perf_counter() - started, scores
    finally:
        evaluation.evaluate = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="sine,mnist_binary")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="fewer steps than the recipe's meta-test")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = parser.parse_args()
    configure(args.threads)

    results = {}
    for name in args.recipes.split(","):
        recipe = load_recipe(name)
        test = recipe.meta_test
        task = make_task(test.task or recipe.task, test.task_options, "cpu")
        steps = args.steps or test.steps
        loss = builtin_loss(task, baseline_name(task), test.lr)
        grid = lr_grid(test.lr)
        sweep = (task, loss, grid, test.tasks, test.seeds, steps)
        looped, batched = [], []
        for round_ in range(args.rounds):
            for together in (False, True) if round_ % 2 == 0 else (True, False):
                seconds, scores = timed(together, *sweep)
                (batched if together else looped).append((seconds, scores))
        reference = looped[0][1]
        for _, scores in batched:
            for lr in grid:
                a, b = reference[lr], scores[lr]
                assert (math.isinf(a) and math.isinf(b)) or math.isclose(a, b, rel_tol=1e-5), (lr, a, b)
        ratios = [a[0] / b[0] for a, b in zip(looped, batched, strict=True)]
        results[name] = {
            "task": task.name,
            "rates": len(grid),
            "seeds": test.seeds,
            "tasks": test.tasks,
            "steps": steps,
            "looped_seconds": statistics.median(s for s, _ in looped),
            "batched_seconds": statistics.median(s for s, _ in batched),
            "speedup": statistics.median(ratios),
            "speedup_range": [min(ratios), max(ratios)],
            "same_scores": True,
        }
        r = results[name]
        print(
            f"{name} ({task.name}, {len(grid)} rates × {test.seeds} seeds × {test.tasks} tasks × {steps} steps): "
            f"looped {r['looped_seconds']:.2f} s, batched {r['batched_seconds']:.2f} s, speed-up "
            f"{r['speedup']:.2f}× [{r['speedup_range'][0]:.2f}–{r['speedup_range'][1]:.2f}], same scores",
            flush=True,
        )
    if args.out:
        from ml3cli import files
        from ml3cli.commands.runs import benchmark_record

        document = benchmark_record("sweeps") | {
            "threads": args.threads,
            "torch_threads": torch.get_num_threads(),
            "rounds": args.rounds,
            "results": results,
        }
        files.write_json_atomic(args.out, document)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
