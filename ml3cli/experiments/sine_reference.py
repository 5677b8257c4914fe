"""Sine regression with the public reference implementation's settings (paper, section 4.1.1), so that its
numbers compare side by side: one inner step, θ re-drawn every outer step, meta-loss 2→50→50→1 without biases.

Protocol (:mod:`~ml3cli.experiments.protocol`): meta-train the recipe ``sine_reference`` with 5 meta-train seeds;
meta-test on 10 held-out ``sine_shifted`` tasks with x ∈ [−5, 5] × 5 test seeds, 100 SGD steps, against MSE at
the recipe's rate (1e-3) and each at its own rate chosen on validation tasks. Metric: MSE after 100 steps.
"""

from __future__ import annotations

from ml3cli.experiments.protocol import Context, Experiment, compare_losses


def run(context: Context) -> list[dict]:
    """One comparison: the learned losses of the recipe sine_reference against MSE on sine_shifted."""
    return [compare_losses(context, "sine_reference")]


EXPERIMENT = Experiment(
    name="sine_reference",
    paper="4.1.1 (the public reference's settings)",
    claim="with the reference's one-step settings, the learned loss beats MSE after 100 steps (2.22 vs 3.59 there)",
    recipes=("sine_reference",),
    run=run,
    meta_seeds=5,
    quick=("outer.steps=20", "meta_test.seeds=2", "meta_test.tasks=4"),
)
