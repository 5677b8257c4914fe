"""The LeNet-family optimizees convolve with ml3cli.functional.per_optimizee_conv2d, which under vmap runs each
optimizee's plain convolution instead of one grouped convolution: its forward, its gradient w.r.t. θ, the
second-order terms of meta-training and a few SGD steps of a sweep must equal those of ``F.conv2d``.

Tolerance: float32 rounding of a different summation order. A convolution output sums ≤ 150 products and a
weight gradient up to 64 × 28 × 28 ≈ 50,000, whose float32 rounding error grows like √n·ε ≈ 224 × 1.2e-7 ≈ 3e-5
of the sum's magnitude; the checks allow 1e-4 of each tensor's largest entry (1e-5 for the forward), far below
what a wrong padding, weight layout or gradient would change (those differ at the 1e-1 level)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from ml3cli.engine import inner_step
from ml3cli.engine.inner_optimizers import SGD
from ml3cli.evaluate import draw_tasks, train_curve
from ml3cli.losses import builtin_loss
from ml3cli.tasks import make_task


def conv2d_lenet(theta, x):
    """LeNet with ``F.conv2d`` (the grouped convolution under vmap): the reference."""
    x = F.max_pool2d(torch.relu(F.conv2d(x, theta["conv1.weight"], theta["conv1.bias"], padding=2)), 2)
    x = F.max_pool2d(torch.relu(F.conv2d(x, theta["conv2.weight"], theta["conv2.bias"])), 2)
    x = torch.relu(F.linear(x.flatten(-3), theta["fc1.weight"], theta["fc1.bias"]))
    x = torch.relu(F.linear(x, theta["fc2.weight"], theta["fc2.bias"]))
    return F.linear(x, theta["fc3.weight"], theta["fc3.bias"])


def close(fast, reference, rel):
    """Every entry within ``rel`` of the reference tensor's largest magnitude."""
    for name in reference:
        scale = reference[name].abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(fast[name], reference[name], rtol=0, atol=rel * scale, msg=name)


def tasks(architecture: str, n: int = 3):
    task = make_task("mnist_binary", {"architecture": architecture, "images": 16, "test_images": 16})
    _, batch, theta = draw_tasks(task, n, "test", 0)
    reference = make_task("mnist_binary", {"architecture": architecture, "images": 16, "test_images": 16})
    reference._forward = conv2d_lenet
    return task, reference, batch, theta


@pytest.mark.parametrize("architecture", ["lenet", "cnn_small", "cnn_wide"])
def test_forward_and_gradient_equal_the_conv2d_ones(architecture):
    task, reference, batch, theta = tasks(architecture)
    fast_logits = vmap(task.predict)(theta, batch.x_train)
    close({"logits": fast_logits}, {"logits": vmap(reference.predict)(theta, batch.x_train)}, 1e-5)

    def gradient(on):
        loss = on.builtin_losses["cross_entropy"]
        return vmap(grad(lambda theta, batch: loss(**on.loss_inputs(theta, batch))))(theta, batch)

    close(gradient(task), gradient(reference), 1e-4)


def test_second_order_terms_equal_the_conv2d_ones():
    """The meta-gradient's path: d(task loss after two inner steps)/dθ₀, through the inner gradients."""
    task, reference, batch, theta = tasks("lenet", 2)

    def meta_gradient(on):
        loss = builtin_loss(on, "brier", 0.5).fn

        def after_steps(theta, batch):
            for _ in range(2):
                theta, _ = inner_step(on, loss, theta, {}, batch, 0.5, SGD())
            return on.task_loss(theta, batch)

        return vmap(grad(after_steps))(theta, batch)

    close(meta_gradient(task), meta_gradient(reference), 1e-4)


def test_sweep_curves_equal_the_conv2d_ones():
    task, reference, batch, theta = tasks("lenet", 4)
    loss = builtin_loss(task, "cross_entropy", 0.1).fn
    lr = torch.tensor([1e-3, 1e-2, 0.1, 0.3])
    fast, fast_accuracy = train_curve(task, loss, theta, batch, lr, 5, report=True)
    slow, slow_accuracy = train_curve(reference, loss, theta, batch, lr, 5, report=True)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_accuracy, slow_accuracy)
