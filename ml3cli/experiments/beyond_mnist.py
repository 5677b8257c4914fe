"""Beyond the paper, MNIST with all 10 classes: does a loss meta-trained on the 10-class task itself train LeNet
better than cross-entropy at cross-entropy's OWN tuned rate, and does online adaptation add to it?

The paper meta-trains on one binary digit pair; its loss, shown on 10 classes (:mod:`~ml3cli.experiments.mnist_binary`,
"10 classes, LeNet"), loses to cross-entropy at tuned rates by a wide margin. Here the recipe ``mnist10``
meta-trains on the 10-class family (new images and θ₀ per task, the meta-train random stream) and every row is
against cross-entropy at its own rate, over 300 LeNet steps:

* **meta-trained on 10 classes**: the ``mnist10`` losses, frozen;
* **+ online adaptation**: the same losses adapting while each LeNet trains (:mod:`ml3cli.engine.online`: every 10
  steps, one Adam step on φ, η = 1e-3, by the meta-gradient of the training loss through the last step), tuned
  with adaptation on as they are tested.

Protocol (:func:`~ml3cli.experiments.protocol.compare_losses`): 3 meta-train seeds; 4 test tasks × 2 test seeds (the
recipe's meta-test: 100 training and 200 held-out images per task); each loss at its own rate chosen on 2
validation tasks × 1 seed (the validation stream), on half-decades ±1 decade around the recipe's rate, widened
until interior. Metric: held-out cross-entropy after 300 steps; accuracy beside it. SGD only.
"""

from __future__ import annotations

from ml3cli.engine.online import Adaptation
from ml3cli.experiments.protocol import Context, EvalSizes, Experiment, compare_losses

#: online adaptation as the rows use it: a one-step look-ahead every 10 optimizee steps
ADAPTATION = Adaptation(every=10, lr=1e-3, unroll=1)
REPORT_STEPS = (0, 10, 100, 300)


def run(context: Context) -> list[dict]:
    """Two comparisons: the 10-class losses frozen, and adapting online."""
    sizes = EvalSizes(validation_tasks=2, validation_seeds=1, grid_span=1.0)
    return [
        compare_losses(
            context, "mnist10", label=f"sgd: {what}", adaptation=adaptation, sizes=sizes, report_steps=REPORT_STEPS
        )
        for adaptation, what in ((None, "meta-trained on 10 classes (mnist10)"), (ADAPTATION, "+ online adaptation"))
    ]


EXPERIMENT = Experiment(
    name="beyond_mnist",
    paper="beyond the paper",
    claim=(
        "a loss meta-trained on 10-class MNIST trains LeNet better than cross-entropy at cross-entropy's own tuned rate"
    ),
    recipes=("mnist10",),
    run=run,
    meta_seeds=3,
    quick=("outer.steps=10", "meta_test.steps=20"),
    quick_eval={"tasks": 2, "seeds": 2},
    cost="69 min (--jobs 2, 2 CPUs: meta-training 28 min, the two comparisons 41 min)",
)
