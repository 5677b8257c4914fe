"""Binary MNIST (paper, section 4.1.1, appendix D): a loss meta-trained on ONE digit pair with LeNet trains LeNet on
other digit pairs faster than cross-entropy; the same class-wise loss also trains the 10-class task and another
optimizee (the transfer rows).

Protocol (:mod:`~ml3cli.experiments.protocol`): meta-train the recipe ``mnist_binary`` (pair 4/9, class-wise
inputs (p_c, y_c)) with 3 meta-train seeds; meta-test each learned loss against cross-entropy, at the recipe's
rate (1e-3) and each at its own rate chosen on validation tasks of the test family, on: the held-out pairs
0/6, 1/7, 2/5, 3/8 with LeNet (the paper's row); the 10-class task with LeNet; the held-out pairs with an MLP
optimizee. Metric: held-out cross-entropy after 100 SGD steps; the accuracy of every loss is reported beside it.

Cost: one evaluation of LeNet (4 tasks × 2 seeds × 100 steps) takes about 30 s on one CPU thread (60 s for the
10-class task), so the rates are tuned on a smaller validation split (2 tasks × 1 seed of the held-out family, from
the validation stream) on a grid starting at 1e-3 × 10^(k/2), |k| ≤ 2, widened while an edge wins.
"""

from __future__ import annotations

from ml3cli.experiments.protocol import Context, EvalSizes, Experiment, compare_losses

#: LeNet is costly on a CPU: the rates are tuned on 2 validation tasks × 1 seed, on a grid ±1 decade to start
TUNING = EvalSizes(validation_tasks=2, validation_seeds=1, grid_span=1.0)


def run(context: Context) -> list[dict]:
    """Three comparisons: held-out pairs (LeNet), 10 classes (LeNet), held-out pairs (MLP); --quick: the first."""
    paper_row = compare_losses(context, "mnist_binary", label="held-out pairs, LeNet", sizes=TUNING)
    if context.quick:  # LeNet's comparisons dominate a smoke run's time on a CPU
        return [paper_row]
    return [
        paper_row,
        compare_losses(
            context, "mnist_binary", test_task="mnist",
            test_options={"images": 100, "test_images": 200, "architecture": "lenet", "inputs": "classwise"},
            label="10 classes, LeNet", sizes=TUNING,
        ),
        compare_losses(context, "mnist_binary", test_options={"architecture": "mlp"}, label="held-out pairs, MLP",
                       sizes=TUNING),
    ]  # fmt: skip


EXPERIMENT = Experiment(
    name="mnist_binary",
    paper="4.1.1, appendix D",
    claim="a loss learned on one digit pair trains LeNet on other pairs faster than cross-entropy",
    recipes=("mnist_binary",),
    run=run,
    meta_seeds=3,
    quick=("outer.steps=10", "meta_test.steps=20"),
    quick_eval={"tasks": 2, "seeds": 2},
)
