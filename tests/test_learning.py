"""ML³ actually learns: a loss meta-trained on y = sin(x − π) trains new optimizees on held-out shifted sines
(y = A·sin(x − ω)) faster than MSE at the same SGD learning rate.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ml3cli.engine import meta_train
from ml3cli.evaluate import NamedLoss, evaluate
from ml3cli.recipes import load_recipe
from ml3cli.tasks import make_task

REFERENCE = Path(__file__).resolve().parents[1] / "recipes" / "sine_reference.yaml"


def learned_vs_mse(recipe, eval_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Meta-train ``recipe``, then the final held-out MSE per meta-test seed for the learned loss and MSE."""
    result = meta_train(recipe, make_task(recipe.task, recipe.task_options))
    test = recipe.meta_test
    test_task = make_task(test.task, test.task_options)
    metaloss = result.metaloss
    mse = test_task.builtin_losses["mse"]
    losses = [
        NamedLoss("learned", lambda inputs: metaloss(**inputs), recipe.meta_test_lr),
        NamedLoss("mse", lambda inputs: mse(**inputs), recipe.meta_test_lr),
    ]
    learned, baseline = evaluate(test_task, losses, test.tasks, test.seeds, test.steps, eval_seed)
    assert np.array_equal(learned.at(0), baseline.at(0)), "both losses must start from the same θ₀ and tasks"
    return learned.at(test.steps), baseline.at(test.steps)


def test_learned_loss_beats_mse_on_held_out_shifted_sines():
    """A short meta-training run (the public reference's settings, 300 instead of 500 outer steps, a few
    seconds) gives a loss whose optimizees reach under 80 % of MSE's held-out error after 100 SGD steps at the
    same lr, on shifted-sine tasks that meta-training never saw.

    Seeds 0–3 of this setting give ratios 0.39–0.53 (checked when the test was written); the test uses seed 0.
    """
    recipe = load_recipe(REFERENCE, ["outer.steps=300", "meta_test.seeds=1", "meta_test.tasks=10"], seed=0)
    learned, mse = learned_vs_mse(recipe, eval_seed=1000)
    assert np.isfinite(learned).all() and np.isfinite(mse).all()
    assert learned.mean() < 0.8 * mse.mean(), f"learned {learned} vs mse {mse}"


def test_reference_recipe_beats_mse_on_every_seed():
    """recipes/sine_reference.yaml, run in full through the library, beats MSE on every meta-test seed."""
    recipe = load_recipe(REFERENCE)
    learned, mse = learned_vs_mse(recipe, eval_seed=recipe.seed)
    assert len(learned) == recipe.meta_test.seeds
    assert (learned < mse).all(), f"learned {learned} vs mse {mse}"


def test_record_at_measures_only_the_steps_asked_and_trains_the_same():
    """``record_at`` leaves NaN where nothing is measured and the same numbers where something is."""
    from ml3cli.losses import builtin_loss

    task = make_task("sine_shifted", {"points": 16, "query_points": 16, "hidden": [8]})
    loss = builtin_loss(task, "mse", 1e-2)
    every = evaluate(task, [loss], 2, 2, 6)[0]
    some = evaluate(task, [loss], 2, 2, 6, record_at=(0, 3))[0]
    np.testing.assert_array_equal(some.values[:, :, [0, 3, 6]], every.values[:, :, [0, 3, 6]])
    assert np.isnan(some.values[:, :, [1, 2, 4, 5]]).all()
