"""The contract of a loaded loss in a user's own code (MetaLoss's docstring): inputs and their shapes, the
reduction, dtype and device handling, torch.compile and torch.func, load_loss's expect_inputs, and the
learning rate the loss was meta-trained for."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from helpers import TINY_RECIPE, sign
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.func import grad, vmap

from ml3cli import ML3Error, load_loss, save_loss
from ml3cli.metaloss import LossInput, LossInputError, MetaLoss
from ml3cli.tasks.mnist import CLASSWISE_INPUTS
from ml3cli.tasks.sine import SineRegression

SINE = SineRegression.loss_inputs_spec


def perturbed(inputs=SINE, seed: int = 0, **kwargs) -> MetaLoss:
    """A loss whose φ is not its initialisation, frozen like a loaded one."""
    torch.manual_seed(seed)
    loss = MetaLoss(inputs, hidden=(8, 8), **kwargs)
    with torch.no_grad():
        for p in loss.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return loss.requires_grad_(False).eval()


@pytest.fixture
def sine_artifact(tmp_path) -> Path:
    return save_loss(tmp_path / "sine.safetensors", perturbed(), {"task": "sine", "recipe": TINY_RECIPE})


def pairs(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, generator=gen), torch.randn(n, 1, generator=gen)


def probs(batch: int = 6, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    prob = torch.softmax(torch.randn(batch, classes, generator=gen), dim=-1)
    onehot = torch.eye(classes)[torch.randint(0, classes, (batch,), generator=gen)]
    return prob.unsqueeze(-1), onehot.unsqueeze(-1)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


# -- the reduction ------------------------------------------------------------------------------------------
def test_reduction_is_the_mean_over_samples_of_the_sum_over_classes():
    """L = (1/N) Σ_i Σ_c M_φ(p_ic, y_ic), written out with the network itself."""
    loss = perturbed(CLASSWISE_INPUTS)
    prob, onehot = probs(5, 4)
    rows = loss.net(torch.cat([prob, onehot], -1)).squeeze(-1)  # [5, 4]
    expected = sum(sum(rows[i, c] for c in range(4)) for i in range(5)) / 5
    torch.testing.assert_close(loss(prob, onehot), expected)
    y_pred, y_true = pairs()
    torch.testing.assert_close(perturbed()(y_pred, y_true), perturbed().net(torch.cat([y_pred, y_true], -1)).mean())


# -- shapes ---------------------------------------------------------------------------------------------------
def refused_shape(loss: MetaLoss, name: str, given: tuple[int, ...], *args, **kwargs) -> str:
    """Assert that ``loss(*args, **kwargs)`` is refused with a one-line message naming ``name`` and ``given``."""
    with pytest.raises(LossInputError) as info:
        loss(*args, **kwargs)
    message = str(info.value)
    assert f"loss input {name!r} has shape {given}" in message and "expected [batch" in message, message
    assert "\n" not in message
    assert isinstance(info.value, ML3Error) and isinstance(info.value, ValueError)
    return message


@pytest.mark.parametrize("shape", [(4, 25, 1), (4, 25), (2, 4, 25, 1)])
def test_extra_sample_axes_are_not_taken_for_classes(shape):
    """A prediction with an extra sample axis is refused for a loss without group axes (it used to be summed over
    that axis as if it held classes), in forward and pointwise alike."""
    loss = perturbed()
    y = torch.zeros(shape)
    message = refused_shape(loss, "y_pred", shape, y, y)
    assert "[batch, 1] or [batch]" in message and "flatten extra sample axes" in message
    with pytest.raises(LossInputError, match="'y_pred' has shape"):
        loss.pointwise(y_pred=y, y_true=y)
    # the flattened batch is the fix the message points to
    assert loss(y.reshape(-1, 1), y.reshape(-1, 1)).shape == ()


def test_wrong_feature_count_names_the_input_and_size():
    loss = perturbed((LossInput("s", 3), LossInput("a", 2)))
    message = refused_shape(loss, "a", (5, 3), torch.zeros(5, 3), torch.zeros(5, 3))
    assert "[batch, 2]" in message and "last axis must hold its 2 features" in message


def test_accepted_shapes_of_plain_inputs():
    """[N, 1], [N], one sample as [1] or a scalar: the same rows as [N, 1]."""
    loss = perturbed()
    y_pred, y_true = pairs()
    value = loss(y_pred, y_true)
    assert torch.equal(loss(y_pred.squeeze(-1), y_true.squeeze(-1)), value)
    assert torch.equal(loss(y_pred[0], y_true[0]), loss(y_pred[:1], y_true[:1]))
    assert torch.equal(loss(y_pred[0, 0], y_true[0, 0]), loss(y_pred[:1], y_true[:1]))


def test_class_axis_shapes():
    """Class-wise inputs: [N, C, 1] and [N, C] are the same; [N, 1] is one row per sample; an extra axis is
    refused and so is a mismatch between the inputs."""
    loss = perturbed(CLASSWISE_INPUTS)
    prob, onehot = probs()
    value = loss(prob, onehot)
    assert torch.equal(loss(prob.squeeze(-1), onehot.squeeze(-1)), value)
    torch.testing.assert_close(loss(prob[:, :1, 0], onehot[:, :1, 0]), loss(prob[:, :1], onehot[:, :1]))
    message = refused_shape(loss, "prob", (6, 10, 1, 1), prob[..., None], onehot)
    assert "[batch, class, 1] or [batch, class]" in message
    with pytest.raises(LossInputError, match="disagree"):
        loss(prob, onehot[:, :5])


def test_inputs_that_are_not_tensors_are_refused():
    with pytest.raises(LossInputError, match="'y_true' is a list: expected a torch.Tensor"):
        perturbed()(torch.zeros(3, 1), [0.0, 1.0, 2.0])


def test_a_loss_declares_one_set_of_group_axes():
    with pytest.raises(ValueError, match="same group axes"):
        MetaLoss((LossInput("p", 1, groups=("class",)), LossInput("y", 1)), hidden=(4,))


def test_repr_and_labels_show_the_class_axis():
    assert "inputs=(prob[class, 1], onehot[class, 1])" in repr(MetaLoss(CLASSWISE_INPUTS, (4,)))
    assert LossInput("g", 2, groups=["class"]) == LossInput("g", 2, groups=("class",))  # a JSON list is a tuple


# -- dtype and device -----------------------------------------------------------------------------------------
def test_float64_inputs_give_a_float64_loss_and_correct_gradients():
    """float64 inputs with a float32 φ: computed in φ's dtype, returned in float64, and y_pred.grad is the
    float32 gradient exactly and the float64 loss's gradient to float32 precision."""
    loss = perturbed()
    y_pred, y_true = pairs()
    p32 = y_pred.clone().requires_grad_()
    v32 = loss(p32, y_true)
    v32.backward()

    p64 = y_pred.double().requires_grad_()
    v64 = loss(p64, y_true.double())
    assert v64.dtype == torch.float64
    assert v64.item() == v32.item()
    v64.backward()
    assert p64.grad is not None and p64.grad.dtype == torch.float64
    assert torch.equal(p64.grad, p32.grad.double())

    reference = perturbed().double()  # the same φ, computed in float64
    q64 = y_pred.double().requires_grad_()
    reference(q64, y_true.double()).backward()
    torch.testing.assert_close(p64.grad, q64.grad, rtol=1e-5, atol=1e-6)


