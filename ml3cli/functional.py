"""Pure-function forms of small networks, for the inner loop's hot path.

``torch.func.functional_call`` swaps a module's parameters for the given tensors on every call, which costs about
100 µs on these CPUs: more than the whole forward pass of the paper's sine networks. An ``nn.Sequential`` of
``Linear`` layers and parameter-free activations is rewritten here once as a plain function of a parameter dict
that runs the same operations in the same order (so results are bit-identical); anything else falls back to
``functional_call``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

Params = dict[str, Tensor]

#: activations without parameters or state whose forward is a pure function of its input.
STATELESS = (nn.ReLU, nn.ELU, nn.Tanh, nn.Softplus, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Identity)


def sequential_function(module: nn.Module, prefix: str = "") -> Callable[[Params, Tensor], Tensor] | None:
    """``(params, x) ↦ module(x)`` with ``params`` named as in ``module`` (with ``prefix``), or None when
    ``module`` is not an ``nn.Sequential`` of ``Linear`` layers and :data:`STATELESS` activations."""
    if not isinstance(module, nn.Sequential) or module._forward_hooks or module._forward_pre_hooks:
        return None
    plan: list[tuple[str, str | None] | nn.Module] = []
    for name, child in module.named_children():
        if child._forward_hooks or child._forward_pre_hooks:
            return None
        if type(child) is nn.Linear:
            plan.append((f"{prefix}{name}.weight", f"{prefix}{name}.bias" if child.bias is not None else None))
        elif type(child) in STATELESS:
            plan.append(child)
        else:
            return None

    def forward(params: Params, x: Tensor) -> Tensor:
        for step in plan:
            if isinstance(step, tuple):
                weight, bias = step
                x = F.linear(x, params[weight], params[bias] if bias is not None else None)
            else:
                x = step.forward(x)
        return x

    return forward


def module_function(module: nn.Module) -> Callable[[Params, Tensor], Tensor]:
    """``(params, x) ↦ module(x)``: the fast form where :func:`sequential_function` applies, else ``functional_call``."""
    fast = sequential_function(module)
    if fast is not None:
        return fast
    return lambda params, x: functional_call(module, params, (x,))


def vmap_batch_size(tensor: Tensor) -> int:
    """How many examples ``tensor`` stands for: the product of the sizes of the ``torch.func.vmap`` dimensions it
    carries (1 outside ``vmap``). A task's per-task function runs once for a whole vmapped batch, so a counter of
    simulator steps kept there (:attr:`ml3cli.tasks.base.Task.environment_samples`) multiplies by this. It reads
    functorch's wrappers (``torch._C._functorch``): there is no public way to ask a tensor for its batch size."""
    from torch._C import _functorch

    size = 1
    while _functorch.is_functorch_wrapped_tensor(tensor):
        if _functorch.is_batchedtensor(tensor):
            tensor, dim = _functorch._unwrap_batched(tensor, _functorch.maybe_get_level(tensor))
            size *= tensor.shape[dim] if dim is not None else 1
        else:  # a grad transform's wrapper: the same examples
            tensor = _functorch.get_unwrapped(tensor)
    return size


# -- convolutions with a weight per optimizee ---------------------------------------------------------------
def per_optimizee_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=padding)`` (stride 1), fast under ``torch.func.vmap`` over optimizees.

    ``vmap`` of ``F.conv2d`` with a weight per optimizee becomes one grouped convolution (a group per optimizee),
    and oneDNN's grouped convolutions with LeNet's few channels per group run several times slower than the same
    convolutions one optimizee at a time. Under ``vmap`` this runs the plain convolution of each optimizee in
    turn instead, forward and backward; second-order terms (meta-training through the inner steps) go through
    PyTorch's own double-backward. Outside ``vmap`` it is ``F.conv2d``. The numbers equal ``F.conv2d``'s to
    float32 rounding (another kernel, another summation order; ``tests/test_lenet_fast.py``).
    """
    return _PerOptimizeeConv.apply(x, weight, bias, padding)


def _per_optimizee(tensor: Tensor | None, dim: int | None, size: int) -> list[Tensor | None]:
    """The ``size`` slices of ``tensor`` along its vmap dimension ``dim`` (the same tensor for all when None)."""
    if tensor is None:
        return [None] * size
    return list(tensor.movedim(dim, 0) if dim is not None else tensor.expand(size, *tensor.shape))


def _conv_backward(grad: Tensor, x: Tensor, weight: Tensor, padding: int, mask: list[bool]):
    return torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]], [1, 1], [padding, padding], [1, 1], False, [0, 0], 1, mask
    )


class _PerOptimizeeConv(torch.autograd.Function):
    @staticmethod
    def forward(x, weight, bias, padding):
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, padding = inputs
        ctx.save_for_backward(x, weight)
        ctx.padding = padding

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        return *_PerOptimizeeConvBackward.apply(grad, x, weight, ctx.padding, mask), None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, padding):
        n = info.batch_size
        xs, ws, bs = (_per_optimizee(t, d, n) for t, d in zip((x, weight, bias), in_dims[:3], strict=True))
        return torch.stack([F.conv2d(xs[i], ws[i], bs[i], padding=padding) for i in range(n)]), 0


class _PerOptimizeeConvBackward(torch.autograd.Function):
    """(∂x, ∂weight, ∂bias) of the convolution for the output gradient ``grad`` (None where ``mask`` is False)."""

    @staticmethod
    def forward(grad, x, weight, padding, mask):
        return _conv_backward(grad, x, weight, padding, mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, x, weight, padding, mask = inputs
        ctx.save_for_backward(grad, x, weight)
        ctx.padding, ctx.mask = padding, mask

    @staticmethod
    def backward(ctx, grad_gx, grad_gw, grad_gb):
        grad, x, weight = ctx.saved_tensors
        p = ctx.padding
        wanted = list(ctx.needs_input_grad[:3])  # grad, x, weight: PyTorch's own order here
        of_grad, of_x, of_weight = torch.ops.aten._convolution_double_backward(
            grad_gx, grad_gw, grad_gb, grad, weight, x, [1, 1], [p, p], [1, 1], False, [0, 0], 1, wanted
        )
        return of_grad, of_x, of_weight, None, None

    @staticmethod
    def vmap(info, in_dims, grad, x, weight, padding, mask):
        n = info.batch_size
        gs, xs, ws = (_per_optimizee(t, d, n) for t, d in zip((grad, x, weight), in_dims[:3], strict=True))
        parts = [_conv_backward(gs[i], xs[i], ws[i], padding, mask) for i in range(n)]
        stacked = tuple(torch.stack([part[k] for part in parts]) if mask[k] else None for k in range(3))
        return stacked, tuple(0 if mask[k] else None for k in range(3))
