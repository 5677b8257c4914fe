"""Outer steps per second at 1 and 2 intra-op threads, and whether the two give the same numbers.

What is measured
    For each recipe, ``ml3 meta-train RECIPE`` runs a few outer steps (``--set outer.steps=S``, every step logged,
    a one-task meta-test) in a fresh process at ``--threads 1`` and at ``--threads 2``. A process's seconds per
    outer step is the median of the steps after the first (the first pays for warm-up). Rounds alternate which
    thread count runs first, so that machine noise hits both alike; the ratio of the two, per round, is
    summarised by its median.

    Each run also records the first logged task loss before the inner steps (``meta/task_loss_before`` at step
    1) and the SHA-256 of the final φ, so the table says whether the thread count changed the numbers.

Why the numbers can differ
    torch picks its matrix kernels by thread count: a policy's forward pass can differ in the last bit between
    one and two threads. Supervised tasks carry such a difference as rounding; MuJoCo's contact dynamics (the ant)
    amplify it until the trajectories part (a 1e-7 difference in the first action grows to several units of the
    observation by step 100). A run is bit-reproducible for a given seed, thread count and CPU; recipes record
    their thread count for that reason.

Usage (from the repository root, on an otherwise idle machine)
    python benchmarks/threads.py                              # sine at 64 tasks, mnist_binary, mfrl_reacher, mfrl_ant
    python benchmarks/threads.py --recipes sine --rounds 2 --out /tmp/threads.json
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: recipe → the outer steps timed and the --set overrides that keep one run to tens of seconds
CASES: dict[str, tuple[int, list[str]]] = {
    "sine": (8, ["outer.tasks=64"]),
    "mnist_binary": (6, []),
    "mfrl_reacher": (4, []),
    "mfrl_ant": (3, []),
}


def run_once(recipe: str, steps: int, overrides: list[str], threads: int, folder: Path) -> dict:
    """One ``ml3 meta-train`` process: seconds per outer step, the first logged task loss and φ's digest."""
    out = folder / f"{recipe}-t{threads}.safetensors"
    sets = [f"outer.steps={steps}", "log_every=1", "checkpoint_every=0", "meta_test.tasks=1", "meta_test.steps=1"]
    command = [sys.executable, "-m", "ml3cli", "meta-train", recipe, "--threads", str(threads), "--out", str(out)]
    command += [arg for value in [*sets, *overrides] for arg in ("--set", value)] + ["--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    rows = list(csv.DictReader(out.with_suffix(".curves.csv").open()))
    seconds = [float(row["time/seconds"]) for row in rows]
    per_step = statistics.median(b - a for a, b in zip(seconds, seconds[1:], strict=False))
    from safetensors.numpy import load_file

    phi = load_file(out)
    digest = hashlib.sha256(b"".join(phi[name].tobytes() for name in sorted(phi))).hexdigest()[:16]
    first = float(rows[0]["meta/task_loss_before"])
    return {"seconds_per_step": per_step, "wall": wall, "first_task_loss": first, "phi_sha256": digest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(CASES), help="comma-separated, from: " + ", ".join(CASES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes.split(","):
            steps, overrides = CASES[recipe]
            runs: dict[int, list[dict]] = {1: [], 2: []}
            for round_ in range(args.rounds):
                for threads in (1, 2) if round_ % 2 == 0 else (2, 1):
                    runs[threads].append(run_once(recipe, steps, overrides, threads, Path(tmp)))
            ratios = [b["seconds_per_step"] / a["seconds_per_step"] for a, b in zip(runs[1], runs[2], strict=True)]
            results[recipe] = {
                "steps": steps,
                "overrides": overrides,
                "seconds_per_step": {t: statistics.median(r["seconds_per_step"] for r in runs[t]) for t in (1, 2)},
                "two_over_one": statistics.median(ratios),
                "two_over_one_range": [min(ratios), max(ratios)],
                "first_task_loss": {t: runs[t][0]["first_task_loss"] for t in (1, 2)},
                "same_phi": runs[1][0]["phi_sha256"] == runs[2][0]["phi_sha256"],
                "deterministic_per_thread_count": all(len({r["phi_sha256"] for r in runs[t]}) == 1 for t in (1, 2)),
            }
            r = results[recipe]
            print(
                f"{recipe:14s} s/step 1 thread {r['seconds_per_step'][1]:.3f}, 2 threads {r['seconds_per_step'][2]:.3f}: "
                f"2/1 = {r['two_over_one']:.2f} [{r['two_over_one_range'][0]:.2f}–{r['two_over_one_range'][1]:.2f}]; "
                f"first task loss {r['first_task_loss'][1]:.6g} vs {r['first_task_loss'][2]:.6g}; same φ: "
                f"{r['same_phi']}; same φ across rounds of one thread count: {r['deterministic_per_thread_count']}",
                flush=True,
            )
    if args.out:
        from ml3cli import files
        from ml3cli.commands.runs import benchmark_record

        document = benchmark_record("threads") | {"rounds": args.rounds, "results": results}
        files.write_json_atomic(args.out, document)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
