"""Through the CLI: the MNIST recipe variants (several meta-train pairs, joint inputs) and
``ml3 compare --task-option`` (the same held-out pairs with another optimizee, e.g. ``architecture=mlp``)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import REPO, run_main

from ml3cli.recipes import load_recipe

HELD_OUT = {frozenset(p) for p in ([0, 6], [1, 7], [2, 5], [3, 8])}


# -- recipes --------------------------------------------------------------------------------------------------
def test_several_pairs_recipe_shares_no_pair_with_its_meta_test():
    recipe = load_recipe(REPO / "recipes" / "mnist_binary_pairs.yaml")
    train = {frozenset(p) for p in recipe.task_options["pairs"]}
    test = {frozenset(p) for p in recipe.meta_test.task_options["pairs"]}
    assert len(train) >= 2 and test == HELD_OUT and not train & test
    # the same settings as the one-pair recipe otherwise, except M_φ's ELU (ReLU units died on five pairs)
    one = load_recipe(REPO / "recipes" / "mnist_binary.yaml")
    assert recipe.inner == one.inner and recipe.outer == one.outer
    assert recipe.meta_loss.activation == "elu" and recipe.meta_loss.hidden == one.meta_loss.hidden
    assert recipe.meta_test == one.meta_test


def test_joint_recipe_uses_joint_inputs_on_both_sides():
    recipe = load_recipe(REPO / "recipes" / "mnist_binary_joint.yaml")
    assert recipe.task_options["inputs"] == recipe.meta_test.task_options["inputs"] == "joint"
    assert {frozenset(p) for p in recipe.meta_test.task_options["pairs"]} == HELD_OUT
    assert not {frozenset(p) for p in recipe.task_options["pairs"]} & HELD_OUT


# -- compare --task-option ------------------------------------------------------------------------------------
@pytest.fixture
def tiny_artifact(tmp_path):
    """A class-wise loss saved with a recipe that records a tiny meta-test on two held-out pairs (LeNet)."""
    from ml3cli import MetaLoss, save_loss
    from ml3cli.tasks.mnist import CLASSWISE_INPUTS

    train = {"pairs": [[4, 9]], "images": 8, "test_images": 8, "architecture": "mlp", "hidden": [8]}  # fast tuning
    test = {"pairs": [[0, 6], [1, 7]], "images": 8, "test_images": 8, "architecture": "lenet"}
    recipe = {
        "task": "mnist_binary",
        "task_options": train,
        "inner": {"lr": 1e-2},
        "meta_test": {"task": "mnist_binary", "task_options": test, "tasks": 2, "seeds": 1, "steps": 3, "lr": 1e-2},
    }
    info = {"task": "mnist_binary", "test_task": "mnist_binary", "recipe": recipe}
    return save_loss(tmp_path / "tiny.safetensors", MetaLoss(CLASSWISE_INPUTS, (8, 8)), info)


def spy_on_the_tuning(monkeypatch) -> dict[str, list]:
    """Record what `ml3 compare --tune-baseline-lr` tunes on: the options of the task handed to tune_lr, the random
    stream of every evaluation inside and outside the sweep, and every task batch drawn in either phase."""
    import ml3cli.commands.compare as compare
    import ml3cli.evaluate as evaluation
    from ml3cli.tasks.mnist import MnistBinary

    seen: dict[str, list] = {"phase": ["test"], "tuned_on": [], "streams": [], "batches": []}
    real_tune, real_sample = compare.tune_lr, MnistBinary.sample_tasks

    def tune_lr(task, *args, **kwargs):
        seen["tuned_on"].append(task.options.model_dump(mode="json"))
        seen["phase"].append("tuning")
        try:
            return real_tune(task, *args, **kwargs)
        finally:
            seen["phase"].pop()

    def spied(real):
        def evaluate(*args, **kwargs):
            seen["streams"].append((seen["phase"][-1], kwargs.get("stream", "test")))
            return real(*args, **kwargs)

        return evaluate

    def sample_tasks(self, n, generator):
        batch = real_sample(self, n, generator)
        seen["batches"].append((seen["phase"][-1], batch))
        return batch

    monkeypatch.setattr(compare, "tune_lr", tune_lr)
    monkeypatch.setattr(compare, "evaluate", spied(compare.evaluate))
    monkeypatch.setattr(evaluation, "evaluate", spied(evaluation.evaluate))
    monkeypatch.setattr(MnistBinary, "sample_tasks", sample_tasks)
    return seen


def test_compare_task_option_overrides_the_recorded_test_options(tiny_artifact, tmp_path, monkeypatch, capsys):
    """--task-option changes only the named options: the recorded held-out pairs and sizes stay, the optimizee is
    the MLP asked for (its θ has no conv weights), and the baseline's rate is tuned on validation tasks of exactly
    that test family (its pairs and optimizee, not the meta-train pair), never on a test task."""
    json_path = tmp_path / "cmp.json"
    seen = spy_on_the_tuning(monkeypatch)
    result = run_main(
        monkeypatch, capsys, "compare", "--task", "mnist_binary", "--loss", tiny_artifact, "--loss", "cross_entropy",
        "--task-option", "architecture=mlp", "--task-option", "hidden=[16]", "--tune-baseline-lr",
        "--json", json_path, "--out-dir", tmp_path / "o", "--quiet", cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    document = json.loads(json_path.read_text())
    options = document["task_options"]
    assert options["architecture"] == "mlp" and options["hidden"] == [16]
    assert options["pairs"] == [[0, 6], [1, 7]] and options["images"] == 8 and options["test_images"] == 8
    assert document["tasks"] == 2 and document["steps"] == 3 and len(document["seeds"]) == 1
    assert [loss["name"] for loss in document["losses"]] == ["tiny", "cross_entropy", "cross_entropy (tuned lr)"]
    assert seen["tuned_on"] == [options] and options["pairs"] != [[4, 9]]  # the test family, not the meta-train
    assert {stream for phase, stream in seen["streams"] if phase == "tuning"} == {"validation"}
    assert [stream for phase, stream in seen["streams"] if phase == "test"] == ["test"]
    tuning = [b for phase, b in seen["batches"] if phase == "tuning"]
    tested = [b for phase, b in seen["batches"] if phase == "test"]
    assert tuning and tested
    for b in tuning:
        assert not any(torch.equal(b.x_train, t.x_train) or torch.equal(b.x_test, t.x_test) for t in tested)
    assert document["baseline_lr_tuning"]["stream"] == "validation"
    monkeypatch.undo()

    # without the option: the recorded LeNet (a different optimizee, so a different initial cross-entropy)
    plain = tmp_path / "plain.json"
    result = run_main(
        monkeypatch, capsys, "compare", "--task", "mnist_binary", "--loss", tiny_artifact, "--loss", "cross_entropy",
        "--json", plain, "--out-dir", tmp_path / "p", "--quiet", cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    lenet = json.loads(plain.read_text())
    assert lenet["task_options"]["architecture"] == "lenet"
    assert lenet["losses"][0]["mean"][0] != document["losses"][0]["mean"][0]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("architecture", r"--task-option 'architecture': expected KEY=VALUE"),
        ("architecture=resnet", r"--task-option.*architecture"),
        ("test_images=7", r"--task-option.*test_images"),
    ],
)
def test_compare_refuses_a_bad_task_option(tiny_artifact, tmp_path, monkeypatch, capsys, option, message):
    result = run_main(
        monkeypatch, capsys, "compare", "--task", "mnist_binary", "--loss", tiny_artifact, "--task-option", option,
        "--out-dir", tmp_path / "o", "--quiet", cwd=tmp_path,
    )  # fmt: skip
    assert result.code != 0
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "o").exists()
