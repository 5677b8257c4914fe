"""The grouped (class-wise) input convention of M_φ: inputs ``[batch, *groups, size]``, M_φ per row, summed over
the groups and averaged over the batch; plain ``[batch, size]`` inputs keep the mean of the paper."""

from __future__ import annotations

import pytest
import torch

from ml3cli.artifacts import load_loss, save_loss
from ml3cli.metaloss import LossInput, MetaLoss, flatten_inputs
from ml3cli.tasks import make_task
from ml3cli.tasks.mnist import CLASSWISE_INPUTS

SINE = (LossInput("y_pred", 1), LossInput("y_true", 1))


def classwise_loss(seed: int = 0) -> MetaLoss:
    torch.manual_seed(seed)
    return MetaLoss(CLASSWISE_INPUTS, hidden=(40, 40))


def probs_and_onehot(batch: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    prob = torch.softmax(torch.randn(batch, classes, generator=gen), dim=-1)
    onehot = torch.eye(classes)[torch.randint(0, classes, (batch,), generator=gen)]
    return prob.unsqueeze(-1), onehot.unsqueeze(-1)


def test_plain_inputs_keep_the_mean_over_samples():
    """[points, 1] inputs (the sine tasks): exactly the mean of M_φ over the points, as before."""
    torch.manual_seed(0)
    loss = MetaLoss(SINE, hidden=(8, 8))
    y_pred, y_true = torch.randn(50, 1), torch.randn(50, 1)
    expected = loss.net(torch.cat([y_pred, y_true], dim=-1)).squeeze(-1).mean()
    assert torch.equal(loss(y_pred, y_true), expected)
    assert torch.equal(loss(y_pred.squeeze(-1), y_true.squeeze(-1)), expected)  # [points] works as [points, 1]
    assert flatten_inputs(SINE, (y_pred, y_true), {}).shape == (50, 2)


@pytest.mark.parametrize("classes", [2, 10])
def test_sum_over_classes_mean_over_images(classes):
    """For [images, classes, 1] inputs the loss is mean_i Σ_c M_φ(p_ic, y_ic)."""
    loss = classwise_loss()
    prob, onehot = probs_and_onehot(7, classes)
    rows = loss.net(torch.cat([prob, onehot], dim=-1)).squeeze(-1)  # [7, classes]
    torch.testing.assert_close(loss(prob=prob, onehot=onehot), rows.sum(1).mean())
    torch.testing.assert_close(loss.pointwise(prob, onehot), rows.sum(1))
    # a size-1 input may leave out its trailing axis: [images, classes] is read as [images, classes, 1]
    torch.testing.assert_close(loss(prob.squeeze(-1), onehot.squeeze(-1)), rows.sum(1).mean())
    assert flatten_inputs(CLASSWISE_INPUTS, (prob, onehot), {}).shape == (7 * classes, 2)


@pytest.mark.parametrize("classes", [2, 10])
def test_permutation_of_class_order_gives_the_same_value(classes):
    """Relabelling the classes (the same permutation of p and y) leaves the loss and its gradient unchanged."""
    loss = classwise_loss()
    prob, onehot = probs_and_onehot(11, classes, seed=3)
    prob.requires_grad_()
    value = loss(prob, onehot)
    (gradient,) = torch.autograd.grad(value, prob)
    for seed in range(3):
        perm = torch.randperm(classes, generator=torch.Generator().manual_seed(seed))
        p2 = prob.detach()[:, perm].clone().requires_grad_()
        v2 = loss(p2, onehot[:, perm])
        (g2,) = torch.autograd.grad(v2, p2)
        torch.testing.assert_close(v2, value)
        torch.testing.assert_close(g2, gradient[:, perm])


def test_inputs_must_agree_on_batch_and_groups():
    loss = classwise_loss()
    prob, _ = probs_and_onehot(5, 10)
    _, onehot2 = probs_and_onehot(5, 2)
    with pytest.raises(ValueError, match="disagree"):
        loss(prob, onehot2)
    with pytest.raises(ValueError, match=r"expected \[batch, \*groups, 3\]"):
        MetaLoss((LossInput("v", 3),), hidden=(4,))(torch.zeros(5, 4))


def test_a_loss_learned_on_pairs_trains_the_10_class_task_unchanged(tmp_path):
    """An artifact over class-wise inputs (saved from the binary task) loads for the 10-class task, gives the
    same values as before saving, and its gradient trains a 10-class LeNet."""
    binary, ten = make_task("mnist_binary", {"images": 8, "test_images": 8}), make_task("mnist", {"images": 20})
    assert binary.loss_inputs_spec == ten.loss_inputs_spec
    loss = classwise_loss(seed=1)
    path = save_loss(tmp_path / "pairs.safetensors", loss, {"task": "mnist_binary"})
    loaded = load_loss(path, expect_inputs=ten.loss_inputs_spec)
    for classes in (2, 10):
        prob, onehot = probs_and_onehot(6, classes)
        assert torch.equal(loaded(prob, onehot), loss(prob, onehot))
    gen = torch.Generator().manual_seed(0)
    batch, theta = ten.sample_tasks(1, gen), ten.init_theta(1, gen)
    one = type(batch)(*(t[0] for t in batch))
    theta = {k: v[0].requires_grad_() for k, v in theta.items()}
    inputs = ten.loss_inputs(theta, one)
    assert inputs["prob"].shape == (20, 10, 1)
    value = loaded(**inputs)
    grads = torch.autograd.grad(value, list(theta.values()))
    assert torch.isfinite(value) and sum(float(g.abs().sum()) for g in grads) > 0
