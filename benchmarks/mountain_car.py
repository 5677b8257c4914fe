"""Figure 6a–b of the paper (section 4.2.3): mountain car, learned losses against iLQR.

Meta-test protocol: a fresh policy π_θ₀ (one per seed, the same θ₀ for every loss) is trained for ``--updates``
SGD updates with each loss only: the shaped learned loss, the unshaped learned loss, and the direct task loss
(``final_distance``). After every update the policy is rolled out and its final position x_T and final distance
‖s_T − goal‖ are recorded. The check: x_T ≥ 0.45 after each of the updates 2 … 50.
iLQR (control-limited, Tassa et al. 2014) optimises open-loop actions from zero on the plain cost ½‖s_T − goal‖²
(the same minimiser as the distance), and its final distance is recorded after every iteration.

    python benchmarks/mountain_car.py --loss artifacts/mountain_car_shaped.safetensors \
        --loss artifacts/mountain_car.safetensors --seeds 5 --out runs/mountain_car

writes ``trajectory.png`` (figure 6a), ``final_distance.png`` (figure 6b) and ``results.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ml3cli.artifacts import load_loss
from ml3cli.control.ilqr import ILQR, ILQRResult
from ml3cli.engine import sgd_step
from ml3cli.evaluate import NamedLoss, evaluate
from ml3cli.experiments.mountain_car import car_trajectories, final_distance_curves
from ml3cli.files import write_bytes_atomic, write_json_atomic
from ml3cli.runtime import generator
from ml3cli.tasks import make_task
from ml3cli.tasks.mountain_car import MountainCarTask


def ilqr_baseline(task: MountainCarTask, iterations: int, control_cost: float = 0.0) -> ILQRResult:
    """iLQR on the plain final cost ½‖s_T − goal‖² (+ ``control_cost``·Σ_t a_t²) from zero actions, with the action
    limits ±0.25."""
    opts = task.options
    goal = torch.tensor(opts.goal, dtype=torch.float64)
    limit = torch.tensor([task.car.max_action], dtype=torch.float64)
    solver = ILQR(
        task.car.step,
        lambda x, u, t: control_cost * (u**2).sum(),
        lambda x: 0.5 * ((x - goal) ** 2).sum(),
        opts.horizon,
        lower=-limit,
        upper=limit,
    )
    start = torch.tensor(opts.start, dtype=torch.float64)
    return solver.solve(start, torch.zeros(opts.horizon, 1, dtype=torch.float64), iterations=iterations)


def policy_trajectory(task: MountainCarTask, loss: NamedLoss, updates: int, seed: int) -> np.ndarray:
    """The states ``[T + 1, 2]`` of the policy trained with ``loss`` for ``updates`` updates (seed ``seed``)."""
    gen = generator(seed)
    batch = task.sample_tasks(1, gen)
    theta = task.init_theta(1, gen)
    with torch.no_grad():
        for _ in range(updates):
            theta = torch.func.vmap(lambda th, b: sgd_step(task, loss.fn, th, b, loss.lr))(theta, batch)
        one = {k: v[0] for k, v in theta.items()}
        states, _ = task.rollout(one, type(batch)(*(t[0] for t in batch)))
    return states.double().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss", action="append", default=[], help="a learned loss artifact (repeatable)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--lr", type=float, default=None, help="SGD lr (default: each artifact's meta-test lr)")
    parser.add_argument(
        "--direct-lr", type=float, default=None, help="lr of the direct task loss (default: --lr or 1.0)"
    )
    parser.add_argument("--ilqr-iterations", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="the first evaluation seed")
    parser.add_argument("--out", default="runs/mountain_car")
    args = parser.parse_args()
    torch.set_num_threads(1)

    task = make_task("mountain_car")
    reach = task.options.reach_x
    losses = []
    for path in args.loss:
        module = load_loss(path, expect_inputs=task.loss_inputs_spec)
        recipe = module.info["recipe"]
        if recipe.get("meta_test", {}).get("task_options"):
            task = make_task("mountain_car", recipe["meta_test"]["task_options"])
        lr = args.lr or recipe["meta_test"].get("lr") or recipe["inner"]["lr"]
        losses.append(
            NamedLoss(Path(path).name.removesuffix(".safetensors"), lambda inputs, m=module: m(**inputs), lr, path)
        )
    direct = task.builtin_losses["final_distance"]
    direct_loss = NamedLoss("direct task loss", lambda inputs: direct(**inputs), args.direct_lr or args.lr or 1.0)
    # the task loss descended directly is differentiated through the car, whatever the learned losses' setting
    # (under ``loss_gradient: policy`` the rollout is data and ‖s_T − goal‖ would have no gradient at all)
    through_car = make_task("mountain_car", task.options.model_dump() | {"loss_gradient": "dynamics"})

    curves = evaluate(task, losses, tasks=1, seeds=args.seeds, steps=args.updates, seed=args.seed)
    curves += evaluate(through_car, [direct_loss], tasks=1, seeds=args.seeds, steps=args.updates, seed=args.seed)
    losses.append(direct_loss)
    x_name = "x_T"
    results: dict = {"updates": args.updates, "seeds": args.seeds, "reach_x": reach, "losses": {}}
    print(
        f"x_T after updates (mean over {args.seeds} seeds); 'kept' = seeds with x_T ≥ {reach:g} after EACH of "
        f"updates 2 … {args.updates}"
    )
    print(
        f"{'loss':28s} {'lr':>7s} "
        + " ".join(f"{'u' + str(u):>7s}" for u in (0, 1, 2, 5, 10, 20, 50) if u <= args.updates)
        + "  min x_T(2..)  kept  final dist"
    )
    for c in curves:
        x = c.extras[x_name][:, 0, :]  # [seeds, updates + 1]
        distance = c.values[:, 0, :]
        kept = (x[:, 2:] >= reach).all(axis=1)
        results["losses"][c.label] = {
            "lr": c.lr,
            "x_T": x.tolist(),
            "final_distance": distance.tolist(),
            "kept_per_seed": kept.tolist(),
            "min_x_T_after_update_2": x[:, 2:].min(axis=1).tolist(),
        }
        marks = " ".join(f"{x[:, u].mean():7.3f}" for u in (0, 1, 2, 5, 10, 20, 50) if u <= args.updates)
        print(
            f"{c.label:28s} {c.lr:7.3g} {marks}  {x[:, 2:].min():11.3f}  {int(kept.sum())}/{args.seeds}  "
            f"{distance[:, -1].mean():.4f}"
        )

    goal = np.array(task.options.goal)
    runs = {}
    # the plain cost, and the same with a tiny control cost (it changes which local minimum iLQR finds)
    for label, control_cost in (("iLQR", 0.0), ("iLQR + 1e-6·Σa²", 1e-6)):
        ilqr = ilqr_baseline(task, args.ilqr_iterations, control_cost)
        distance = np.array([np.linalg.norm(s[-1].numpy() - goal) for s in ilqr.trajectories])
        x_final = np.array([float(s[-1, 0]) for s in ilqr.trajectories])
        runs[label] = (ilqr, distance)
        results[label] = {
            "iterations": ilqr.iterations,
            "converged": ilqr.converged,
            "control_cost": control_cost,
            "final_distance": distance.tolist(),
            "x_T": x_final.tolist(),
            "cost": ilqr.costs,
        }
        shown = " ".join(
            f"{x_final[min(i, len(x_final) - 1)]:7.3f}" for i in (0, 1, 2, 5, 10, 20, 50) if i <= args.updates
        )
        print(
            f"{label + ' (iterations)':28s} {'':7s} {shown}  final dist {distance[-1]:.2e} after {ilqr.iterations} "
            f"iterations (converged: {ilqr.converged})"
        )

    out = Path(args.out)
    figure_b = {f"{c.label} (lr {c.lr:g})": c.values[:, 0, :] for c in curves}
    for label, (_, distance) in runs.items():  # a converged iLQR run keeps its last value
        padded = np.concatenate([distance, np.full(max(0, args.updates + 1 - distance.size), distance[-1])])
        figure_b[f"{label} (iterations)"] = padded[: args.updates + 1]
    write_bytes_atomic(out / "final_distance.png", final_distance_curves(figure_b))
    trajectories = {
        f"{loss.label}, {args.updates} updates": policy_trajectory(
            through_car if loss is direct_loss else task, loss, args.updates, args.seed
        )
        for loss in losses
    }
    for label, (ilqr, _) in runs.items():
        trajectories[f"{label}, {ilqr.iterations} iterations"] = ilqr.states.numpy()
    write_bytes_atomic(
        out / "trajectory.png",
        car_trajectories(trajectories, task.options.goal, task.options.intermediate_goal, task.car.dt),
    )
    write_json_atomic(out / "results.json", results)
    print(f"wrote {out / 'trajectory.png'}, {out / 'final_distance.png'}, {out / 'results.json'}")


if __name__ == "__main__":
    main()
