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