def test_mixed_and_integer_dtypes():
    """A float64 prediction with a float32 target gives a float64 loss; an integer one-hot works as a float one;
    bfloat16 inputs give a bfloat16 loss."""
    loss = perturbed()
    y_pred, y_true = pairs()
    assert loss(y_pred.double(), y_true).dtype == torch.float64
    assert loss(y_pred.bfloat16(), y_true.bfloat16()).dtype == torch.bfloat16
    classwise = perturbed(CLASSWISE_INPUTS)
    prob, onehot = probs()
    assert torch.equal(classwise(prob, onehot.long()), classwise(prob, onehot))


def test_to_dtype_and_device_round_trips(sine_artifact):
    """loss_fn.to(float64) computes in float64; .to(float32) and .to("cpu") give back the same φ and values."""
    loss_fn = load_loss(sine_artifact)
    y_pred, y_true = pairs()
    value = loss_fn(y_pred, y_true)
    as64 = loss_fn.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in as64.parameters())
    v64 = as64(y_pred.double(), y_true.double())
    assert v64.dtype == torch.float64
    torch.testing.assert_close(v64, value.double(), rtol=1e-6, atol=1e-7)
    assert as64(y_pred, y_true).dtype == torch.float32  # float32 inputs, float64 compute, float32 result
    back = as64.to(torch.float32).to("cpu")
    assert torch.equal(back(y_pred, y_true), value)


