"""Figure 6c–d of the paper (section 4.2.4): ReacherGoal with expert demonstrations at meta-train time only.

Meta-test of a learned loss from ``ml3 meta-train recipes/reacher_demos.yaml`` against behavioural cloning on the
meta-train targets' iLQR demonstrations, plain and DAgger-like, each at the learned loss's learning rate and at its
own rate tuned on the meta-train targets (see :mod:`ml3cli.experiments.reacher_demos` for the protocol):

    python benchmarks/reacher_demos.py --loss artifacts/reacher_demos.safetensors --seeds 3 --updates 50 \
        --out runs/reacher_demos

prints the real final fingertip distance after 0, 1, 10, 50 policy updates (mean ± sd over every target × seed)
on the 6 meta-test targets and on the 4 meta-train targets, and writes ``results.json``, ``targets.png``
(figure 6c: the meta-train targets with the experts' fingertip paths, blue; the meta-test targets with the paths
of policies trained by the learned loss alone, orange) and ``final_distance.png`` (figure 6d).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ml3cli.artifacts import load_loss, read_info
from ml3cli.experiments.reacher_demos import REPORT_STEPS, compare, table_rows, targets_figure, trained_paths
from ml3cli.files import write_bytes_atomic, write_json_atomic
from ml3cli.plots import distance_curves
from ml3cli.runtime import configure
from ml3cli.tasks import make_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", required=True, help="a learned-loss artifact of reacher_demos")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="evaluation seeds are seed … seed + seeds − 1")
    parser.add_argument("--bc-lrs", default="0.001,0.003,0.01,0.03,0.1")
    parser.add_argument("--out", default=None, help="folder for results.json and the figures")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    configure(args.threads)
    console = Console()
    console.width = max(console.width, 150)  # the tables' rows stay on one line in logs too
    began = time.perf_counter()

    info = read_info(args.loss)
    recipe = info["recipe"]
    metaloss = load_loss(args.loss)
    learned_fn = lambda inputs: metaloss(**inputs)  # noqa: E731
    lr = recipe["meta_test"]["lr"] or recipe["inner"]["lr"]
    train_options, test_options = recipe["task_options"], recipe["meta_test"]["task_options"]
    result = compare(
        train_options,
        test_options,
        learned_fn,
        lr,
        args.seeds,
        args.updates,
        [float(v) for v in args.bc_lrs.split(",")],
        args.seed,
    )
    steps = [s for s in REPORT_STEPS if s <= args.updates]
    for split, what in (("test", "meta-test targets (no expert)"), ("train", "meta-train targets")):
        goals = len(result.test_goals if split == "test" else result.train_goals)
        table = Table(
            title=f"reacher_demos, {what}: real final fingertip distance in m ({goals} targets × "
            f"{args.seeds} seeds, mean ± sd)"
        )
        table.add_column("method")
        for s in steps:
            table.add_column(f"{s} upd.", justify="right")
        for row in table_rows(result, split, steps):
            table.add_row(*row)
        console.print(table)
    for name, scores in result.bc_scores.items():
        console.print(
            f"{name}: final distance on the meta-train targets (seeds 10000+) per lr: "
            f"{ {k: round(v, 4) for k, v in scores.items()} }"
        )

    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            out / "results.json",
            {
                "artifact": str(args.loss),
                "seeds": args.seeds,
                "updates": args.updates,
                "lrs": result.lrs,
                "bc_lr_scores": {
                    name: {str(k): v for k, v in scores.items()} for name, scores in result.bc_scores.items()
                },
                "train_goals": result.train_goals.tolist(),
                "test_goals": result.test_goals.tolist(),
                "final_distance": {
                    split: {k: v.tolist() for k, v in curves.items()} for split, curves in result.curves.items()
                },
            },
        )
        write_bytes_atomic(
            out / "final_distance.png",
            distance_curves(
                {k: v.mean(axis=1) for k, v in result.curves["test"].items()},
                "reacher_demos: meta-test targets (no expert)",
            ),
        )
        demo_task = make_task("reacher_demos", {**train_options, "demonstrations": True})
        experts = np.stack([demo_task.position(torch.from_numpy(d.states)).numpy() for d in demo_task.demonstrations()])
        test_task = make_task("reacher_demos", {**test_options, "demonstrations": False})
        paths, _ = trained_paths(test_task, learned_fn, lr, args.updates, args.seed)
        write_bytes_atomic(
            out / "targets.png",
            targets_figure(
                result.train_goals,
                result.test_goals,
                experts,
                paths,
                f"reacher_demos: targets (figure 6c); learned-loss paths after {args.updates} updates",
            ),
        )
        console.print(f"wrote {out}/results.json, final_distance.png, targets.png")
    console.print(f"benchmark time {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
