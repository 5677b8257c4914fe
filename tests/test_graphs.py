"""The CUDA-graph wrapper of the meta-gradient estimators (ml3cli.engine.graphs). Here, on the CPU, every call
falls back to the wrapped estimator with its exact numbers; tests/test_cuda.py compares a replayed graph against
the eager estimator where a GPU is present."""

from __future__ import annotations

import pytest
import torch

from ml3cli.engine import build_metaloss, estimator_for, task_objective
from ml3cli.engine.graphs import GraphedEstimator, graphable, signature
from ml3cli.recipes import load_recipe
from ml3cli.runtime import generator
from ml3cli.tasks import make_task


def reference_setup(tasks: int = 4, truncate: bool = False):
    """The sine reference networks, ``tasks`` tasks, K = 3 inner steps."""
    recipe = load_recipe(
        "sine_reference", [f"inner.truncate={str(truncate).lower()}", "inner.steps=3", "inner.reset_every=3"]
    )
    task = make_task(recipe.task, recipe.task_options)
    gen = generator(0)
    metaloss = build_metaloss(recipe, task, gen)
    phi = {name: value.detach() for name, value in metaloss.named_parameters()}
    batch, theta = task.sample_tasks(tasks, gen), task.init_theta(tasks, gen)
    estimator = estimator_for(recipe.inner, task, task_objective(task, recipe.task_loss))
    return estimator, metaloss, phi, theta, batch


@pytest.mark.parametrize("truncate", [False, True])
def test_without_cuda_every_call_is_the_wrapped_estimators_own(truncate):
    estimator, metaloss, phi, theta, batch = reference_setup(truncate=truncate)
    graphed = GraphedEstimator(estimator)
    eager, wrapped = estimator.estimate(metaloss, phi, theta, batch), graphed.estimate(metaloss, phi, theta, batch)
    assert graphed.captures == graphed.replays == 0
    for name in phi:
        assert torch.equal(eager.gradient[name], wrapped.gradient[name])
    assert torch.equal(eager.task_loss, wrapped.task_loss)
    assert all(torch.equal(eager.theta[k], wrapped.theta[k]) for k in theta)
    assert graphed.task is estimator.task and graphed.optimizer == estimator.optimizer


def test_only_cuda_tensors_of_a_task_without_rollouts_and_without_a_shard_are_captured(monkeypatch):
    cpu = {"a": torch.zeros(2)}
    assert not graphable(False, None, cpu)

    class FakeCuda(torch.Tensor):
        is_cuda = True

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = {"a": torch.zeros(2).as_subclass(FakeCuda)}
    assert graphable(False, None, on_gpu)
    assert not graphable(True, None, on_gpu)  # rollouts between inner steps come from the CPU
    assert not graphable(False, object(), on_gpu)  # a shard's collectives are outside the graph
    assert not graphable(False, None, {})


def test_a_new_shape_or_dtype_needs_a_new_graph():
    base = signature(({"w": torch.zeros(4, 3)}, [torch.zeros(2)]))
    assert base == signature(({"w": torch.ones(4, 3)}, [torch.ones(2)]))  # values do not matter
    assert base != signature(({"w": torch.zeros(8, 3)}, [torch.zeros(2)]))
    assert base != signature(({"w": torch.zeros(4, 3, dtype=torch.float64)}, [torch.zeros(2)]))
    assert base != signature(({"v": torch.zeros(4, 3)}, [torch.zeros(2)]))
