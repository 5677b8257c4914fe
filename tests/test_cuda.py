"""``--device cuda`` / ``auto``: every torch task meta-trains and meta-tests on a GPU with the numbers of
the CPU (sampling stays on a CPU generator, so a seed means the same tasks on both). Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TINY_RECIPE

from ml3cli.engine import meta_train
from ml3cli.evaluate import NamedLoss, evaluate
from ml3cli.recipes import recipe_from_dict
from ml3cli.runtime import resolve_device
from ml3cli.tasks import make_task

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

MNIST = {"pairs": [[4, 9]], "images": 16, "test_images": 16, "architecture": "lenet"}
CASES = {
    "sine": ("sine", {"points": 16, "query_points": 16, "hidden": [8, 8]}, {}),
    "sine_frequency": ("sine_frequency", {"points": 16, "query_points": 16}, {"param_distance": 1.0}),
    "mnist_binary": ("mnist_binary", MNIST, {}),
}


def recipe_for(name: str, device: str):
    task, options, extra = CASES[name]
    data = copy.deepcopy(TINY_RECIPE)
    data.update(task=task, task_options=options, device=device)
    data["task_loss"] = {"weight": 1.0, "extra": extra}
    data["meta_test"] = {"task": task, "task_options": options, "tasks": 2, "seeds": 1, "steps": 3}
    data["outer"]["steps"] = 5
    return recipe_from_dict(data)


def test_auto_is_the_cpu_without_cuda():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")


@requires_cuda
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_meta_training_matches_the_cpu(name):
    results = {}
    for device in ("cpu", "cuda"):
        recipe = recipe_for(name, device)
        task = make_task(recipe.task, recipe.task_options, device)
        results[device] = meta_train(recipe, task).metaloss.state_dict()
    for key, value in results["cpu"].items():
        torch.testing.assert_close(results["cuda"][key].cpu(), value, rtol=1e-3, atol=1e-5, msg=key)


@requires_cuda
def test_cuda_meta_test_matches_the_cpu():
    curves = {}
    for device in ("cpu", "cuda"):
        task = make_task("sine_shifted", {"points": 16, "query_points": 16, "hidden": [8, 8]}, device)
        mse = NamedLoss("mse", lambda inputs: ((inputs["y_pred"] - inputs["y_true"]) ** 2).mean(), 0.01)
        curves[device] = evaluate(task, [mse], tasks=3, seeds=2, steps=5)[0].values
    assert abs(curves["cuda"] - curves["cpu"]).max() < 1e-4


@requires_cuda
def test_a_replayed_cuda_graph_gives_the_eager_meta_gradient():
    """GraphedEstimator on the GPU: captured once per shape, replayed with new values, the numbers of the eager
    estimator on the same inputs (the same kernels on the same data)."""
    from test_graphs import reference_setup
    from torch.utils._pytree import tree_map

    from ml3cli.engine.graphs import GraphedEstimator

    estimator, metaloss, phi, theta, batch = reference_setup(tasks=8)
    metaloss = metaloss.cuda()
    phi, theta, batch = tree_map(lambda t: t.cuda(), (phi, theta, batch))
    graphed = GraphedEstimator(estimator)
    for scale in (1.0, 0.5, 2.0):  # new values in the same shapes: one capture, then replays
        moved = {k: v * scale for k, v in phi.items()}
        eager, replayed = (
            estimator.estimate(metaloss, moved, theta, batch),
            graphed.estimate(metaloss, moved, theta, batch),
        )
        for name in phi:
            torch.testing.assert_close(replayed.gradient[name], eager.gradient[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(replayed.task_loss, eager.task_loss, rtol=1e-5, atol=1e-6)
    assert (graphed.captures, graphed.replays) == (1, 3)