def test_inputs_on_another_device_name_the_fix():
    """Inputs on another device than φ are refused with a message that says loss_fn.to(device) (the "meta"
    device stands in for a GPU)."""
    loss = perturbed()
    on_meta = torch.zeros(4, 1, device="meta")
    with pytest.raises(LossInputError) as info:
        loss(on_meta, on_meta)
    message = str(info.value)
    assert "'y_pred' is on meta" in message and "loss_fn.to('meta')" in message and "\n" not in message
    loss.to("meta")
    with pytest.raises(LossInputError, match=r"loss_fn.to\('cpu'\)"):
        loss(*pairs())


# -- torch.compile and torch.func -----------------------------------------------------------------------------
def sgd_losses(loss_fn, steps: int = 4) -> tuple[list[float], list[torch.Tensor]]:
    """A few plain SGD steps of a tiny model with ``loss_fn``: the loss values and the final parameters."""
    model = tiny_model()
    x = torch.linspace(-2, 2, 32).unsqueeze(1)
    y = torch.sin(x - torch.pi)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    values = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        values.append(loss.item())
    return values, [p.detach().clone() for p in model.parameters()]


def compiled_matches_eager(backend: str) -> None:
    torch._dynamo.reset()
    loss_fn = perturbed()
    eager_values, eager_params = sgd_losses(loss_fn)
    compiled_values, compiled_params = sgd_losses(torch.compile(loss_fn, backend=backend, fullgraph=True))
    torch.testing.assert_close(compiled_values, eager_values, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_params, eager_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torch_compile_in_a_training_loop():
    """torch.compile of the loss traces without graph breaks (fullgraph) and trains a model to the same values as
    eager (aot_eager: dynamo and AOT autograd without a C compiler, fast enough for every run)."""
    compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor_in_a_training_loop():
    """The same with the default inductor backend (compiles C++; about a minute)."""
    compiled_matches_eager("inductor")


def test_torch_func_grad_and_vmap():
    """grad with respect to the prediction equals autograd's; vmap over a batch of prediction sets equals a loop
    (also with grad inside, and for class-wise inputs)."""
    loss = perturbed()
    y_pred, y_true = pairs()
    leaf = y_pred.clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss(leaf, y_true), leaf)
    torch.testing.assert_close(grad(loss)(y_pred, y_true), expected)

    batch = torch.randn(5, 12, 1, generator=torch.Generator().manual_seed(1))
    values = vmap(loss, in_dims=(0, None))(batch, y_true)
    torch.testing.assert_close(values, torch.stack([loss(b, y_true) for b in batch]))
    grads = vmap(grad(loss), in_dims=(0, None))(batch, y_true)
    torch.testing.assert_close(grads, torch.stack([grad(loss)(b, y_true) for b in batch]))

    classwise = perturbed(CLASSWISE_INPUTS)
    sets = torch.stack([probs(seed=s)[0] for s in range(3)])  # [3, 6, 10, 1]
    onehot = probs()[1]
    torch.testing.assert_close(
        vmap(classwise, in_dims=(0, None))(sets, onehot), torch.stack([classwise(p, onehot) for p in sets])
    )
    # the shape check sees the per-set shape inside vmap: an extra axis there is still refused
    with pytest.raises(LossInputError, match=r"'y_pred' has shape \(1, 12, 1\)"):
        vmap(loss)(batch[:, None], batch[:, None])


