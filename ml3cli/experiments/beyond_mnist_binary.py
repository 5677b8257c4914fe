"""Beyond the paper, binary MNIST: does the loss learned on one digit pair train LeNet on the held-out pairs better
than cross-entropy at cross-entropy's OWN tuned rate, with SGD and with Adam, and does online adaptation add to it?

The paper's comparison (:mod:`~ml3cli.experiments.mnist_binary`) is at one rate and 100 steps. Here every row is
against cross-entropy at its own rate, over 300 steps, trained with the same optimizer:

* **plain ML³**: the recipe ``mnist_binary`` (pair 4/9, class-wise inputs, K = 10, α = 1e-3), its losses frozen;
* **+ online adaptation**: the same losses adapting online while each LeNet trains (:mod:`ml3cli.engine.online`:
  every 10 steps, one Adam step on φ by the meta-gradient of the training loss through the last step; η = 1e-3),
  tuned with adaptation on as they are tested. (After every step, as for sine, the tuning of one row alone took
  12.5 minutes: a meta-gradient through LeNet costs several of its steps.)

With Adam every optimizee trains with Adam (β = 0.9, 0.999) and every rate is tuned for Adam; the losses were
meta-trained for SGD.

Protocol (:func:`~ml3cli.experiments.protocol.compare_losses`): 3 meta-train seeds; the held-out pairs 0/6, 1/7,
2/5, 3/8 (4 tasks × 2 test seeds, the recipe's meta-test); each loss at its own rate chosen on 2 validation tasks × 1
seed of the held-out family (the validation stream), on half-decades ±1 decade around 1e-3, widened until
interior. Metric: held-out cross-entropy after 300 steps; accuracy beside it. A LeNet evaluation is costly on a CPU
(about 30 s per 100 steps of 4 tasks × 2 seeds), which sets these sizes.
"""

from __future__ import annotations

from ml3cli.engine.online import Adaptation
from ml3cli.experiments.protocol import Context, EvalSizes, Experiment, compare_losses

#: online adaptation as the rows use it: a one-step look-ahead every 10 optimizee steps
ADAPTATION = Adaptation(every=10, lr=1e-3, unroll=1)
#: LeNet steps per optimizee, and the quick run's
STEPS, QUICK_STEPS = 300, 20
REPORT_STEPS = (0, 10, 100, 300)


def run(context: Context) -> list[dict]:
    """Two comparisons per optimizer (SGD, Adam): plain ML³, and the same adapting online."""
    sizes = EvalSizes(
        steps=QUICK_STEPS if context.quick else STEPS, validation_tasks=2, validation_seeds=1, grid_span=1.0
    )
    rows = []
    for optimizer in ("sgd", "adam"):
        for adaptation, what in ((None, "plain ML³"), (ADAPTATION, "+ online adaptation")):
            rows.append(
                compare_losses(
                    context, "mnist_binary", label=f"{optimizer}: {what}", optimizer=optimizer, adaptation=adaptation,
                    sizes=sizes, report_steps=REPORT_STEPS,
                )
            )  # fmt: skip
    return rows


EXPERIMENT = Experiment(
    name="beyond_mnist_binary",
    paper="beyond the paper",
    claim=(
        "a loss learned on one digit pair trains LeNet on held-out pairs better than cross-entropy at "
        "cross-entropy's own tuned rate, with SGD and with Adam"
    ),
    recipes=("mnist_binary",),
    run=run,
    meta_seeds=3,
    quick=("outer.steps=10", "meta_test.steps=20"),
    quick_eval={"tasks": 2, "seeds": 2},
)
