"""Mountain car with an intermediate goal: loss shaping for RL (paper, section 4.2.3, figure 6a–b).

Data sheet
    System: the differentiable car of :mod:`ml3cli.envs.mountain_car` (m = 0.2, g = −9.8, friction 0.3, dt = 0.1,
    actions clamped to ±0.25, walls at x = −1.2 and 0.5, speed ±1.5). A task is one start state (−0.55, 0) (or
    a small uniform perturbation of it, ``start_noise``), the goal (0.5, 1.0375) and the intermediate goal
    (−0.947, −0.0055); horizon 35 steps.
    Optimizee: a deterministic policy π_θ(s) → a, an MLP 2 → ``hidden`` → 1 (default: linear without bias, as the
    reference's 2 → 200 → 1 without activations or biases; a bias lets a learned loss fall into "always push left",
    measured) whose output z is squashed into ±0.25 so that the action clamp never binds:
    ``softsign`` (default) 0.25·z/(1 + |z|), or ``tanh`` 0.25·tanh(z); or z is passed to the dynamics' clamp as it
    is (``clamp``, zero gradient while saturated: the public reference's choice). Why softsign: a learned loss
    that takes one big step saturates the policy; under tanh the gradient then vanishes exponentially (e^−2|z|),
    the meta-gradient with it, and meta-training stalls for good (measured); softsign's decays as 1/(1 + |z|)²,
    small but still there for Adam to use. Both are the true derivative of the squash, nothing straight-through.
    The policy sees (c_x·x, c_v·v) (``state_scale``, default (1, 1): the state as it is). The recipes use (1, 10):
    the policies that reach the goal have θ_v ≳ 20 and θ_x ∈ [0.5, 5] (grid over θ), so with c_v = 10 they are O(1)
    away from θ₀ ~ U[±0.71]² instead of ~25.
    Loss inputs, one row per time step t = 0 … T−1 of a rollout of π_θ from the start: the state s_t (``state``,
    2), the action a_t (``action``, 1) and the final distance ‖s_T − goal‖ (``final_distance``, 1, the same on
    every row), as the reference. With ``loss_gradient: dynamics`` (the reference) they are differentiable with
    respect to θ through the car; with ``policy`` (the recipes) the states and the final distance are data and θ
    enters through the actions π_θ(s_t) alone, as on a real system — a hand-written loss of the final distance then
    has no gradient, so the direct task loss is descended with ``dynamics``.
    Task loss: ‖s_T − goal‖, the distance of the final state (position and velocity) to the goal, on a rollout of
    θ (the paper's figure 6b metric). Extra (shaping) terms, meta-train only:
    ``intermediate_goal`` = mean over t = 1 … 15 of ‖s_t − intermediate goal‖ (first go back left to swing up);
    ``goal_tracking`` = mean over t = 16 … T of ‖s_t − goal‖ (then be at the goal; the reference's shaped task
    loss is ‖s_{0:15} − g_int‖ + ‖s_{15:T} − g‖ over the stacked states).
    Reported at meta-test: the final position x_T and whether x_T ≥ ``reach_x`` (0.45).
    Hand-written loss: ``final_distance`` (the task loss itself, descended directly: the "direct task loss").
    Environment samples (``Task.environment_samples``): every step of the car this task takes, one per task and
    time step, for loss inputs, task loss, shaping terms and report metrics alike (the car is the environment, and a
    rollout recomputed for another purpose is counted again).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, field_validator, model_validator
from torch import Tensor, nn

from ml3cli.envs.mountain_car import GOAL, HORIZON, INTERMEDIATE_GOAL, INTERMEDIATE_STEPS, START, MountainCar
from ml3cli.functional import vmap_batch_size
from ml3cli.metaloss import ACTIVATIONS, LossInput
from ml3cli.tasks.base import Task, TaskOptions, Theta


class CarBatch(NamedTuple):
    """A batch of mountain-car tasks; shapes with the leading task axis ``n``."""

    start: Tensor  # [n, 2]  s_0
    goal: Tensor  # [n, 2]
    intermediate_goal: Tensor  # [n, 2]


class MountainCarOptions(TaskOptions):
    """Settings of the mountain-car task (defaults: the paper and the public reference)."""

    horizon: PositiveInt = Field(HORIZON, description="T, steps per rollout")
    start: tuple[float, float] = Field(START, description="s_0 = (x, v)")
    start_noise: NonNegativeFloat = Field(0.0, description="s_0 + U[−noise, noise] per coordinate, per task")
    goal: tuple[float, float] = Field(GOAL, description="the goal state (x, v)")
    intermediate_goal: tuple[float, float] = Field(INTERMEDIATE_GOAL, description="the intermediate goal (x, v)")
    intermediate_steps: PositiveInt = Field(
        INTERMEDIATE_STEPS, description="steps 1 … this aim at the intermediate goal"
    )
    hidden: list[PositiveInt] = Field([], description="the policy's hidden layer widths ([]: a linear policy)")
    activation: str = Field("tanh", description="the policy's hidden activation")
    bias: bool = Field(False, description="the policy's layers have biases (the reference's have none)")
    squash: Literal["softsign", "tanh", "clamp"] = Field(
        "softsign",
        description="a = 0.25·z/(1 + |z|) (gradient decays polynomially), 0.25·tanh(z) (exponentially), or z through "
        "the dynamics' clamp (zero gradient when saturated)",
    )
    bounds: bool = Field(True, description="walls at x = −1.2 and 0.5 and speed limit ±1.5 (the reference car)")
    state_scale: tuple[PositiveFloat, PositiveFloat] = Field(
        (1.0, 1.0), description="the policy sees (c_x·x, c_v·v): an input scale, so that good θ are O(1) like θ₀"
    )
    reach_x: float = Field(0.45, description="x_T at or above this counts as reaching the goal")
    loss_gradient: Literal["dynamics", "policy"] = Field(
        "dynamics",
        description="how the learned loss's gradient reaches θ: through the whole differentiable rollout "
        "(the reference) or through the policy's actions π_θ(s_t) only, the visited states and the final distance "
        "taken as data (as on a real system, algorithm 5)",
    )

    @field_validator("activation")
    @classmethod
    def _known_activation(cls, value: str) -> str:
        if value not in ACTIVATIONS:
            raise ValueError(f"unknown activation {value!r}; known: {', '.join(sorted(ACTIVATIONS))}")
        return value

    @model_validator(mode="after")
    def _intermediate_inside_horizon(self) -> MountainCarOptions:
        if self.intermediate_steps >= self.horizon:
            raise ValueError(f"intermediate_steps ({self.intermediate_steps}) must be below horizon ({self.horizon})")
        return self


class CarPolicy(nn.Module):
    """π_θ(s): an MLP from the state (x, v) to one action, squashed to ±``max_action`` by tanh or left raw."""

    def __init__(
        self,
        hidden: list[int],
        activation: str,
        squash: str,
        max_action: float,
        bias: bool = False,
        state_scale: tuple[float, float] = (1.0, 1.0),
    ):
        super().__init__()
        self.register_buffer("state_scale", torch.tensor(state_scale), persistent=False)
        layers: list[nn.Module] = []
        width = 2
        for h in hidden:
            layers += [nn.Linear(width, h, bias=bias), ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, 1, bias=bias))
        self.net = nn.Sequential(*layers)
        self.squash = squash
        self.max_action = max_action

    def forward(self, state: Tensor) -> Tensor:
        out = self.net(state * self.state_scale)
        if self.squash == "softsign":
            return self.max_action * out / (1 + out.abs())
        return self.max_action * torch.tanh(out) if self.squash == "tanh" else out


def final_distance(state: Tensor, action: Tensor, final_distance: Tensor) -> Tensor:
    """The direct task loss: the final distance ‖s_T − goal‖ (the same on every row, so the mean is it)."""
    return final_distance.mean()


class MountainCarTask(Task):
    name = "mountain_car"
    summary = "drive an under-actuated car up the hill to (0.5, 1.0375) in 35 steps; policy π_θ(s) → a"
    Options = MountainCarOptions
    loss_inputs_spec = (
        LossInput("state", 2, "the state s_t = (x, v) at step t"),
        LossInput("action", 1, "the action a_t = π_θ(s_t)"),
        LossInput("final_distance", 1, "‖s_T − goal‖ of the rollout (the same on every row)"),
    )
    metric = "final_distance"
    builtin_losses = {"final_distance": final_distance}
    extra_term_names = ("intermediate_goal", "goal_tracking")

    def __init__(self, options: MountainCarOptions | None = None, device: torch.device | str = "cpu"):
        super().__init__(options, device)
        self.car = MountainCar(bounds=self.options.bounds)

    def build_optimizee(self) -> nn.Module:
        opts = self.options
        return CarPolicy(
            list(opts.hidden), opts.activation, opts.squash, MountainCar().max_action, opts.bias, opts.state_scale
        )

    def sample_tasks(self, n: int, generator: torch.Generator) -> CarBatch:
        opts = self.options
        start = torch.tensor(opts.start).expand(n, 2).clone()
        if opts.start_noise > 0:
            start = start + opts.start_noise * (2 * torch.rand(n, 2, generator=generator) - 1)
        batch = CarBatch(
            start,
            torch.tensor(opts.goal).expand(n, 2).clone(),
            torch.tensor(opts.intermediate_goal).expand(n, 2).clone(),
        )
        return CarBatch(*(t.to(self.device) for t in batch))

    def rollout(self, theta: Theta, task: CarBatch) -> tuple[Tensor, Tensor]:
        """States ``[T + 1, 2]`` and actions ``[T, 1]`` of π_θ from the task's start (ONE task)."""
        self.environment_samples += vmap_batch_size(task.start) * self.options.horizon
        return self.car.rollout(lambda s: self.predict(theta, s), task.start, self.options.horizon)

    def loss_inputs(self, theta: Theta, task: CarBatch) -> dict[str, Tensor]:
        if self.options.loss_gradient == "policy":
            # ∂s_t/∂θ through the car grows by orders of magnitude when a rollout grazes the hill top, and so does
            # the inner step; through the actions alone it is bounded by the squash's slope and |s|. The rollout is
            # data, so it is run without recording a graph.
            with torch.no_grad():
                states, _ = self.rollout(theta, task)
            actions = self.predict(theta, states[:-1])
        else:
            states, actions = self.rollout(theta, task)
        distance = torch.linalg.vector_norm(states[-1] - task.goal)
        return {
            "state": states[:-1],
            "action": actions,
            "final_distance": distance.expand(actions.shape[0]).unsqueeze(-1),
        }

    def task_loss(self, theta: Theta, task: CarBatch) -> Tensor:
        states, _ = self.rollout(theta, task)
        return torch.linalg.vector_norm(states[-1] - task.goal)

    def extra_term(self, name: str, theta: Theta, task: CarBatch) -> Tensor:
        split = self.options.intermediate_steps
        if name == "intermediate_goal":
            states, _ = self.rollout(theta, task)
            return torch.linalg.vector_norm(states[1 : split + 1] - task.intermediate_goal, dim=-1).mean()
        if name == "goal_tracking":
            states, _ = self.rollout(theta, task)
            return torch.linalg.vector_norm(states[split + 1 :] - task.goal, dim=-1).mean()
        return super().extra_term(name, theta, task)

    def report_metrics(self, theta: Theta, task: CarBatch) -> dict[str, Tensor]:
        states, _ = self.rollout(theta, task)
        x_final = states[-1, 0]
        return {"x_T": x_final, f"x_T≥{self.options.reach_x:g}": (x_final >= self.options.reach_x).to(x_final.dtype)}