# -- load_loss ------------------------------------------------------------------------------------------------
def test_expect_inputs_as_names(sine_artifact):
    """Plain names are compared by name and order; a wrong name or order is refused with both lists."""
    assert load_loss(sine_artifact, expect_inputs=("y_pred", "y_true")).inputs == SINE
    load_loss(sine_artifact, expect_inputs=["y_pred", "y_true"])
    for wrong in (("p", "y"), ("y_true", "y_pred"), ("y_pred",)):
        with pytest.raises(ML3Error) as info:
            load_loss(sine_artifact, expect_inputs=wrong)
        message = str(info.value)
        assert "(y_pred[1], y_true[1])" in message and f"({', '.join(wrong)})" in message, message
    with pytest.raises(ML3Error, match="sequence of input names"):
        load_loss(sine_artifact, expect_inputs="y_pred")


def test_expect_inputs_compare_the_class_axis(tmp_path):
    """LossInput expectations also compare the group axes: a class-wise loss is not a loss over plain rows."""
    path = save_loss(tmp_path / "cw.safetensors", perturbed(CLASSWISE_INPUTS), {"task": "mnist_binary"})
    assert load_loss(path, expect_inputs=CLASSWISE_INPUTS).inputs == CLASSWISE_INPUTS
    with pytest.raises(ML3Error, match=r"prob\[class, 1\], onehot\[class, 1\]\); the task here needs inputs \(prob"):
        load_loss(path, expect_inputs=(LossInput("prob", 1), LossInput("onehot", 1)))


def drop_groups(path: Path, task: str | None) -> Path:
    """Rewrite ``path`` as an artifact from before group axes were recorded (no ``groups`` keys)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    document = json.loads(meta["ml3"])
    for item in document["architecture"]["inputs"]:
        item.pop("groups", None)
    document["task"] = task
    meta["ml3"] = json.dumps(document)
    meta["format_version"] = "1"  # whose checksum covered the tensors only
    tensors = st_load(data)
    path.write_bytes(st_save(tensors, metadata=sign(meta, tensors)))
    return path


def test_artifacts_without_recorded_groups_take_them_from_the_task(tmp_path):
    """An older class-wise artifact (no groups in its metadata) gets the class axis from its task, or from the
    expected inputs; with neither it is a loss over plain rows, and [N, C, 1] inputs are refused."""
    original = perturbed(CLASSWISE_INPUTS)
    prob, onehot = probs()
    path = save_loss(tmp_path / "old.safetensors", original, {"task": "mnist_binary"})

    drop_groups(path, "mnist_binary")
    loaded = load_loss(path)
    assert loaded.inputs == CLASSWISE_INPUTS and torch.equal(loaded(prob, onehot), original(prob, onehot))

    drop_groups(path, None)
    assert load_loss(path, expect_inputs=CLASSWISE_INPUTS).inputs == CLASSWISE_INPUTS
    plain = load_loss(path)
    assert [i.groups for i in plain.inputs] == [(), ()]
    with pytest.raises(LossInputError, match="'prob' has shape"):
        plain(prob, onehot)


@pytest.mark.parametrize("groups", [["class", 3], "class", [["class"], []]])
def test_malformed_groups_are_refused(tmp_path, groups):
    """Group axes that are not a list of names, or that differ between the inputs, are malformed metadata."""
    path = save_loss(tmp_path / "g.safetensors", perturbed(CLASSWISE_INPUTS), {"task": "mnist_binary"})
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    document = json.loads(meta["ml3"])
    inputs = document["architecture"]["inputs"]
    if isinstance(groups[0], list):
        inputs[0]["groups"], inputs[1]["groups"] = groups
    else:
        inputs[0]["groups"] = groups
    meta["ml3"] = json.dumps(document)
    path.write_bytes(st_save(st_load(data), metadata=meta))
    with pytest.raises(ML3Error, match="malformed"):
        load_loss(path)


def test_meta_trained_lr_comes_from_the_recipe(sine_artifact, tmp_path):
    """loss_fn.meta_trained_lr is the recipe's inner.lr when the artifact records it, else None."""
    assert load_loss(sine_artifact).meta_trained_lr == TINY_RECIPE["inner"]["lr"]
    bare = save_loss(tmp_path / "bare.safetensors", perturbed(), {"task": "sine"})
    assert load_loss(bare).meta_trained_lr is None
    assert MetaLoss(SINE, (4,)).meta_trained_lr is None
