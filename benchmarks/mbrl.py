"""Figure 3 of the paper (sections 3.2.1 and 4.1.2): model-based ML³ on PointmassGoal and ReacherGoal.

Meta-test (algorithm 5) of a learned loss from ``ml3 meta-train recipes/mbrl_pointmass.yaml`` (or
``mbrl_reacher.yaml``) against the task loss through the dynamics model P from meta-train time (read from the
meta-train checkpoint beside the artifact). See :mod:`ml3cli.experiments.mbrl` for the protocol.

    python benchmarks/mbrl.py --loss artifacts/mbrl_pointmass.safetensors --goals 10 --seeds 3 --updates 50 \
        --out runs/mbrl_pointmass

prints the table of the real final distance after 0, 1, 5, 10, 20, 50 policy updates (mean ± std over seeds of
the mean over goals) and writes ``results.json``, ``final_distance.png`` (figure 3b/c) and ``trajectories.png``
(figure 3a: paths after the last update toward meta-train goals, blue, and meta-test goals, orange).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ml3cli.artifacts import load_loss, read_info
from ml3cli.experiments.mbrl import (
    REPORT_STEPS,
    compare,
    goal_trajectories,
    model_state_from_checkpoint,
    table_rows,
    trained_paths,
)
from ml3cli.files import write_bytes_atomic, write_json_atomic
from ml3cli.plots import distance_curves
from ml3cli.runtime import configure, generator
from ml3cli.tasks import make_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", required=True, help="a learned-loss artifact of pointmass_goal or reacher_goal")
    parser.add_argument("--goals", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="evaluation seeds are seed … seed + seeds − 1")
    parser.add_argument("--baseline-lrs", default="0.01,0.03,0.1,0.3,1.0")
    parser.add_argument("--out", default=None, help="folder for results.json and the figures")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    configure(args.threads)
    console = Console()

    info = read_info(args.loss)
    recipe = info["recipe"]
    metaloss = load_loss(args.loss)
    learned_fn = metaloss.as_loss_fn()
    lr = recipe["meta_test"]["lr"] or recipe["inner"]["lr"]
    task_name = recipe["task"]
    train_options, test_options = recipe["task_options"], recipe["meta_test"]["task_options"]
    model_state = model_state_from_checkpoint(args.loss)
    result = compare(
        task_name,
        train_options,
        test_options,
        learned_fn,
        lr,
        model_state,
        args.goals,
        args.seeds,
        args.updates,
        [float(v) for v in args.baseline_lrs.split(",")],
        args.seed,
    )
    steps = [s for s in REPORT_STEPS if s <= args.updates]
    table = Table(
        title=f"{task_name}: real final distance to the goal ({args.goals} goals × {args.seeds} seeds, "
        "mean ± std over seeds)"
    )
    table.add_column("loss")
    for s in steps:
        table.add_column(f"{s} upd.", justify="right")
    table.add_column(f"{args.updates} upd., goals in meta-train region", justify="right")
    table.add_column(f"{args.updates} upd., goals outside", justify="right")
    for row in table_rows(result, steps):
        table.add_row(*row)
    console.print(table)
    console.print(
        f"baseline lr chosen on meta-train goals: {result.baseline_scores}; "
        f"{int(result.inside.sum())} of {result.inside.size} test goals lie in the meta-train region"
    )

    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            out / "results.json",
            {
                "artifact": str(args.loss),
                "task": task_name,
                "goals": args.goals,
                "seeds": args.seeds,
                "updates": args.updates,
                "lrs": result.lrs,
                "baseline_lr_scores": result.baseline_scores,
                "goals_xy": result.goals.tolist(),
                "inside_meta_train_region": result.inside.tolist(),
                "final_distance": {k: v.tolist() for k, v in result.curves.items()},
            },
        )
        write_bytes_atomic(
            out / "final_distance.png",
            distance_curves({k: v.mean(axis=1) for k, v in result.curves.items()}, f"{task_name}: meta-test"),
        )
        task = make_task(task_name, {**test_options, "system": "real", "model_gradient": False})
        train_goals = make_task(task_name, {**train_options, "system": "real"}).sample_goals(5, generator(123))
        test_goals = make_task(
            task_name, {**test_options, "system": "real", "goal_angle": [100.0, 260.0]}
        ).sample_goals(5, generator(456))
        groups = {
            f"meta-train region goals ({args.updates} updates)": (
                trained_paths(task, learned_fn, lr, train_goals, args.updates, args.seed),
                train_goals.numpy(),
            ),
            f"meta-test goals, left ({args.updates} updates)": (
                trained_paths(task, learned_fn, lr, test_goals, args.updates, args.seed),
                test_goals.numpy(),
            ),
        }
        write_bytes_atomic(out / "trajectories.png", goal_trajectories(groups, f"{task_name}: learned loss only"))
        console.print(f"wrote {out}/results.json, final_distance.png, trajectories.png")
    np.set_printoptions(precision=3)
    torch.set_printoptions(precision=3)


if __name__ == "__main__":
    main()
