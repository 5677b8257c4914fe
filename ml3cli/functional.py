"""Pure-function forms of small networks, for the inner loop's hot path.

``torch.func.functional_call`` swaps a module's parameters for the given tensors on every call, which costs about
100 µs on these CPUs: more than the whole forward pass of the paper's sine networks. An ``nn.Sequential`` of
``Linear`` layers and parameter-free activations is rewritten here once as a plain function of a parameter dict
that runs the same operations in the same order (so results are bit-identical); anything else falls back to
``functional_call``.
"""

from __future__ import annotations

from collections.abc import Callable

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
