"""Loss landscapes: what a loss looks like to the optimizer, and what a learned loss has learned.

Three views (``ml3 landscape --mode …``):

* ``1d``: the loss against ONE parameter of the optimizee over a grid (for ``sine_frequency``: θ ∈ [−7, 7]), the
  other parameters held at θ₀, for several tasks; the task's target θ* is marked where the task knows it.
* ``2d``: the loss on the plane θ + α·d₁ + β·d₂ spanned by two random, filter-normalised directions around θ
  (Li et al., "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018): each filter (row of a weight
  matrix) of d is scaled to the norm of the same filter of θ; vectors (biases) get no direction.
* ``function``: the per-sample loss over a grid of two of its inputs (e.g. ŷ against y), the others fixed.

Figure of merit (1-D and 2-D): the *slope-toward-target fraction*, the share of grid points at which the
descent direction −∇L points toward the target (1.0 for a single basin around the target). The target is the
task's θ* where it has one (projected onto the plane in 2-D), else the grid point with the lowest task loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from ml3cli import files
from ml3cli.engine import LossFn, loss_value, sgd_step
from ml3cli.errors import ML3Error
from ml3cli.evaluate import NamedLoss
from ml3cli.metaloss import MetaLoss
from ml3cli.runtime import generator
from ml3cli.tasks.base import Task, Theta

MODES = ("1d", "2d", "function")


# -- helpers on θ ---------------------------------------------------------------------------------------------
def task_slice(batch: Any, i: int) -> Any:
    """Task ``i`` of a batch (a NamedTuple of tensors with a leading task axis), without the axis."""
    return type(batch)(*(t[i] for t in batch))


def theta_slice(theta: Theta, i: int) -> Theta:
    """θ of task ``i`` of a batch, without the task axis."""
    return {name: value[i] for name, value in theta.items()}


def parse_param(text: str | None, theta: Theta) -> tuple[str, int]:
    """``NAME`` or ``NAME:INDEX`` (flat index) → (name, index); without text, the only scalar parameter."""
    sizes = {name: value.numel() for name, value in theta.items()}
    described = ", ".join(f"{n}[{s}]" for n, s in sizes.items())
    if text is None:
        if len(sizes) == 1 and next(iter(sizes.values())) == 1:
            return next(iter(sizes)), 0
        raise ML3Error(f"--param is needed for this optimizee: give NAME or NAME:INDEX of one of {described}")
    name, sep, index_text = text.partition(":")
    if name not in sizes:
        raise ML3Error(f"--param {text!r}: no parameter {name!r}; the optimizee has {described}")
    if not sep:
        if sizes[name] != 1:
            raise ML3Error(f"--param {text!r}: {name} has {sizes[name]} entries; give NAME:INDEX")
        return name, 0
    try:
        index = int(index_text)
    except ValueError:
        raise ML3Error(f"--param {text!r}: the part after ':' must be an integer index") from None
    if not 0 <= index < sizes[name]:
        raise ML3Error(f"--param {text!r}: index out of range 0 … {sizes[name] - 1}")
    return name, index


def _with_entry(theta: Theta, name: str, index: int, value: Tensor) -> Theta:
    """θ with the flat entry ``index`` of ``theta[name]`` replaced by the scalar ``value`` (differentiable)."""
    base = theta[name]
    mask = torch.zeros(base.numel(), dtype=base.dtype, device=base.device)
    mask[index] = 1.0
    flat = base.reshape(-1) * (1 - mask) + value * mask
    return {**theta, name: flat.reshape(base.shape)}


# -- the figure of merit --------------------------------------------------------------------------------------
def slope_toward_target(values: np.ndarray, slopes: np.ndarray, target: float, tol: float | None = None) -> float:
    """1-D: the share of grid points ``values`` at which −slope points toward ``target``.

    Points closer to the target than ``tol`` (default: half the grid spacing) are left out; a zero slope
    elsewhere does not point anywhere and counts as not toward the target.
    """
    values, slopes = np.asarray(values, float), np.asarray(slopes, float)
    if tol is None:
        tol = 0.5 * float(np.min(np.diff(np.sort(values)))) if values.size > 1 else 0.0
    keep = np.abs(values - target) > tol
    if not keep.any():
        return math.nan
    toward = np.sign(-slopes[keep]) == np.sign(target - values[keep])
    return float(toward.mean())


def slope_toward_target_2d(
    alphas: np.ndarray, betas: np.ndarray, grid: np.ndarray, target: tuple[float, float]
) -> float:
    """2-D: the share of grid points at which −∇L (finite differences) has a positive component toward ``target``.

    ``grid[i, j]`` is the loss at (alphas[i], betas[j]); the grid cell holding the target is left out.
    """
    g_alpha, g_beta = np.gradient(np.asarray(grid, float), alphas, betas)
    a, b = np.meshgrid(alphas, betas, indexing="ij")
    to_a, to_b = target[0] - a, target[1] - b
    spacing = max(float(np.min(np.diff(alphas))), float(np.min(np.diff(betas))))
    keep = np.hypot(to_a, to_b) > 0.5 * spacing
    if not keep.any():
        return math.nan
    inner = -(g_alpha * to_a + g_beta * to_b)
    return float((inner[keep] > 0).mean())


# -- 1-D ------------------------------------------------------------------------------------------------------
def sweep_1d(
    task: Task, loss_fn: LossFn, theta: Theta, batch: Any, name: str, index: int, values: Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """The loss and its slope d loss / d θ[name][index] at each of ``values`` (one task, no task axis)."""

    def at(value: Tensor) -> Tensor:
        return loss_value(loss_fn(task.loss_inputs(_with_entry(theta, name, index, value), batch)))

    slopes, losses = vmap(grad_and_value(at))(values)
    return losses.detach().cpu().double().numpy(), slopes.detach().cpu().double().numpy()


def task_loss_1d(task: Task, theta: Theta, batch: Any, name: str, index: int, values: Tensor) -> np.ndarray:
    """The task loss with entry ``index`` of parameter ``name`` set to each of ``values`` (the rest at θ)."""
    with torch.no_grad():
        out = vmap(lambda v: task.task_loss(_with_entry(theta, name, index, v), batch))(values)
    return out.cpu().double().numpy()


@dataclass
class Landscape1D:
    param: str
    values: np.ndarray  # [G]
    targets: list[float]  # per task
    target_source: str  # "θ*" or "task-loss argmin"
    losses: dict[str, np.ndarray] = field(default_factory=dict)  # label → [tasks, G]
    slopes: dict[str, np.ndarray] = field(default_factory=dict)  # label → [tasks, G]
    task_losses: np.ndarray | None = None  # [tasks, G]
    axis: str = "θ"  # the axis label: θ for a one-parameter optimizee, else θ[param]

    def slope_fractions(self) -> dict[str, list[float]]:
        return {
            label: [slope_toward_target(self.values, s, t) for s, t in zip(slopes, self.targets, strict=True)]
            for label, slopes in self.slopes.items()
        }

    def to_csv(self) -> str:
        rows = []
        for k, target in enumerate(self.targets):
            for g, value in enumerate(self.values):
                row: dict[str, Any] = {"task": k, "target": target, self.param: float(value)}
                for label in self.losses:
                    row[f"{label}"] = float(self.losses[label][k, g])
                    row[f"{label}/slope"] = float(self.slopes[label][k, g])
                if self.task_losses is not None:
                    row["task_loss"] = float(self.task_losses[k, g])
                rows.append(row)
        return files.csv_text(rows)


def landscape_1d(
    task: Task,
    losses: Sequence[NamedLoss],
    n_tasks: int,
    seed: int,
    param: str | None,
    low: float,
    high: float,
    points: int,
    on_task: Callable[[int], None] | None = None,
) -> Landscape1D:
    """The 1-D landscape of each loss over ``points`` values of one parameter in [low, high], for ``n_tasks`` tasks.

    ``on_task(done)`` is called after each task (for progress bars)."""
    gen = generator(seed)
    batch = task.sample_tasks(n_tasks, gen)
    theta = task.init_theta(n_tasks, gen)
    name, index = parse_param(param, theta_slice(theta, 0))
    label = name if theta[name][0].numel() == 1 else f"{name}:{index}"
    values = torch.linspace(low, high, points, dtype=theta[name].dtype, device=theta[name].device)
    grid = values.cpu().double().numpy()
    only_parameter = len(theta) == 1 and theta[name][0].numel() == 1
    result = Landscape1D(label, grid, [], "θ*", axis="θ" if only_parameter else f"θ[{label}]")
    task_losses = []
    for k in range(n_tasks):
        one, th = task_slice(batch, k), theta_slice(theta, k)
        task_losses.append(task_loss_1d(task, th, one, name, index, values))
        star = task.target_theta(one)
        if star is not None and name in star:
            result.targets.append(float(star[name].reshape(-1)[index]))
        else:
            result.target_source = "task-loss argmin"
            result.targets.append(float(grid[int(np.argmin(task_losses[-1]))]))
        for loss in losses:
            value, slope = sweep_1d(task, loss.fn, th, one, name, index, values)
            result.losses.setdefault(loss.label, []).append(value)  # type: ignore[arg-type]
            result.slopes.setdefault(loss.label, []).append(slope)  # type: ignore[arg-type]
        if on_task is not None:
            on_task(k + 1)
    result.losses = {k: np.stack(v) for k, v in result.losses.items()}
    result.slopes = {k: np.stack(v) for k, v in result.slopes.items()}
    result.task_losses = np.stack(task_losses)
    return result


# -- 2-D ------------------------------------------------------------------------------------------------------
def filter_normalized_direction(theta: Theta, gen: torch.Generator) -> Theta:
    """A random direction with each filter scaled to the norm of θ's filter (Li et al., 2018).

    A filter is a slice along the first axis of a tensor with two or more dimensions (a row of a linear layer's
    weight, an output channel of a convolution). Vectors and scalars (biases) get a zero direction, as in the
    paper's plots.
    """
    direction = {}
    for name, w in theta.items():
        if w.dim() <= 1:
            direction[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=gen, dtype=w.dtype).to(w.device)
        d_norm = d.reshape(d.shape[0], -1).norm(dim=1)
        w_norm = w.reshape(w.shape[0], -1).norm(dim=1)
        scale = (w_norm / (d_norm + 1e-10)).reshape(-1, *([1] * (w.dim() - 1)))
        direction[name] = d * scale
    if all(float(d.abs().sum()) == 0 for d in direction.values()):
        shapes = ", ".join(f"{n}{tuple(v.shape)}" for n, v in theta.items())
        raise ML3Error(
            f"this optimizee has no weight matrices ({shapes}): a filter-normalised plane needs them; use --mode 1d"
        )
    return direction


def _flat(theta: Theta) -> Tensor:
    return torch.cat([v.reshape(-1) for v in theta.values()])


def plane_coordinates(theta: Theta, d1: Theta, d2: Theta, point: Theta) -> tuple[float, float]:
    """Least-squares coordinates (α, β) of ``point − θ`` in the plane spanned by d₁, d₂."""
    basis = torch.stack([_flat(d1), _flat(d2)], dim=1).double()
    offset = (_flat(point) - _flat(theta)).double()
    solution = torch.linalg.lstsq(basis, offset[:, None]).solution[:, 0]
    return float(solution[0]), float(solution[1])


@dataclass
class Landscape2D:
    alphas: np.ndarray
    betas: np.ndarray
    target: tuple[float, float]
    target_source: str
    center: str
    grids: dict[str, np.ndarray] = field(default_factory=dict)  # label → [A, B]
    task_loss: np.ndarray | None = None

    def slope_fractions(self) -> dict[str, float]:
        return {
            label: slope_toward_target_2d(self.alphas, self.betas, g, self.target) for label, g in self.grids.items()
        }

    def to_csv(self) -> str:
        rows = []
        for i, a in enumerate(self.alphas):
            for j, b in enumerate(self.betas):
                row: dict[str, Any] = {"alpha": float(a), "beta": float(b)}
                for label, g in self.grids.items():
                    row[label] = float(g[i, j])
                if self.task_loss is not None:
                    row["task_loss"] = float(self.task_loss[i, j])
                rows.append(row)
        return files.csv_text(rows)


def plane_values(task: Task, fn, theta: Theta, d1: Theta, d2: Theta, alphas: Tensor, betas: Tensor) -> np.ndarray:
    """``fn(θ + α d₁ + β d₂)`` over the grid, one row of α at a time (vmap over β)."""
    rows = []
    with torch.no_grad():
        for a in alphas:
            point = vmap(lambda b, a=a: fn({k: theta[k] + a * d1[k] + b * d2[k] for k in theta}))
            rows.append(point(betas).cpu().double().numpy())
    return np.stack(rows)


def landscape_2d(
    task: Task,
    losses: Sequence[NamedLoss],
    seed: int,
    span: float,
    points: int,
    center_steps: int = 0,
    center_loss: NamedLoss | None = None,
    on_loss: Callable[[int], None] | None = None,
) -> Landscape2D:
    """The loss surface of one task on a random filter-normalised plane around θ₀ (or θ after ``center_steps``).

    ``on_loss(done)`` is called after each loss (for progress bars)."""
    gen = generator(seed)
    batch = task_slice(task.sample_tasks(1, gen), 0)
    theta = theta_slice(task.init_theta(1, gen), 0)
    center = "θ₀"
    if center_steps > 0:
        if center_loss is None:
            raise ML3Error("--center-steps needs a loss to train the centre with")
        with torch.no_grad():
            for _ in range(center_steps):
                theta = sgd_step(task, center_loss.fn, theta, batch, center_loss.lr)
        center = f"θ after {center_steps} SGD steps with {center_loss.label} (lr {center_loss.lr:g})"
    d1 = filter_normalized_direction(theta, gen)
    d2 = filter_normalized_direction(theta, gen)
    alphas = torch.linspace(-span, span, points, dtype=torch.float32)
    betas = alphas.clone()
    grid_a, grid_b = alphas.double().numpy(), betas.double().numpy()
    task_loss = plane_values(task, lambda th: task.task_loss(th, batch), theta, d1, d2, alphas, betas)
    star = task.target_theta(batch)
    if star is not None and set(star) == set(theta):
        target, source = plane_coordinates(theta, d1, d2, star), "θ* projected onto the plane"
    else:
        i, j = np.unravel_index(int(np.argmin(task_loss)), task_loss.shape)
        target, source = (float(grid_a[i]), float(grid_b[j])), "task-loss argmin on the plane"
    result = Landscape2D(grid_a, grid_b, target, source, center, task_loss=task_loss)
    for done, loss in enumerate(losses, 1):
        result.grids[loss.label] = plane_values(
            task, lambda th, fn=loss.fn: loss_value(fn(task.loss_inputs(th, batch))), theta, d1, d2, alphas, betas
        )
        if on_loss is not None:
            on_loss(done)
    return result


# -- the function view ----------------------------------------------------------------------------------------
@dataclass
class FunctionView:
    axes: tuple[str, str]
    a_values: np.ndarray
    b_values: np.ndarray
    fixed: dict[str, float]
    grids: dict[str, np.ndarray] = field(default_factory=dict)  # label → [A, B]

    def to_csv(self) -> str:
        rows = []
        for i, a in enumerate(self.a_values):
            for j, b in enumerate(self.b_values):
                row: dict[str, Any] = {self.axes[0]: float(a), self.axes[1]: float(b)}
                row.update({k: v for k, v in self.fixed.items()})
                row.update({label: float(g[i, j]) for label, g in self.grids.items()})
                rows.append(row)
        return files.csv_text(rows)


def pointwise_fn(loss: NamedLoss, module: MetaLoss | None, builtin) -> Any:
    """Per-sample loss values over inputs with a leading sample axis."""
    if module is not None:
        return lambda inputs: module.pointwise(**inputs)
    return vmap(lambda inputs: builtin(**{k: v[None] for k, v in inputs.items()}))


def function_view(
    task: Task,
    pointwise: dict[str, Any],
    axes: tuple[str, str],
    low: float,
    high: float,
    points: int,
    fixed: dict[str, float],
) -> FunctionView:
    """Each loss's per-sample value over a grid of two of its inputs; every other input fixed."""
    spec = {item.name: item for item in task.loss_inputs_spec}
    for name in axes:
        if name not in spec:
            raise ML3Error(f"--axes: {name!r} is not a loss input of {task.name!r} (inputs: {', '.join(spec)})")
        if spec[name].size != 1:
            raise ML3Error(f"--axes: {name!r} has {spec[name].size} features; only single-feature inputs can be axes")
    if axes[0] == axes[1]:
        raise ML3Error("--axes: give two different inputs")
    unknown = sorted(set(fixed) - set(spec))
    if unknown:
        raise ML3Error(f"--fix: {unknown} not loss inputs of {task.name!r} (inputs: {', '.join(spec)})")
    both = sorted(set(fixed) & set(axes))
    if both:
        raise ML3Error(f"--fix: {both} are axes of the plot; fix only the other inputs")
    values = torch.linspace(low, high, points, dtype=torch.float32, device=task.device)
    a, b = torch.meshgrid(values, values, indexing="ij")
    inputs: dict[str, Tensor] = {}
    used_fixed = {}
    for name, item in spec.items():
        if name == axes[0]:
            inputs[name] = a.reshape(-1, 1)
        elif name == axes[1]:
            inputs[name] = b.reshape(-1, 1)
        else:
            used_fixed[name] = float(fixed.get(name, 0.0))
            inputs[name] = torch.full((a.numel(), item.size), used_fixed[name], device=task.device)
    grid = values.cpu().double().numpy()
    view = FunctionView(axes, grid, grid, used_fixed)
    with torch.no_grad():
        for label, fn in pointwise.items():
            view.grids[label] = fn(inputs).reshape(points, points).cpu().double().numpy()
    return view
