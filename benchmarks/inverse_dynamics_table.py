"""The results table of the inverse-dynamics experiment (paper 4.2.2, figure 5c–d).

For one robot's task family on its META-TEST trajectories: held-out torque MSE and inertia error ‖M_θ − M‖_F after
10/100/500/1000 SGD steps for each ``--loss`` (artifacts or built-ins) at the same learning rate, plus the baseline
(torque MSE) at its best learning rate from the sweep of ``ml3 compare --tune-baseline-lr``, chosen on the first
artifact's META-TRAIN task only. The same seeds, tasks, θ₀ and functions as ``ml3 compare`` (which prints the torque
MSE but the inertia error only at steps 0/1/10/50/100/N). Mean ± std over seeds of the per-seed mean over tasks.

    python benchmarks/inverse_dynamics_table.py --task inverse_dynamics_reacher --lr 1e-3 \
        --loss runs/reacher_prior.safetensors --loss runs/reacher_noprior.safetensors --loss torque_mse --tune
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ml3cli.artifacts import read_info
from ml3cli.evaluate import BASELINE_LR_SWEEP, TUNING_SEED_OFFSET, evaluate, tune_lr
from ml3cli.losses import LossSpec, builtin_loss
from ml3cli.tasks import make_task

MARKS = (0, 10, 100, 500, 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--loss", action="append", required=True, help="artifact path or built-in name")
    parser.add_argument("--lr", type=float, required=True, help="the SGD learning rate of every --loss")
    parser.add_argument("--tune", action="store_true", help="add torque MSE at its tuned lr (meta-train task)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tune-seeds", type=int, default=None, help="seeds of the lr sweep (default: --seeds)")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()

    artifacts = [spec for spec in args.loss if spec.endswith(".safetensors")]
    infos = [read_info(path) for path in artifacts]
    recorded = next((i["recipe"]["meta_test"] for i in infos if i["recipe"]["meta_test"]["task"] == args.task), None)
    options = recorded["task_options"] if recorded else {"split": "meta_test"}
    task = make_task(args.task, options)
    losses = [LossSpec(spec).resolve(task, args.lr, torch.device("cpu")).named for spec in args.loss]
    tuning = None
    if args.tune:
        train = make_task(infos[0]["task"], infos[0]["recipe"]["task_options"])
        base = builtin_loss(train, "torque_mse", 1.0)
        tune_seeds = args.tune_seeds or args.seeds
        best, scores = tune_lr(train, base, BASELINE_LR_SWEEP, args.tasks, tune_seeds, args.steps, TUNING_SEED_OFFSET)
        losses.append(builtin_loss(task, "torque_mse", best, f"torque_mse (tuned lr {best:g})"))
        tuning = {"best_lr": best, "final_by_lr": {str(k): v for k, v in scores.items()}, "on": infos[0]["task"]}
        print(
            f"tuned on {infos[0]['task']} (meta_train split): "
            + ", ".join(f"{k:g}: {v:.4g}" for k, v in scores.items())
        )

    curves = evaluate(task, losses, args.tasks, args.seeds, args.steps)
    marks = [m for m in MARKS if m <= args.steps]
    table = {}
    print(f"{args.task} (split {task.options.split}), {args.tasks} tasks × {args.seeds} seeds; mean ± std over seeds")
    print(
        "| loss | lr | "
        + " | ".join(f"MSE @{m}" for m in marks)
        + " | "
        + " | ".join(f"‖M_θ−M‖ @{m}" for m in marks)
        + " |"
    )
    for c in curves:
        mse = c.per_seed  # [seeds, steps + 1]
        inertia = c.extras["inertia_error"].mean(axis=1)  # [seeds, steps + 1]
        row = {
            "lr": c.lr,
            "torque_mse": {m: [float(mse[:, m].mean()), float(mse[:, m].std())] for m in marks},
            "inertia_error": {m: [float(inertia[:, m].mean()), float(inertia[:, m].std())] for m in marks},
            "torque_mse_per_seed": {m: mse[:, m].tolist() for m in marks},
        }
        table[c.label] = row
        cells = [f"{row['torque_mse'][m][0]:.4g} ± {row['torque_mse'][m][1]:.2g}" for m in marks]
        cells += [f"{row['inertia_error'][m][0]:.3g}" for m in marks]
        print(f"| {c.label} | {c.lr:g} | " + " | ".join(cells) + " |")
    first = curves[0].per_seed[:, args.steps]
    for c in curves[1:]:
        wins = int(np.sum(first < c.per_seed[:, args.steps]))
        print(f"{curves[0].label} below {c.label} at step {args.steps} on {wins}/{args.seeds} seeds")
    print(f"{time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"task": args.task, "options": options, "tuning": tuning, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
