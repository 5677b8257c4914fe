"""The meta-loss network M_φ and the hand-written losses it is compared with.

M_φ maps per-sample loss inputs declared by a task (for regression: ŷ and y) to a per-sample loss, then reduces
by the mean over the batch (paper, equation 3):

    L_learned = mean_i M_φ(inputs_i)

Grouped inputs (e.g. class-wise classification inputs, EvoMAL-style): an input declared with group axes
(:attr:`LossInput.groups`, e.g. ``("class",)``) has the shape ``[batch, *groups, size]``; M_φ is applied to every
row (one per batch element and group, e.g. per class c the pair (p_c, y_c)), the row values are SUMMED over the
group axes and AVERAGED over the batch axis:

    L_learned = mean_i Σ_c M_φ(inputs_{i,c})

so one loss serves any number of classes. With no group axes (``[batch, size]``, the regression inputs) this is
exactly the mean above. An input of size 1 may leave out its trailing axis (``[batch]`` or ``[batch, C]``). Inputs
of any other shape are refused (:class:`LossInputError`): an undeclared extra axis is never taken for a group axis.

The same module trains θ during meta-training (through ``torch.func.functional_call`` with φ as a parameter
dict) and in any ordinary PyTorch training loop after :func:`ml3cli.load_loss`; :class:`MetaLoss` states the
contract a user can rely on there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ml3cli.functional import sequential_function
from ml3cli.loss_inputs import ACTIVATION_NAMES, OUTPUT_NAMES, LossInput, LossInputError

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
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES and tuple(OUTPUTS) == OUTPUT_NAMES  # one list of names, two uses


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
    for item in spec:
        if not isinstance(kwargs[item.name], Tensor):
            got = type(kwargs[item.name]).__name__
            raise LossInputError(f"loss input {item.name!r} is a {got}: expected a torch.Tensor {item.shapes()}")
    return kwargs


def _as_rows(item: LossInput, value: Tensor) -> Tensor:
    """``value`` as ``[batch, *groups, size]`` (or ``[batch, size]``, one row per sample), refused otherwise.

    Accepted: ``[batch, *groups, size]``; ``[batch, size]`` (no group axes: one row per sample); one sample as
    ``[size]``; for ``size`` 1 also any of these without the trailing axis.
    """
    given = tuple(value.shape)
    if item.size == 1 and (value.ndim == 0 or value.shape[-1] != 1):
        value = value.unsqueeze(-1)
    if value.ndim == 1:  # one sample
        value = value.unsqueeze(0)
    if value.shape[-1] == item.size and value.ndim in (2, 2 + len(item.groups)):
        return value
    groups = f"group axes ({', '.join(item.groups)})" if item.groups else "no group axes"
    if value.shape[-1] != item.size:
        hint = f"the last axis must hold its {item.size} features"
    else:
        hint = "flatten extra sample axes into the batch axis"
        if not item.groups:
            hint += " (this loss has no class axis to sum over)"
    raise LossInputError(
        f"loss input {item.name!r} has shape {given}: expected [batch, *groups, {item.size}] with {groups}, "
        f"i.e. {item.shapes()}; {hint}"
    )


def grouped_inputs(
    spec: Sequence[LossInput], args: Sequence[Tensor], kwargs: dict[str, Tensor], dtype: torch.dtype | None = None
) -> Tensor:
    """Bring the inputs of ``spec`` to one ``[batch, *groups, features]`` tensor (all must share batch and groups),
    each cast to ``dtype`` first when given."""
    kwargs = _named(spec, args, kwargs)
    columns = [_as_rows(item, kwargs[item.name]) for item in spec]
    leads = {tuple(c.shape[:-1]) for c in columns}
    if len(leads) != 1:
        shapes = {item.name: tuple(kwargs[item.name].shape) for item in spec}
        raise LossInputError(f"loss inputs disagree on the number of samples (or groups): {shapes}")
    if dtype is not None:
        columns = [c.to(dtype) for c in columns]
    return torch.cat(columns, dim=-1)


def flatten_inputs(spec: Sequence[LossInput], args: Sequence[Tensor], kwargs: dict[str, Tensor]) -> Tensor:
    """Bring the inputs of ``spec`` (positional in spec order, or by name) to one ``[rows, features]`` tensor,
    one row per sample and group."""
    grouped = grouped_inputs(spec, args, kwargs)
    return grouped.reshape(-1, grouped.shape[-1])


class MetaLoss(nn.Module):
    """M_φ: an MLP over the concatenated loss inputs, summed over group axes (if any), averaged over samples.

    Args:
        inputs: the task's loss inputs, in order (their sizes add up to the first layer's width; all declare the
            same :attr:`LossInput.groups`).
        hidden: widths of the hidden layers, e.g. ``(40, 40)``.
        activation: name from :data:`ACTIVATIONS`.
        bias: whether the linear layers have biases.
        output: ``softplus`` (a non-negative loss) or ``linear``.
        learned_lr: also output the inner learning rate (paper 4.1.2: "the meta-network outputs a loss signal
            together with the learning rate"): a second output unit s per row, and the step scale
            2·sigmoid(mean of s over the rows) ∈ (0, 2) multiplies the recipe's α (1 at s = 0).

    The contract of ``loss_fn(...)`` (``forward``):

    * **Inputs**: the declared :attr:`inputs` (``loss_fn.inputs``; e.g. ``y_pred, y_true`` for the sine tasks),
      all of them, positionally in that order or by name (not both).
    * **Shapes**: axis 0 is the batch of samples, the last axis the input's ``size`` features: ``[batch, size]``,
      or ``[batch]`` for a size-1 input. Inputs declared with group axes (the class-wise MNIST inputs ``prob`` and
      ``onehot`` have ``groups=("class",)``) are ``[batch, C, size]`` (``[batch, C]`` for size 1), one row per
      class; they may also come as ``[batch, size]`` (one row per sample). One sample may be given as
      ``[size]``. All inputs share the batch (and group) extents. Anything else, e.g. a ``[4, 25, 1]`` prediction
      for a ``[batch, 1]`` input, raises :class:`LossInputError` naming the input and both shapes: flatten extra
      sample axes into the batch axis yourself.
    * **Reduction**: M_φ gives one value per row; the values are summed over the group axes and averaged over the
      batch, ``L = (1/N) Σ_i Σ_c M_φ(x_{i,c})`` (just the mean over samples without groups). The result is a
      0-dim tensor, differentiable with respect to the inputs (and φ unless frozen).
    * **dtype**: computed in φ's dtype (float32 unless trained otherwise; see :meth:`~torch.nn.Module.to`).
      Inputs of another dtype (float64, bfloat16, an integer one-hot …) are cast to it, and the loss is returned
      in the floating inputs' dtype (promoted if they differ), with gradients flowing back through the cast.
    * **Device**: the inputs must be on φ's device, else :class:`LossInputError` says to call
      ``loss_fn.to(device)``.
    * **Optimizer**: φ was meta-trained to shape plain SGD steps θ ← θ − α·∇_θ L (no momentum, no weight decay)
      at the recipe's α = ``inner.lr`` (:attr:`meta_trained_lr`), starting from freshly initialised θ. Train
      that way: ``torch.optim.SGD(model.parameters(), lr=loss_fn.meta_trained_lr)``. Other rates and optimizers
      are outside what it learned; Adam in particular rescales the gradients the loss learned to shape, and with
      Adam a loss meta-trained for SGD can lose to MSE.

    With ``learned_lr``, :meth:`loss_and_step_scale` gives the step scale as well: train with ``lr * scale``
    (scale detached from θ). :meth:`pointwise` gives the per-sample values before the mean. The module works
    under ``torch.compile`` and ``torch.func`` (``grad``, ``vmap``) like any other.
    """

    #: the artifact's metadata (task, recipe, seed, metrics …) after :func:`ml3cli.load_loss`; empty otherwise.
    info: dict[str, Any]

    def __init__(
        self,
        inputs: Sequence[LossInput],
        hidden: Sequence[int] = (40, 40),
        activation: str = "relu",
        bias: bool = True,
        output: str = "softplus",
        learned_lr: bool = False,
    ):
        super().__init__()
        self.inputs = tuple(inputs)
        if len({item.groups for item in self.inputs}) > 1:
            labels = ", ".join(item.label for item in self.inputs)
            raise ValueError(f"all inputs of a loss must declare the same group axes, got ({labels})")
        self.hidden = tuple(int(h) for h in hidden)
        self.activation = activation
        self.bias = bias
        self.output = output
        self.learned_lr = learned_lr
        self.info = {}
        layers: list[nn.Module] = []
        width = sum(item.size for item in self.inputs)
        for h in self.hidden:
            layers += [nn.Linear(width, h, bias=bias), ACTIVATIONS[activation]()]
            width = h
        if learned_lr:  # the output non-linearity applies to the loss unit only (see _loss_and_scale)
            layers.append(nn.Linear(width, 2, bias=bias))
            self.loss_output = OUTPUTS[output]()
        else:
            layers += [nn.Linear(width, 1, bias=bias), OUTPUTS[output]()]
        self.net = nn.Sequential(*layers)

    @property
    def meta_trained_lr(self) -> float | None:
        """The SGD learning rate α that φ was meta-trained for (the recipe's ``inner.lr``, as recorded in the
        artifact's metadata ``info["recipe"]["inner"]["lr"]``), or None when the artifact does not record one.
        With ``learned_lr`` the steps it was trained for were this rate times :meth:`loss_and_step_scale`'s scale."""
        recipe = self.info.get("recipe")
        inner = recipe.get("inner") if isinstance(recipe, dict) else None
        lr = inner.get("lr") if isinstance(inner, dict) else None
        return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None

    def _prepare(self, args: Sequence[Tensor], kwargs: dict[str, Tensor]) -> tuple[Tensor, torch.dtype]:
        """The inputs as rows ``[batch, *groups, features]`` in φ's dtype, and the dtype to return the loss in."""
        named = _named(self.inputs, args, kwargs)
        phi = next(self.parameters())
        result: torch.dtype | None = None
        for item in self.inputs:
            value = named[item.name]
            if value.device != phi.device:
                raise LossInputError(
                    f"loss input {item.name!r} is on {value.device} but this loss's φ is on {phi.device}: "
                    f"move the loss with loss_fn.to({str(value.device)!r}) (or the inputs to {phi.device})"
                )
            if value.is_floating_point():
                result = value.dtype if result is None else torch.promote_types(result, value.dtype)
        return grouped_inputs(self.inputs, (), named, dtype=phi.dtype), result or phi.dtype

    def _loss_and_scale(self, raw: Tensor) -> tuple[Tensor, Tensor | None]:
        """The reduced loss from the network's rows ``[batch, *groups, 1 or 2]``, and the step scale (or None)."""
        if not self.learned_lr:
            return _reduce(raw.squeeze(-1)), None
        return _reduce(self.loss_output(raw[..., 0])), 2 * torch.sigmoid(raw[..., 1].mean())

    def with_phi(self, phi: dict[str, Tensor]) -> Callable[[dict[str, Tensor]], Tensor]:
        """M_φ over a dict of named inputs with φ given explicitly (as ``functional_call(self, phi, (), inputs)``,
        the same operations, without re-parametrising the module on every call)."""
        inner = self.inner_loss_with_phi(phi)
        if not self.learned_lr:
            return inner  # type: ignore[return-value]
        return lambda inputs: inner(inputs)[0]

    def inner_loss_with_phi(
        self, phi: dict[str, Tensor]
    ) -> Callable[[dict[str, Tensor]], Tensor | tuple[Tensor, Tensor]]:
        """What the inner loop descends, with φ given explicitly: the loss, or (loss, step scale) with
        ``learned_lr`` (the engine's :data:`~ml3cli.engine.LossFn` contract)."""
        net = sequential_function(self.net, prefix="net.")
        if net is None:  # a subclass with another network
            if self.learned_lr:
                raise TypeError("learned_lr needs MetaLoss's own sequential network")
            return lambda inputs: functional_call(self, phi, (), inputs)

        def loss(inputs: dict[str, Tensor]) -> Tensor | tuple[Tensor, Tensor]:
            value, scale = self._loss_and_scale(net(phi, grouped_inputs(self.inputs, (), inputs)))
            return value if scale is None else (value, scale)

        return loss

    def _rows(self, x: Tensor) -> Tensor:
        """Per-sample values ``[batch]`` from the rows ``x``: M_φ of each row, summed over the group axes."""
        raw = self.net(x)
        rows = self.loss_output(raw[..., 0]) if self.learned_lr else raw.squeeze(-1)
        return rows.sum(dim=tuple(range(1, rows.ndim))) if rows.ndim > 1 else rows

    def pointwise(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        """The per-sample loss values, shape ``[batch]`` (what the mean in :meth:`forward` reduces): M_φ of each
        row, summed over the group axes of ``[batch, *groups, size]`` inputs (none for ``[batch, size]``)."""
        x, dtype = self._prepare(args, kwargs)
        return self._rows(x).to(dtype)

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        """The loss of a batch, ``mean_i Σ_c M_φ(x_{i,c})``, as a 0-dim tensor (the contract is in the class
        docstring)."""
        x, dtype = self._prepare(args, kwargs)
        return self._rows(x).mean().to(dtype)

    def as_loss_fn(self) -> Callable[[dict[str, Tensor]], Tensor | tuple[Tensor, Tensor]]:
        """This loss as the engine's :data:`~ml3cli.engine.LossFn` over a dict of named inputs: the loss, or
        (loss, step scale) with ``learned_lr``, so that meta-test steps the way meta-training did."""
        if self.learned_lr:
            return lambda inputs: self.loss_and_step_scale(**inputs)
        return lambda inputs: self(**inputs)

    def loss_and_step_scale(self, *args: Tensor, **kwargs: Tensor) -> tuple[Tensor, Tensor]:
        """The loss and the learned step scale (``learned_lr``): take the step θ − α·scale·∇_θ loss with the
        scale treated as a constant (``scale.detach()`` in an ordinary training loop)."""
        if not self.learned_lr:
            raise ValueError("this loss does not output a learning rate (it was not trained with learned_lr)")
        x, dtype = self._prepare(args, kwargs)
        value, scale = self._loss_and_scale(self.net(x))
        assert scale is not None
        return value.to(dtype), scale.to(dtype)

    def extra_repr(self) -> str:
        return f"inputs=({', '.join(i.label for i in self.inputs)})"


def _reduce(rows: Tensor) -> Tensor:
    """``[batch, *groups]`` row losses → the scalar loss: summed over the group axes, averaged over the batch."""
    rows = rows.sum(dim=tuple(range(1, rows.ndim))) if rows.ndim > 1 else rows
    return rows.mean()


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
