"""Model-free RL results (paper, figure 4): a learned loss against PPO at meta-test, and across policy architectures.

For each seed s: the goals and θ₀ are drawn from ``generator(seed_base + s)`` (never the meta-training draws);
the learned loss trains every goal's policy with plain SGD (algorithm 5, ``ml3cli.evaluate.train_curve``) and PPO
(``ml3cli.baselines.ppo``) trains the same θ₀ on the same goals with the same rollout code and the same samples per
update (``episodes × horizon``). Both are scored on fresh evaluation rollouts before the first and after every
update with the paper's metric (ReacherGoal: mean trajectory sum of −d; AntGoal: of d₀ − d).

Printed: the metric (mean ± std over seeds of the mean over goals) against environment samples, and the samples
each method needs to reach 80% of its final improvement (mean curve over goals and seeds, "final" = the mean of
the last 10% of updates), with the ratio PPO / learned. ``--architectures 1 2 3 4`` adds the figure 4c–d table:
the same learned loss on policies with 1 … 4 hidden layers (mean ± std over the goals, seed ``seed_base``).

    python benchmarks/mfrl_reacher.py artifacts/mfrl_reacher.safetensors --goals 10 --seeds 3 --updates 50 \
        --architectures 1 2 3 4 --out runs/mfrl_reacher
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ml3cli.artifacts import load_loss, read_info
from ml3cli.baselines.ppo import PPOConfig, train_ppo
from ml3cli.evaluate import train_curve
from ml3cli.files import write_json_atomic
from ml3cli.runtime import generator
from ml3cli.tasks import make_task


def samples_to_fraction(curve: np.ndarray, samples: np.ndarray, fraction: float = 0.8) -> float | None:
    """Environment samples until ``curve`` first reaches start + fraction · (final − start) (final: mean of the last
    10% of points); None if it never improves."""
    start = curve[0]
    final = curve[-max(1, len(curve) // 10) :].mean()
    if final <= start:
        return None
    hits = np.nonzero(curve >= start + fraction * (final - start))[0]
    return float(samples[hits[0]])


def learned_curve(task, loss_fn, lr: float, goals: int, updates: int, seed: int) -> np.ndarray:
    """``performance[update, goal]`` of the learned loss (same draws as :func:`ppo_curve` for the same seed)."""
    gen = generator(seed)
    batch, theta = task.sample_tasks(goals, gen), task.init_theta(goals, gen)
    _, extras = train_curve(task, loss_fn, theta, batch, lr, updates, report=True, gen=gen)
    return extras["performance"].double().numpy()


def ppo_curve(task, goals: int, updates: int, seed: int, config: PPOConfig) -> np.ndarray:
    gen = generator(seed)
    batch, theta = task.sample_tasks(goals, gen), task.init_theta(goals, gen)
    return train_ppo(task, theta, batch, updates, gen, config).performance


def fmt(values: np.ndarray) -> str:
    return f"{values.mean():8.3f} ± {values.std():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("loss", help="a learned-loss artifact from `ml3 meta-train recipes/mfrl_*.yaml`")
    parser.add_argument("--goals", type=int, default=10, help="held-out goals per seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed-base", type=int, default=1000, help="seed s draws goals and θ₀ from seed_base + s")
    parser.add_argument("--updates", type=int, default=50, help="policy updates (each one fresh rollout)")
    parser.add_argument("--lr", type=float, default=None, help="SGD lr of the learned loss (default: the recipe's)")
    parser.add_argument("--ppo-lr", type=float, default=PPOConfig.lr)
    parser.add_argument("--architectures", type=int, nargs="*", default=[], help="hidden layers to transfer to")
    parser.add_argument("--width", type=int, default=64, help="hidden width of the transfer policies")
    parser.add_argument("--out", type=Path, default=Path("runs/mfrl_reacher"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    info = read_info(args.loss)
    recipe = info["recipe"]
    test = recipe["meta_test"]
    options = dict(test.get("task_options") or {})
    task = make_task(test["task"], options)
    metaloss = load_loss(args.loss, expect_inputs=task.loss_inputs_spec)
    loss_fn = metaloss.as_loss_fn()
    lr = args.lr or test.get("lr") or recipe["inner"]["lr"]
    per_update = task.options.episodes * task.options.horizon
    samples = np.arange(args.updates + 1) * per_update
    config = PPOConfig(lr=args.ppo_lr)

    started = time.perf_counter()
    learned = np.stack(
        [learned_curve(task, loss_fn, lr, args.goals, args.updates, args.seed_base + s) for s in range(args.seeds)]
    )  # fmt: skip  [seed, update, goal]
    learned_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ppo = np.stack([ppo_curve(task, args.goals, args.updates, args.seed_base + s, config) for s in range(args.seeds)])
    ppo_seconds = time.perf_counter() - started

    print(f"{test['task']}: {args.goals} held-out goals × {args.seeds} seeds, {per_update} samples per update, "
          f"learned loss SGD lr {lr:g}, PPO Adam lr {args.ppo_lr:g} (CleanRL defaults)")  # fmt: skip
    print(
        f"metric: {'Σ_t −d_t' if task.spec.metric == 'neg_distance' else 'Σ_t (d_0 − d_t)'} per episode, "
        "mean over goals; mean ± std over seeds"
    )
    print(f"{'samples':>8} | {'learned loss':>18} | {'PPO':>18}")
    marks = sorted({0, 1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, args.updates} & set(range(args.updates + 1)))
    rows = []
    for u in marks:
        lm, pm = learned[:, u].mean(-1), ppo[:, u].mean(-1)
        print(f"{samples[u]:8d} | {fmt(lm)} | {fmt(pm)}")
        rows.append({"update": u, "samples": int(samples[u]), "learned": lm.tolist(), "ppo": pm.tolist()})
    mean_l, mean_p = learned.mean((0, 2)), ppo.mean((0, 2))
    to_l, to_p = samples_to_fraction(mean_l, samples), samples_to_fraction(mean_p, samples)
    ratio = (to_p / to_l) if to_l and to_p else None
    print(f"samples to 80% of the final improvement: learned {to_l}, PPO {to_p}, ratio PPO/learned "
          f"{'n/a' if ratio is None else f'{ratio:.2f}'}")  # fmt: skip
    reach = np.nonzero(mean_l >= mean_p[-1])[0]
    print(
        f"samples for the learned loss to reach PPO's final level ({mean_p[-1]:.3f}): "
        f"{int(samples[reach[0]]) if reach.size else 'not reached'} of {int(samples[-1])}"
    )
    print(f"time: learned {learned_seconds:.0f} s, PPO {ppo_seconds:.0f} s (2 shared CPU cores, contended)")

    transfer = {}
    if args.architectures:
        print(f"\narchitecture transfer (figure 4c–d): the same loss, policies with k hidden layers of {args.width}; "
              f"mean ± std over {args.goals} goals (seed {args.seed_base})")  # fmt: skip
        print(f"{'layers':>6} | {'before':>18} | {'after ' + str(args.updates) + ' updates':>22}")
        for k in args.architectures:
            arch_task = make_task(test["task"], options | {"hidden": [args.width] * k})
            curve = learned_curve(arch_task, loss_fn, lr, args.goals, args.updates, args.seed_base)
            transfer[k] = curve.tolist()
            print(f"{k:6d} | {fmt(curve[0])} | {fmt(curve[-1])}")

    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "results.json", {
        "task": test["task"], "samples_per_update": per_update, "goals": args.goals, "seeds": args.seeds,
        "seed_base": args.seed_base, "learned_lr": lr, "ppo": vars(config) | {"value_hidden": list(config.value_hidden)},
        "learned": learned.tolist(), "ppo_curves": ppo.tolist(), "table": rows,
        "samples_to_80pct": {"learned": to_l, "ppo": to_p, "ratio": ratio}, "architectures": transfer,
    })  # fmt: skip
    plot(args.out / "curves.png", samples, learned, ppo, transfer, test["task"])
    print(f"wrote {args.out / 'results.json'} and {args.out / 'curves.png'}")


def plot(path: Path, samples, learned, ppo, transfer, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if transfer else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    for label, values in (("ML³ learned loss", learned), ("PPO", ppo)):
        per_seed = values.mean(-1)
        mean, std = per_seed.mean(0), per_seed.std(0)
        ax.plot(samples, mean, label=label)
        ax.fill_between(samples, mean - std, mean + std, alpha=0.2)
    ax.set(xlabel="environment samples", ylabel="performance (higher is better)", title=f"{title}: meta-test")
    ax.legend()
    if transfer:
        ax = axes[0, 1]
        for k, curve in transfer.items():
            curve = np.asarray(curve)
            mean, std = curve.mean(-1), curve.std(-1)
            ax.plot(samples, mean, label=f"{k} hidden layer{'s' if k > 1 else ''}")
            ax.fill_between(samples, mean - std, mean + std, alpha=0.15)
        ax.set(xlabel="environment samples", title="architecture transfer (std over goals)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
