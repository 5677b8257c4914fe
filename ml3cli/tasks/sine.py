"""Sine regression (paper, section 4.1.1 and appendix D).

Data sheet
    Meta-train (``sine``): y = sin(x − π), x ~ U[−2, 2], 100 points.
    Meta-test (``sine_shifted``): y = A·sin(x − ω), A ~ U[0.2, 5], ω ~ U[−π, π], x ~ U[−2, 2] (paper).
    Optimizee: MLP 1 → 40 → 40 → 1, ReLU (paper); the public reference uses 1 → 100 → 10 → 1.
    Loss inputs: ŷ = f_θ(x) (``y_pred``) and y (``y_true``), one feature each per point.
    Task loss: MSE on ``query_points`` fresh points of the same task (not the points of the inner step).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from pydantic import Field, PositiveInt, field_validator
from torch import Tensor, nn

from ml3cli.metaloss import ACTIVATIONS, LossInput, huber, l1, mse
from ml3cli.tasks.base import Task, TaskOptions, Theta


class SineBatch(NamedTuple):
    """A batch of sine tasks; shapes with the leading task axis ``n``."""

    x_support: Tensor  # [n, points, 1]  where the inner steps train
    y_support: Tensor  # [n, points, 1]
    x_query: Tensor  # [n, query_points, 1]  where the task loss is measured
    y_query: Tensor  # [n, query_points, 1]
    amplitude: Tensor  # [n]
    phase: Tensor  # [n]


def _check_range(value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if not low <= high:
        raise ValueError(f"expected [low, high] with low <= high, got [{low}, {high}]")
    return value


class SineOptions(TaskOptions):
    """Settings of a sine-regression task family."""

    points: PositiveInt = Field(100, description="training points per task (used by the inner steps)")
    query_points: PositiveInt = Field(100, description="held-out points per task (used by the task loss)")
    x_range: tuple[float, float] = Field((-2.0, 2.0), description="x ~ U[low, high]")
    amplitude_range: tuple[float, float] = Field((1.0, 1.0), description="A ~ U[low, high]")
    phase_range: tuple[float, float] = Field((math.pi, math.pi), description="ω ~ U[low, high] in y = A sin(x − ω)")
    hidden: list[PositiveInt] = Field([40, 40], description="hidden widths of the optimizee MLP")
    activation: str = Field("relu", description=f"optimizee activation, one of {sorted(ACTIVATIONS)}")

    _ranges = field_validator("x_range", "amplitude_range", "phase_range")(_check_range)

    @field_validator("activation")
    @classmethod
    def _known_activation(cls, value: str) -> str:
        if value not in ACTIVATIONS:
            raise ValueError(f"unknown activation {value!r}; expected one of {sorted(ACTIVATIONS)}")
        return value


class ShiftedSineOptions(SineOptions):
    amplitude_range: tuple[float, float] = Field((0.2, 5.0), description="A ~ U[low, high]")
    phase_range: tuple[float, float] = Field((-math.pi, math.pi), description="ω ~ U[low, high]")


class SineRegression(Task):
    name = "sine"
    summary = "y = sin(x − π), x ∈ [−2, 2], 100 points: the meta-train task of the paper"
    Options = SineOptions
    loss_inputs_spec = (
        LossInput("y_pred", 1, "the optimizee's prediction ŷ = f_θ(x)"),
        LossInput("y_true", 1, "the target y"),
    )
    metric = "mse"
    builtin_losses = {"mse": mse, "l1": l1, "huber": huber}
    query_from_support = {"x_query": "x_support", "y_query": "y_support"}

    def build_optimizee(self) -> nn.Module:
        opts = self.options
        layers: list[nn.Module] = []
        width = 1
        for h in opts.hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[opts.activation]()]
            width = h
        layers.append(nn.Linear(width, 1))
        return nn.Sequential(*layers)

    def sample_tasks(self, n: int, generator: torch.Generator) -> SineBatch:
        opts = self.options

        def uniform(low: float, high: float, *shape: int) -> Tensor:
            return low + (high - low) * torch.rand(*shape, generator=generator)

        amplitude = uniform(*opts.amplitude_range, n)
        phase = uniform(*opts.phase_range, n)
        x_support = uniform(*opts.x_range, n, opts.points, 1)
        x_query = uniform(*opts.x_range, n, opts.query_points, 1)

        def target(x: Tensor) -> Tensor:
            return amplitude[:, None, None] * torch.sin(x - phase[:, None, None])

        batch = SineBatch(x_support, target(x_support), x_query, target(x_query), amplitude, phase)
        return SineBatch(*(t.to(self.device) for t in batch))

    def loss_inputs(self, theta: Theta, task: SineBatch) -> dict[str, Tensor]:
        return {"y_pred": self.predict(theta, task.x_support), "y_true": task.y_support}

    def task_loss(self, theta: Theta, task: SineBatch) -> Tensor:
        return mse(self.predict(theta, task.x_query), task.y_query)


class ShiftedSineRegression(SineRegression):
    name = "sine_shifted"
    summary = "y = A·sin(x − ω), A ~ U[0.2, 5], ω ~ U[−π, π], x ∈ [−2, 2]: the meta-test tasks of the paper"
    Options = ShiftedSineOptions
