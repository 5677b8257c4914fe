"""The meta-loss network M_φ and the hand-written losses it is compared with.

M_φ maps per-sample loss inputs declared by a task (for regression: ŷ and y) to a per-sample loss, then reduces
by the mean over the batch (paper, equation 3):

    L_learned = mean_i M_φ(inputs_i)

Grouped inputs (e.g. class-wise classification inputs, EvoMAL-style): each named input may have the shape
``[batch, *groups, size]``; M_φ is applied to every row (one per batch element and group, e.g. per class c the
pair (p_c, y_c)), the row values are SUMMED over the group axes and AVERAGED over the batch axis:

    L_learned = mean_i Σ_c M_φ(inputs_{i,c})

so one loss serves any number of classes. With no group axes (``[batch, size]``, the regression inputs) this is
exactly the mean above. An input of size 1 may leave out its trailing axis (``[batch]`` or ``[batch, C]``).

The same module trains θ during meta-training (through ``torch.func.functional_call`` with φ as a parameter
dict) and in any ordinary PyTorch training loop after :func:`ml3cli.load_loss`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ml3cli.functional import sequential_function

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}
OUTPUTS: dict[str, Callable[[], nn.Module]] = {"softplus": nn.Softplus, "linear": nn.Identity}


@dataclass(frozen=True)
class LossInput:
    """One named input of a loss: ``size`` features per sample."""

    name: str
    size: int
    description: str = ""


def _named(spec: Sequence[LossInput], args: Sequence[Tensor], kwargs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inputs of ``spec`` by name (given positionally in spec order, or by name), each checked for presence."""
    if args and kwargs:
        raise TypeError("pass the loss inputs either positionally or by name, not both")
    names = [item.name for item in spec]
    if args:
        if len(args) != len(spec):
            raise TypeError(f"this loss takes {len(spec)} inputs ({', '.join(names)}), got {len(args)}")
        kwargs = dict(zip(names, args, strict=True))
    missing = [n for n in names if n not in kwargs]
    extra = [n for n in kwargs if n not in names]
    if missing or extra:
        raise TypeError(f"this loss takes inputs ({', '.join(names)}); missing {missing}, unexpected {extra}")
    return kwargs


def _as_rows(item: LossInput, value: Tensor) -> Tensor:
    """``value`` as ``[batch, *groups, size]`` (a size-1 input may leave out its trailing axis)."""
    if item.size == 1 and (value.ndim == 0 or value.shape[-1] != 1 or value.ndim == 1):
        value = value.unsqueeze(-1)
    if value.ndim == 1:  # one sample of a size-k input
        value = value.unsqueeze(0)
    if value.shape[-1] != item.size:
        raise ValueError(
            f"loss input {item.name!r} has shape {tuple(value.shape)}: expected [batch, *groups, {item.size}]"
        )
    return value


def grouped_inputs(spec: Sequence[LossInput], args: Sequence[Tensor], kwargs: dict[str, Tensor]) -> Tensor:
    """Bring the inputs of ``spec`` to one ``[batch, *groups, features]`` tensor (all must share batch and groups)."""
    kwargs = _named(spec, args, kwargs)
    columns = [_as_rows(item, kwargs[item.name]) for item in spec]
    leads = {tuple(c.shape[:-1]) for c in columns}
    if len(leads) != 1:
        shapes = {item.name: tuple(kwargs[item.name].shape) for item in spec}
        raise ValueError(f"loss inputs disagree on the number of samples (or groups): {shapes}")
    return torch.cat(columns, dim=-1)


def flatten_inputs(spec: Sequence[LossInput], args: Sequence[Tensor], kwargs: dict[str, Tensor]) -> Tensor:
    """Bring the inputs of ``spec`` (positional in spec order, or by name) to one ``[rows, features]`` tensor,
    one row per sample and group."""
    grouped = grouped_inputs(spec, args, kwargs)
    return grouped.reshape(-1, grouped.shape[-1])


class MetaLoss(nn.Module):
    """M_φ: an MLP over the concatenated loss inputs, summed over group axes (if any), averaged over samples.

    Args:
        inputs: the task's loss inputs, in order (their sizes add up to the first layer's width).
        hidden: widths of the hidden layers, e.g. ``(40, 40)``.
        activation: name from :data:`ACTIVATIONS`.
        bias: whether the linear layers have biases.
        output: ``softplus`` (a non-negative loss) or ``linear``.

    Call it like a hand-written loss: ``loss_fn(y_pred, y_true)`` or ``loss_fn(y_pred=..., y_true=...)``; the
    result is a scalar tensor that is differentiable with respect to the inputs (and φ).
    """

    def __init__(
        self,
        inputs: Sequence[LossInput],
        hidden: Sequence[int] = (40, 40),
        activation: str = "relu",
        bias: bool = True,
        output: str = "softplus",
    ):
        super().__init__()
        self.inputs = tuple(inputs)
        self.hidden = tuple(int(h) for h in hidden)
        self.activation = activation
        self.bias = bias
        self.output = output
        layers: list[nn.Module] = []
        width = sum(item.size for item in self.inputs)
        for h in self.hidden:
            layers += [nn.Linear(width, h, bias=bias), ACTIVATIONS[activation]()]
            width = h
        layers += [nn.Linear(width, 1, bias=bias), OUTPUTS[output]()]
        self.net = nn.Sequential(*layers)

    def with_phi(self, phi: dict[str, Tensor]) -> Callable[[dict[str, Tensor]], Tensor]:
        """M_φ over a dict of named inputs with φ given explicitly (as ``functional_call(self, phi, (), inputs)``,
        the same operations, without re-parametrising the module on every call)."""
        net = sequential_function(self.net, prefix="net.")
        if net is None:  # a subclass with another network
            return lambda inputs: functional_call(self, phi, (), inputs)

        def loss(inputs: dict[str, Tensor]) -> Tensor:
            rows = net(phi, grouped_inputs(self.inputs, (), inputs)).squeeze(-1)
            rows = rows.sum(dim=tuple(range(1, rows.ndim))) if rows.ndim > 1 else rows
            return rows.mean()

        return loss

    def pointwise(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        """The per-sample loss values, shape ``[batch]`` (what the mean in :meth:`forward` reduces): M_φ of each
        row, summed over the group axes of ``[batch, *groups, size]`` inputs (none for ``[batch, size]``)."""
        rows = self.net(grouped_inputs(self.inputs, args, kwargs)).squeeze(-1)
        return rows.sum(dim=tuple(range(1, rows.ndim))) if rows.ndim > 1 else rows

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        return self.pointwise(*args, **kwargs).mean()

    def extra_repr(self) -> str:
        names = ", ".join(f"{i.name}[{i.size}]" for i in self.inputs)
        return f"inputs=({names})"


# Hand-written losses over the same named inputs as a supervised task's meta-loss.
def mse(y_pred: Tensor, y_true: Tensor) -> Tensor:
    """Mean squared error, mean over all elements."""
    return ((y_pred - y_true) ** 2).mean()


def l1(y_pred: Tensor, y_true: Tensor) -> Tensor:
    """Mean absolute error."""
    return (y_pred - y_true).abs().mean()


def huber(y_pred: Tensor, y_true: Tensor) -> Tensor:
    """Huber loss with δ = 1 (quadratic near zero, linear in the tails)."""
    return torch.nn.functional.huber_loss(y_pred, y_true, delta=1.0)
