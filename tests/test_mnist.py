"""MNIST digit tasks: the shipped data and its loader, the task families, the recipe, a tiny meta-training."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch
from helpers import REPO
from torch.func import functional_call

from ml3cli.errors import ML3Error
from ml3cli.recipes import load_recipe
from ml3cli.runtime import generator
from ml3cli.tasks import make_task
from ml3cli.tasks import mnist as mn


def one(batch, i: int = 0):
    return type(batch)(*(t[i] for t in batch))


# -- data -----------------------------------------------------------------------------------------------------
def test_shipped_data_shapes_balance_and_checksum():
    images, labels = mn.load_digits()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10
    assert hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest() == mn.DATA_SHA256
    assert images.max() == 255 and images.min() == 0
    assert (mn.DATA_FILE.parent / "MNIST_5K_NOTICE.txt").read_text().count("Sebastian Raschka") >= 1


def test_split_is_deterministic_disjoint_and_balanced():
    _, labels = mn.load_digits()
    first, again = mn.split_indices(labels), mn.split_indices(labels)
    other = mn.split_indices(labels, seed=1)
    for digit in range(10):
        train, test = first[digit]
        assert train.size == 400 and test.size == mn.TEST_PER_DIGIT == 100
        assert not set(train) & set(test)
        assert (labels[train] == digit).all() and (labels[test] == digit).all()
        assert np.array_equal(train, again[digit][0]) and np.array_equal(test, again[digit][1])
    assert any(not np.array_equal(first[d][1], other[d][1]) for d in range(10))


def _copy_npz(tmp_path, **arrays):
    path = tmp_path / "digits.npz"
    np.savez_compressed(path, **arrays)
    return path


def test_corrupt_data_files_are_refused(tmp_path):
    images, labels = mn.load_digits()
    flipped = images.copy()
    flipped[0, 14, 14] ^= 1
    with pytest.raises(ML3Error, match="digits.npz: checksum mismatch"):
        mn.load_digits(_copy_npz(tmp_path, images=flipped, labels=labels))
    with pytest.raises(ML3Error, match="expected arrays 'images' and 'labels'"):
        mn.load_digits(_copy_npz(tmp_path, pixels=images, labels=labels))
    with pytest.raises(ML3Error, match="corrupt MNIST data file"):
        mn.load_digits(_copy_npz(tmp_path, images=images.astype(np.float32), labels=labels))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(mn.DATA_FILE.read_bytes()[:5000])
    with pytest.raises(ML3Error, match="truncated.npz: corrupt or unreadable"):
        mn.load_digits(truncated)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, images=np.array([object()], dtype=object), labels=labels)
    with pytest.raises(ML3Error, match="pickled.npz: corrupt or unreadable"):
        mn.load_digits(pickled)
    with pytest.raises(ML3Error, match="not found"):
        mn.load_digits(tmp_path / "missing.npz")
    good = tmp_path / "good.npz"
    shutil.copy(mn.DATA_FILE, good)
    assert mn.load_digits(good)[0].shape == (5000, 28, 28)


# -- tasks ----------------------------------------------------------------------------------------------------
def test_binary_tasks_are_balanced_pairs_from_the_right_pools():
    pairs = [[0, 6], [1, 7], [2, 5], [3, 8]]
    task = make_task("mnist_binary", {"pairs": pairs, "images": 16, "test_images": 20})
    batch = task.sample_tasks(4, generator(0))
    assert batch.x_train.shape == (4, 16, 1, 28, 28) and batch.x_test.shape == (4, 20, 1, 28, 28)
    assert batch.y_train.shape == (4, 16, 2) and batch.y_test.shape == (4, 20, 2)
    assert sorted(map(tuple, batch.digits.tolist())) == sorted(map(tuple, pairs))  # 4 tasks: each pair once
    assert batch.y_train.sum(1).tolist() == [[8.0, 8.0]] * 4 and batch.y_test.sum(1).tolist() == [[10.0, 10.0]] * 4
    # every image is one of its class's digit, training images from the training pool, held-out from the held-out
    x_all, split = mn._dataset()
    for i in range(4):
        for x, y, pool in ((batch.x_train[i], batch.y_train[i], 0), (batch.x_test[i], batch.y_test[i], 1)):
            for image, label in zip(x, y.argmax(-1), strict=True):
                digit = int(batch.digits[i, label])
                candidates = x_all[split[digit][pool]]
                assert (candidates == image).flatten(1).all(1).any()


def test_ten_class_task_and_joint_inputs():
    ten = make_task("mnist", {"images": 30, "test_images": 20, "inputs": "joint"})
    assert [i.size for i in ten.loss_inputs_spec] == [10, 10] and ten.input_names() == ("log_prob", "onehot")
    batch, theta = ten.sample_tasks(2, generator(0)), ten.init_theta(2, generator(1))
    assert batch.digits.tolist() == [list(range(10))] * 2
    inputs = ten.loss_inputs({k: v[0] for k, v in theta.items()}, one(batch))
    assert inputs["log_prob"].shape == (30, 10)
    classwise = make_task("mnist", {"images": 30, "test_images": 20})
    cw_inputs = classwise.loss_inputs({k: v[0] for k, v in theta.items()}, one(batch))
    assert cw_inputs["prob"].shape == (30, 10, 1)
    ce_joint = ten.builtin_losses["cross_entropy"](**inputs)
    ce_classwise = classwise.builtin_losses["cross_entropy"](**cw_inputs)
    logits = classwise.predict({k: v[0] for k, v in theta.items()}, batch.x_train[0])
    reference = torch.nn.functional.cross_entropy(logits, batch.y_train[0].argmax(-1))
    torch.testing.assert_close(ce_joint, reference)
    torch.testing.assert_close(ce_classwise, reference)


@pytest.mark.parametrize("architecture", ["lenet", "mlp", "cnn_small", "cnn_wide"])
def test_architectures_train_and_report_accuracy(architecture):
    """Each optimizee trains: 10 SGD steps of cross-entropy on 8 training images of 0 vs 1 take the held-out
    accuracy from about chance to at least 90%, and the accuracy meta-test reports after every step is the share
    of the 20 held-out images whose argmax is their digit, computed here along plain-autograd SGD."""
    from ml3cli.evaluate import train_curve
    from ml3cli.losses import builtin_loss

    options = {"images": 8, "test_images": 20, "architecture": architecture, "hidden": [16], "pairs": [[0, 1]]}
    task = make_task("mnist_binary", options)
    batch, theta = task.sample_tasks(2, generator(0)), task.init_theta(2, generator(1))
    assert task.predict({k: v[0] for k, v in theta.items()}, batch.x_train[0]).shape == (8, 2)
    lr, steps = 0.1, 10
    _, reported = train_curve(task, builtin_loss(task, "cross_entropy", lr).fn, theta, batch, lr, steps, report=True)
    assert set(reported) == {"accuracy"} and reported["accuracy"].shape == (steps + 1, 2)

    for i in range(2):
        th = {k: v[i].clone() for k, v in theta.items()}
        by_hand = []
        for step in range(steps + 1):
            with torch.no_grad():
                logits = functional_call(task.optimizee, th, (batch.x_test[i],))
                by_hand.append(float((logits.argmax(-1) == batch.y_test[i].argmax(-1)).float().mean()))
            if step == steps:
                break
            at = {k: v.detach().requires_grad_(True) for k, v in th.items()}
            logits = functional_call(task.optimizee, at, (batch.x_train[i],))
            loss = torch.nn.functional.cross_entropy(logits, batch.y_train[i].argmax(-1))
            th = {k: at[k] - lr * g for k, g in zip(at, torch.autograd.grad(loss, list(at.values())), strict=True)}
        assert reported["accuracy"][:, i].tolist() == pytest.approx(by_hand, abs=1e-6), i
        assert by_hand[-1] >= 0.9 and by_hand[-1] > by_hand[0], by_hand


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pairs": [[3, 3]]}, "two different digits"),
        ({"pairs": [[1, 10]]}, "two different digits"),
        ({"pairs": [[1, 2], [2, 1]]}, "given twice"),
        ({"pairs": []}, "at least one"),
        ({"images": 15}, "multiple of the number of classes"),
        ({"test_images": 400}, "more than the 100 images per class"),
        ({"architecture": "resnet"}, "architecture"),
        ({"inputs": "pairs"}, "inputs"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ML3Error, match=message):
        make_task("mnist_binary", options)


def test_recipe_meta_tests_on_other_pairs():
    recipe = load_recipe(REPO / "recipes" / "mnist_binary.yaml")
    train = {frozenset(p) for p in recipe.task_options["pairs"]}
    test = {frozenset(p) for p in recipe.meta_test.task_options["pairs"]}
    assert len(train) == 1 and len(test) == 4 and not train & test
    assert recipe.inner.lr == recipe.outer.lr == 1e-3 and recipe.meta_loss.hidden == [40, 40]
    assert recipe.task_options["architecture"] == "lenet"


# -- learning -------------------------------------------------------------------------------------------------
TINY_OPTIONS = {"pairs": [[4, 9]], "images": 20, "test_images": 40, "architecture": "mlp", "hidden": [32]}
HELD_OUT_PAIRS = [[0, 6], [1, 7], [2, 5], [3, 8]]


def test_tiny_meta_training_beats_cross_entropy_at_the_same_lr_on_held_out_pairs():
    """A loss meta-trained for a few seconds on one digit pair trains fresh optimizees on 4 OTHER pairs to a lower
    held-out cross-entropy and a higher held-out accuracy than cross-entropy at the same learning rate (fixed
    seeds; a small MLP optimizee so that it stays fast)."""
    from ml3cli.engine import meta_train
    from ml3cli.evaluate import NamedLoss, evaluate
    from ml3cli.recipes import recipe_from_dict
    from ml3cli.report_metrics import task_report

    test_options = dict(TINY_OPTIONS, pairs=HELD_OUT_PAIRS)
    recipe = recipe_from_dict(
        {
            "name": "tiny-mnist",
            "task": "mnist_binary",
            "task_options": TINY_OPTIONS,
            "meta_loss": {"hidden": [16, 16]},
            "inner": {"lr": 1e-2, "steps": 5, "reset_every": 25},
            "outer": {"lr": 1e-2, "steps": 50, "tasks": 1},
            "meta_test": {"task": "mnist_binary", "task_options": test_options},
            "checkpoint_every": 0,
        }
    )
    learned = meta_train(recipe, make_task("mnist_binary", TINY_OPTIONS)).metaloss
    task = make_task("mnist_binary", test_options)
    ce = task.builtin_losses["cross_entropy"]
    losses = [NamedLoss("learned", lambda i: learned(**i), 1e-2), NamedLoss("ce", lambda i: ce(**i), 1e-2)]
    curves = {c.label: c for c in evaluate(task, losses, tasks=4, seeds=1, steps=20, seed=123)}
    for step in (5, 10, 20):
        assert curves["learned"].at(step).mean() < curves["ce"].at(step).mean(), step
    accuracy = task_report(task, losses, tasks=4, seeds=1, steps=[20], seed=123)
    assert accuracy["learned"]["accuracy"]["20"] > accuracy["ce"]["accuracy"]["20"]


@pytest.mark.slow
def test_recipe_meta_trains_and_beats_cross_entropy(tmp_path, monkeypatch, capsys):
    """The full recipe (minutes): its meta-test on the 4 held-out pairs has a lower held-out cross-entropy for
    the learned loss than for cross-entropy at the same lr."""
    from helpers import run_main

    from ml3cli.artifacts import read_info

    out = tmp_path / "mnist_binary.safetensors"
    result = run_main(
        monkeypatch, capsys, "meta-train", REPO / "recipes" / "mnist_binary.yaml", "--out", out, cwd=tmp_path
    )
    assert result.code == 0, result.output
    final = read_info(out)["metrics"]["meta_test"]["final"]
    assert final["learned"] < final["cross_entropy"]


def test_joint_inputs_meta_gradient_and_fixed_class_count():
    """The joint convention trains through the engine; its loss is for a fixed number of classes, and 10-class
    inputs given to a binary joint loss are refused with a message naming the input."""
    from ml3cli.engine import meta_gradient, task_objective
    from ml3cli.metaloss import MetaLoss
    from ml3cli.recipes import InnerConfig, TaskLossConfig

    task = make_task("mnist_binary", {"images": 8, "test_images": 8, "inputs": "joint"})
    assert task.input_names() == ("log_prob", "onehot") and [i.size for i in task.loss_inputs_spec] == [2, 2]
    metaloss = MetaLoss(task.loss_inputs_spec, hidden=(8, 8))
    phi = {k: p.detach() for k, p in metaloss.named_parameters()}
    batch, theta = task.sample_tasks(2, generator(0)), task.init_theta(2, generator(1))
    gradient, _ = meta_gradient(
        metaloss, phi, task, theta, batch, InnerConfig(lr=1e-2, steps=2), task_objective(task, TaskLossConfig())
    )
    assert sum(float(g.abs().sum()) for g in gradient.values()) > 0
    with pytest.raises(ValueError, match=r"'log_prob' has shape \(4, 10\): expected \[batch, \*groups, 2\]"):
        metaloss(torch.zeros(4, 10), torch.zeros(4, 10))


def test_recipe_refuses_a_joint_binary_loss_meta_tested_on_ten_classes():
    """With `joint` inputs the input sizes depend on the number of classes: the recipe is refused at load time,
    naming meta_test.task, instead of failing after meta-training."""
    data = load_recipe(REPO / "recipes" / "mnist_binary.yaml").model_dump(mode="json")
    data["task_options"]["inputs"] = "joint"
    data["meta_test"] = {"task": "mnist", "task_options": {"inputs": "joint"}}
    from ml3cli.recipes import recipe_from_dict

    with pytest.raises(ML3Error, match=r"meta_test\.task.*log_prob\[10\].*log_prob\[2\]"):
        recipe_from_dict(data)
    data["meta_test"]["task_options"]["inputs"] = "classwise"
    data["task_options"]["inputs"] = "classwise"
    recipe_from_dict(data)  # class-wise inputs: one loss for any number of classes
