"""Meta-test sweeps train every (seed × loss × rate) optimizee of a supervised task in one batched computation
(ml3cli.evaluate.evaluate_together): the numbers must be those of training each seed and loss by itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ml3cli.engine import learned_loss_fn
from ml3cli.engine.inner_optimizers import SGD, Adam
from ml3cli.evaluate import NamedLoss, evaluate
from ml3cli.losses import builtin_loss
from ml3cli.metaloss import MetaLoss
from ml3cli.tasks import make_task


def sweep(task, learned_fn=None):
    """A rate search's shape: one function at several rates, another loss beside it, and a learned loss."""
    mse = builtin_loss(task, "mse" if "mse" in task.builtin_losses else next(iter(task.builtin_losses)), 1e-2)
    losses = [NamedLoss(f"{mse.label}@{lr}", mse.fn, lr) for lr in (3e-3, 1e-2, 3e-2, 0.1)]
    other = next(name for name in task.builtin_losses if name != mse.label.split(" ")[0])
    losses.append(builtin_loss(task, other, 2e-2))
    if learned_fn is not None:
        losses += [NamedLoss("learned@1e-2", learned_fn, 1e-2), NamedLoss("learned@1e-3", learned_fn, 1e-3)]
    return losses


def learned(task):
    """M_φ at a random φ (the batched and the looped sweep must agree for any φ)."""
    torch.manual_seed(0)
    metaloss = MetaLoss(task.loss_inputs_spec, hidden=(8, 8))
    return learned_loss_fn(metaloss, {name: p.detach() for name, p in metaloss.named_parameters()})


@pytest.mark.parametrize(
    ("name", "options", "optimizer"),
    [
        ("sine_shifted", {"points": 16, "query_points": 16, "hidden": [8, 8]}, "sgd"),
        ("sine_shifted", {"points": 16, "query_points": 16, "hidden": [8, 8]}, "adam"),
        ("sine_frequency", {"points": 16, "query_points": 16}, "sgd"),
        ("mnist_binary", {"images": 8, "test_images": 8}, "sgd"),
    ],
)
def test_batched_sweeps_give_the_numbers_of_one_seed_and_loss_at_a_time(name, options, optimizer):
    task = make_task(name, options)
    losses = sweep(task, learned(task))
    inner = Adam() if optimizer == "adam" else SGD()
    alone = evaluate(task, losses, 3, [4, 0, 7], 6, optimizer=inner, together=False)
    together = evaluate(task, losses, 3, [4, 0, 7], 6, optimizer=inner)
    for a, b in zip(alone, together, strict=True):
        assert (a.label, a.lr) == (b.label, b.lr)
        np.testing.assert_allclose(b.values, a.values, rtol=1e-6, atol=1e-7)
        assert set(a.extras) == set(b.extras)
        for key in a.extras:
            np.testing.assert_allclose(b.extras[key], a.extras[key], rtol=1e-6, atol=1e-7)


def test_small_batches_give_the_same_numbers_as_one(monkeypatch):
    """With room for one (seed, loss) pair per batch the sweep is split into many; the numbers do not change."""
    from ml3cli import evaluate as module

    task = make_task("sine_shifted", {"points": 16, "query_points": 16, "hidden": [8, 8]})
    losses = sweep(task)
    whole = module.evaluate(task, losses, 2, 3, 5)
    monkeypatch.setattr(module, "BATCH_ELEMENTS", 1)
    done = []
    split = module.evaluate(task, losses, 2, 3, 5, on_seed=done.append)
    assert done[-1] == 3 and done == sorted(done)
    for a, b in zip(whole, split, strict=True):
        np.testing.assert_array_equal(a.values, b.values)
