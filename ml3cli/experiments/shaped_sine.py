"""Loss shaping with extra information (paper, sections 3.3 and 4.2.1, figure 5a–b): sine FREQUENCY regression,
ŷ = sin(θx) from θ₀ = 0.1, whose MSE landscape has many local minima. Meta-trained with the extra term (θ' − ν)²
only, the learned loss is one smooth basin around the true frequency ν, so plain SGD on it finds ν where SGD on MSE
gets stuck.

Protocol (:mod:`~ml3cli.experiments.protocol`): meta-train the recipe ``shaped_sine`` with 5 meta-train seeds;
meta-test on the recipe's 40 held-out frequencies × 5 test seeds, 50 SGD steps from θ₀ = 0.1, against MSE at the
recipe's rate (1.0) and each at its own rate chosen on validation frequencies. Metric: |θ − ν| after 50 steps (the
task never shows ν to the loss at meta-test).
"""

from __future__ import annotations

from ml3cli.experiments.protocol import Context, Experiment, compare_losses


def run(context: Context) -> list[dict]:
    """One comparison on |θ − ν|: the shaped learned losses against MSE."""
    return [compare_losses(context, "shaped_sine", metric="|θ−ν|", report_steps=(0, 1, 5, 10, 50))]


EXPERIMENT = Experiment(
    name="shaped_sine",
    paper="4.2.1, figure 5a–b",
    claim="a loss shaped with the true frequency during meta-training finds it at meta-test, where MSE gets stuck",
    recipes=("shaped_sine",),
    run=run,
    meta_seeds=5,
    quick=("outer.steps=30", "meta_test.seeds=2", "meta_test.tasks=8"),
)
