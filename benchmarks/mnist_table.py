"""The results table of the MNIST experiment: a class-wise loss learned on one digit pair, meta-tested.

For each meta-test setting (the recorded held-out pairs with LeNet; the 10-class task; the held-out pairs with the
MLP, the narrow and the wide CNN): held-out cross-entropy and accuracy after 10/50/100/300 SGD steps for the learned
loss, cross-entropy at the same lr, and cross-entropy at its best lr from a sweep on the META-TRAIN task only
(same sweep and seeds as ``ml3 compare --tune-baseline-lr``). Every loss starts from the same θ₀ on the same tasks.

    python benchmarks/mnist_table.py artifacts/mnist_binary.safetensors --seeds 5 --steps 300 --json table.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.func import vmap

from ml3cli.artifacts import load_loss
from ml3cli.engine import sgd_step
from ml3cli.evaluate import BASELINE_LR_SWEEP, TUNING_SEED_OFFSET, NamedLoss, tune_lr
from ml3cli.runtime import generator
from ml3cli.tasks import make_task


def curves_at(task, losses, tasks: int, seeds: int, marks: list[int], seed: int = 0) -> dict[str, dict]:
    """``{loss: {"ce": [seed][mark], "accuracy": [seed][mark]}}``, means over tasks; the same tasks and θ₀ as
    :func:`ml3cli.evaluate.evaluate` for the same seed, measured only at ``marks``."""
    out = {loss.label: {"ce": [], "accuracy": []} for loss in losses}
    metric = vmap(lambda theta, batch: (task.task_loss(theta, batch), task.report_metrics(theta, batch)["accuracy"]))
    for s in range(seeds):
        gen = generator(seed + s)
        batch = task.sample_tasks(tasks, gen)
        theta0 = task.init_theta(tasks, gen)
        for loss in losses:
            step = vmap(lambda theta, batch, fn=loss.fn, lr=loss.lr: sgd_step(task, fn, theta, batch, lr))
            theta, ce, acc = theta0, [], []
            with torch.no_grad():
                for k in range(marks[-1] + 1):
                    if k in marks:
                        c, a = metric(theta, batch)
                        ce.append(float(c.mean()))
                        acc.append(float(a.mean()))
                    if k < marks[-1]:
                        theta = step(theta, batch)
            out[loss.label]["ce"].append(ce)
            out[loss.label]["accuracy"].append(acc)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--settings", default="pairs,ten,mlp,cnn_small,cnn_wide")
    parser.add_argument("--no-tune", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())

    metaloss = load_loss(args.artifact).to(args.device)
    recipe = metaloss.info["recipe"]
    lr = recipe["meta_test"].get("lr") or recipe["inner"]["lr"]
    test_options = dict(recipe["meta_test"]["task_options"])
    marks = [s for s in (0, 10, 50, 100, 300) if s <= args.steps]
    started = time.perf_counter()

    tuned, scores = None, {}
    if not args.no_tune:
        train_task = make_task(recipe["task"], recipe["task_options"], args.device)
        ce_train = train_task.builtin_losses["cross_entropy"]
        base = NamedLoss("cross_entropy", lambda i: ce_train(**i), 1.0)
        tuned, scores = tune_lr(
            train_task, base, BASELINE_LR_SWEEP, args.tasks, args.seeds, args.steps, TUNING_SEED_OFFSET
        )
        print(f"tuned CE lr on {recipe['task']} {recipe['task_options'].get('pairs')}: {tuned:g}  {scores}", flush=True)

    settings = {
        "pairs": ("mnist_binary", test_options),
        "ten": ("mnist", {k: v for k, v in test_options.items() if k not in ("pairs", "images", "test_images")}),
        "mlp": ("mnist_binary", dict(test_options, architecture="mlp")),
        "cnn_small": ("mnist_binary", dict(test_options, architecture="cnn_small")),
        "cnn_wide": ("mnist_binary", dict(test_options, architecture="cnn_wide")),
    }
    table = {"artifact": args.artifact, "lr": lr, "tuned_lr": tuned, "tuning_final_ce_by_lr": scores, "results": {}}
    for key in args.settings.split(","):
        name, options = settings[key]
        task = make_task(name, options, args.device)
        ce = task.builtin_losses["cross_entropy"]
        losses = [
            NamedLoss("learned", metaloss.as_loss_fn(), lr),
            NamedLoss("CE same lr", lambda i, ce=ce: ce(**i), lr),
        ]
        if tuned is not None:
            losses.append(NamedLoss("CE tuned lr", lambda i, ce=ce: ce(**i), tuned))
        measured = curves_at(task, losses, args.tasks, args.seeds, marks)
        rows = {}
        for loss in losses:
            ce_seeds = torch.tensor(measured[loss.label]["ce"], dtype=torch.float64)  # [seeds, marks]
            acc_seeds = torch.tensor(measured[loss.label]["accuracy"], dtype=torch.float64)
            rows[loss.label] = {
                "lr": loss.lr,
                "ce_mean": {s: float(ce_seeds[:, j].mean()) for j, s in enumerate(marks)},
                "ce_std": {s: float(ce_seeds[:, j].std(unbiased=False)) for j, s in enumerate(marks)},
                "ce_per_seed": {s: ce_seeds[:, j].tolist() for j, s in enumerate(marks)},
                "accuracy": {s: float(acc_seeds[:, j].mean()) for j, s in enumerate(marks)},
                "accuracy_per_seed": {s: acc_seeds[:, j].tolist() for j, s in enumerate(marks)},
            }
        table["results"][key] = {"task": name, "options": task.options.model_dump(mode="json"), "rows": rows}
        print(
            f"\n[{key}] {name} {options.get('architecture', 'lenet')} {options.get('pairs', 'all 10 digits')}",
            flush=True,
        )
        print(f"{'loss':<14}{'lr':>8}  " + "  ".join(f"{'step ' + str(s):>16}" for s in marks), flush=True)
        for label, row in rows.items():
            cells = [f"{row['ce_mean'][s]:.3f}±{row['ce_std'][s]:.3f}/{row['accuracy'][s]:.3f}" for s in marks]
            print(f"{label:<14}{row['lr']:>8g}  " + "  ".join(f"{c:>16}" for c in cells), flush=True)
        print(f"(cells: held-out CE mean±std over seeds / accuracy; {time.perf_counter() - started:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(table, handle, indent=1)


if __name__ == "__main__":
    main()
