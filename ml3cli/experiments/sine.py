"""Sine regression (paper, section 4.1.1, figure 2; appendix D): a loss meta-trained on y = sin(x − π) trains new
optimizees on shifted sines y = A·sin(x − ω) faster than MSE.

Protocol (:mod:`~ml3cli.experiments.protocol`): meta-train the recipe ``sine`` (K = 10 inner steps, θ re-drawn
every 100) with 5 meta-train seeds; meta-test each learned loss on the recipe's held-out ``sine_shifted`` tasks
(10 tasks × 5 test seeds, 100 SGD steps) against MSE, both at the recipe's rate (1e-3, the paper's comparison) and
each at its own rate chosen on validation sine_shifted tasks. Metric: MSE on held-out points after 100 steps.
"""

from __future__ import annotations

from ml3cli.experiments.protocol import Context, Experiment, compare_losses


def run(context: Context) -> list[dict]:
    """One comparison: the learned losses of the recipe sine against MSE on sine_shifted."""
    return [compare_losses(context, "sine")]


EXPERIMENT = Experiment(
    name="sine",
    paper="4.1.1, figure 2",
    claim="a learned loss trains sine regressors on new amplitudes and phases faster than MSE",
    recipes=("sine",),
    run=run,
    meta_seeds=5,
    quick=("outer.steps=20", "meta_test.seeds=2", "meta_test.tasks=4"),
)
