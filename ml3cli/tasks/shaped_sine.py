"""Sine frequency regression, the loss-shaping illustration (paper, sections 3.3 and 4.2.1, figure 5a–b).

Data sheet
    Tasks (``sine_frequency``): y = sin(ν x), ν ~ U[−5, 5], 64 training points x ~ U[−5, 5] (public reference;
    the paper uses x ∈ [−1, 1]) and 64 held-out query points of the same task.
    Optimizee: ŷ = sin(θ x) with ONE parameter ``omega`` (θ), always started at θ₀ = 0.1.
    Loss inputs: x, ŷ = sin(θ x) (``y_pred``) and y (``y_true``), one feature each per point.
    Task loss: MSE on the query points. Extra (shaping) term ``param_distance`` = (θ − ν)², meta-train only.
    Reported at meta-test: |θ − ν| and whether |θ − ν| < ``tolerance`` (0.1), per task.

MSE over θ is rippled with local minima (Parascandolo et al., 2017); the shaped learned loss should be one basin.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pydantic import Field, PositiveFloat, PositiveInt, field_validator
from torch import Tensor, nn

from ml3cli.metaloss import LossInput
from ml3cli.metaloss import huber as _huber
from ml3cli.metaloss import l1 as _l1
from ml3cli.metaloss import mse as _mse
from ml3cli.tasks.base import Task, TaskOptions, Theta
from ml3cli.tasks.sine import _check_range


class FrequencyBatch(NamedTuple):
    """A batch of sine-frequency tasks; shapes with the leading task axis ``n``."""

    x_support: Tensor  # [n, points, 1]
    y_support: Tensor  # [n, points, 1]
    x_query: Tensor  # [n, query_points, 1]
    y_query: Tensor  # [n, query_points, 1]
    frequency: Tensor  # [n]  ν, the ground truth


class SineFrequencyOptions(TaskOptions):
    """Settings of the sine-frequency task family (defaults: the public reference)."""

    points: PositiveInt = Field(64, description="training points per task (used by the inner steps)")
    query_points: PositiveInt = Field(64, description="held-out points per task (used by the task loss)")
    x_range: tuple[float, float] = Field((-5.0, 5.0), description="x ~ U[low, high]")
    frequency_range: tuple[float, float] = Field((-5.0, 5.0), description="ν ~ U[low, high] in y = sin(ν x)")
    theta0: float = Field(0.1, description="θ₀, the initial frequency of every optimizee")
    theta0_range: tuple[float, float] | None = Field(
        None,
        description="if set, θ₀ ~ U[low, high] per optimizee instead of the fixed theta0 (meta-train: shape the "
        "loss over the whole landscape, not only along the path from θ₀)",
    )
    theta0_wide_range: tuple[float, float] | None = Field(
        None, description="if set (with theta0_range), a share theta0_wide_share of the θ₀ ~ U[low, high] instead"
    )
    theta0_wide_share: float = Field(0.0, ge=0.0, le=1.0, description="the share of θ₀ drawn from theta0_wide_range")
    tolerance: PositiveFloat = Field(0.1, description="a task counts as solved when |θ − ν| < tolerance")

    _ranges = field_validator("x_range", "frequency_range")(_check_range)

    @field_validator("theta0_range", "theta0_wide_range")
    @classmethod
    def _theta0_range(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        return None if value is None else _check_range(value)


class SineFrequencyModel(nn.Module):
    """ŷ = sin(θ x) with the single parameter θ (``omega``)."""

    def __init__(self, theta0: float = 0.1):
        super().__init__()
        self.omega = nn.Parameter(torch.tensor([float(theta0)]))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.omega * x)


# Hand-written losses over the same inputs as M_φ; x is seen but not used.
def mse(x: Tensor, y_pred: Tensor, y_true: Tensor) -> Tensor:
    """Mean squared error (x unused)."""
    return _mse(y_pred, y_true)


def l1(x: Tensor, y_pred: Tensor, y_true: Tensor) -> Tensor:
    """Mean absolute error (x unused)."""
    return _l1(y_pred, y_true)


def huber(x: Tensor, y_pred: Tensor, y_true: Tensor) -> Tensor:
    """Huber loss with δ = 1 (x unused)."""
    return _huber(y_pred, y_true)


class SineFrequency(Task):
    name = "sine_frequency"
    summary = "y = sin(ν x), ν ~ U[−5, 5], fit ŷ = sin(θ x) from θ₀ = 0.1: the loss-shaping illustration"
    Options = SineFrequencyOptions
    loss_inputs_spec = (
        LossInput("x", 1, "the input x"),
        LossInput("y_pred", 1, "the optimizee's prediction ŷ = sin(θ x)"),
        LossInput("y_true", 1, "the target y = sin(ν x)"),
    )
    metric = "mse"
    builtin_losses = {"mse": mse, "l1": l1, "huber": huber}
    query_from_support = {"x_query": "x_support", "y_query": "y_support"}
    extra_term_names = ("param_distance",)

    def build_optimizee(self) -> nn.Module:
        return SineFrequencyModel(self.options.theta0)

    def init_theta(self, n: int, generator: torch.Generator) -> Theta:
        """θ₀ = ``theta0`` for every optimizee (no draw), or θ₀ ~ U[``theta0_range``] when that is set."""
        if self.options.theta0_range is None:
            return {"omega": torch.full((n, 1), float(self.options.theta0), device=self.device)}
        low, high = self.options.theta0_range
        theta0 = low + (high - low) * torch.rand(n, 1, generator=generator)
        if self.options.theta0_wide_range is not None and self.options.theta0_wide_share > 0:
            low, high = self.options.theta0_wide_range
            wide = low + (high - low) * torch.rand(n, 1, generator=generator)
            theta0 = torch.where(torch.rand(n, 1, generator=generator) < self.options.theta0_wide_share, wide, theta0)
        return {"omega": theta0.to(self.device)}

    def sample_tasks(self, n: int, generator: torch.Generator) -> FrequencyBatch:
        opts = self.options

        def uniform(low: float, high: float, *shape: int) -> Tensor:
            return low + (high - low) * torch.rand(*shape, generator=generator)

        frequency = uniform(*opts.frequency_range, n)
        x_support = uniform(*opts.x_range, n, opts.points, 1)
        x_query = uniform(*opts.x_range, n, opts.query_points, 1)

        def target(x: Tensor) -> Tensor:
            return torch.sin(frequency[:, None, None] * x)

        batch = FrequencyBatch(x_support, target(x_support), x_query, target(x_query), frequency)
        return FrequencyBatch(*(t.to(self.device) for t in batch))

    def loss_inputs(self, theta: Theta, task: FrequencyBatch) -> dict[str, Tensor]:
        return {"x": task.x_support, "y_pred": self.predict(theta, task.x_support), "y_true": task.y_support}

    def task_loss(self, theta: Theta, task: FrequencyBatch) -> Tensor:
        return _mse(self.predict(theta, task.x_query), task.y_query)

    def extra_term(self, name: str, theta: Theta, task: FrequencyBatch) -> Tensor:
        if name == "param_distance":
            return ((theta["omega"] - task.frequency) ** 2).sum()
        return super().extra_term(name, theta, task)

    def target_theta(self, task: FrequencyBatch) -> Theta:
        return {"omega": task.frequency.reshape(1)}

    def report_metrics(self, theta: Theta, task: FrequencyBatch) -> dict[str, Tensor]:
        error = (theta["omega"] - task.frequency).abs().sum()
        return {"|θ−ν|": error, f"|θ−ν|<{self.options.tolerance:g}": (error < self.options.tolerance).to(error.dtype)}
