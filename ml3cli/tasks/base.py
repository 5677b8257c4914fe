"""The task protocol: how an experiment plugs into the engine without the engine knowing what it is.

A task family supplies (paper, section 3.1 and algorithms 1–2):

* ``sample_tasks(n, generator)``: a batch of ``n`` tasks as a named tuple of tensors with a leading task axis
  (the engine ``vmap``s over it);
* ``build_optimizee()`` / ``init_theta(n, generator)``: the optimizee f_θ and ``n`` fresh initialisations θ₀;
* ``loss_inputs(theta, task)``: the named inputs of the loss for one task (M_φ's inputs, and those of the
  hand-written baselines), computed from the optimizee's predictions on the task's training (support) data;
* ``task_loss(theta, task)``: L_T for one task, measured on query data that the inner steps did not see; it is
  also the metric reported at meta-test;
* ``extra_term(name, theta, task)``: named shaping terms that exist only at meta-train time (paper, equation 9);
* ``builtin_losses``: hand-written losses over the same inputs (``mse`` …), the first one being the baseline.

Everything per task is a pure function of ``theta`` (a ``dict[str, Tensor]``) so that ``torch.func`` can
differentiate and vectorise through it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import Tensor, nn

from ml3cli.errors import ML3Error
from ml3cli.functional import module_function
from ml3cli.metaloss import LossInput

Theta = dict[str, Tensor]


#: bounds on every task's sizes, far above any real task's and checked before anything is allocated: a count
#: (points, episodes, horizon …), a width in a list (hidden layers) and the length of a list
MAX_COUNT, MAX_LIST_WIDTH, MAX_LIST = 1_000_000, 65_536, 1_000


class TaskOptions(BaseModel):
    """Base of every task's options: unknown keys are refused, and so are sizes beyond :data:`MAX_COUNT`,
    :data:`MAX_LIST_WIDTH` and :data:`MAX_LIST` (seeds aside)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _sizes_are_bounded(self) -> TaskOptions:
        for name, value in self:
            if "seed" in name:
                continue
            if isinstance(value, (list, tuple)):
                if len(value) > MAX_LIST:
                    raise ValueError(f"`{name}` has {len(value):,} entries; at most {MAX_LIST:,}")
                if any(isinstance(v, int) and not isinstance(v, bool) and v > MAX_LIST_WIDTH for v in value):
                    raise ValueError(f"`{name}` has an entry above {MAX_LIST_WIDTH:,}")
            elif isinstance(value, int) and not isinstance(value, bool) and value > MAX_COUNT:
                raise ValueError(f"`{name}` is {value:,}; at most {MAX_COUNT:,}")
        return self


class Task(ABC):
    """A family of meta-learning problems. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[TaskOptions]]
    loss_inputs_spec: ClassVar[tuple[LossInput, ...]]
    metric: ClassVar[str]
    #: hand-written losses over ``loss_inputs_spec``; the first is the default baseline.
    builtin_losses: ClassVar[dict[str, Callable[..., Tensor]]]
    #: names of the shaping terms that ``extra_term`` computes (paper, equation 9).
    extra_term_names: ClassVar[tuple[str, ...]] = ()
    #: True for tasks that gather new data with the current θ between inner steps (rollouts of a policy on a
    #: simulator): the engine then calls :meth:`collect` outside ``torch.func`` before every use of a batch.
    collects_data: ClassVar[bool] = False
    #: query field → the support field holding the same kind of data (``x_query`` → ``x_support``), for families
    #: with a support/query split of fixed data; :meth:`validation_batch` needs it (empty: no such split).
    query_from_support: ClassVar[dict[str, str]] = {}

    def __init__(self, options: TaskOptions | None = None, device: torch.device | str = "cpu"):
        self.options = options if options is not None else self.Options()
        self.device = torch.device(device)
        #: environment steps (one simulator step of one rollout) this instance has taken so far: a task that rolls
        #: out a simulator adds to it (rollouts, model refits, demonstrations); meta-train records it in the
        #: artifact's metrics and ``ml3 reproduce`` reports it beside the samples spent at meta-test
        self.environment_samples = 0
        self.loss_inputs_spec = self.inputs_for(self.options)
        self.optimizee = self.build_optimizee().to(self.device)
        self._forward = module_function(self.optimizee)

    @classmethod
    def inputs_for(cls, options: TaskOptions) -> tuple[LossInput, ...]:
        """The loss inputs under ``options``: ``loss_inputs_spec`` unless an option changes them (e.g. the
        number of classes of a joint classification input). Recipe validation compares these."""
        return cls.loss_inputs_spec

    # -- the optimizee -------------------------------------------------------------------------------------
    @abstractmethod
    def build_optimizee(self) -> nn.Module:
        """A fresh optimizee module (its parameters are replaced by θ through ``functional_call``)."""

    def init_theta(self, n: int, generator: torch.Generator) -> Theta:
        """``n`` independent initialisations θ₀ stacked on a leading task axis.

        Uses each layer's own ``reset_parameters`` (PyTorch's default init), fed from ``generator`` so that a
        seed fixes every θ₀.
        """
        draws = []
        for _ in range(n):
            seed = int(torch.randint(0, 2**62, (), generator=generator))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = self.build_optimizee()
            draws.append({k: v.detach() for k, v in module.named_parameters()})
        return {k: torch.stack([d[k] for d in draws]).to(self.device) for k in draws[0]}

    # -- the tasks -----------------------------------------------------------------------------------------
    @abstractmethod
    def sample_tasks(self, n: int, generator: torch.Generator) -> Any:
        """A batch of ``n`` tasks: a NamedTuple of tensors with a leading task axis, on ``self.device``."""

    @abstractmethod
    def loss_inputs(self, theta: Theta, task: Any) -> dict[str, Tensor]:
        """The named inputs of the loss for ONE task (called inside ``vmap``), keys as ``loss_inputs_spec``."""

    @abstractmethod
    def task_loss(self, theta: Theta, task: Any) -> Tensor:
        """L_T for ONE task on its held-out query data: a scalar. Also the meta-test metric."""

    def validation_batch(self, batch: Any) -> Any:
        """``batch`` with its query data replaced by its training (support) data, so that :meth:`task_loss` on it is
        a validation loss on the training split: online loss adaptation (:mod:`ml3cli.engine.online`) descends it,
        and the query data the meta-test metric is measured on never reach φ. Refused for a family without a
        support/query split of fixed data (:attr:`query_from_support` empty; a task that collects data measures its
        validation loss on a fresh rollout instead)."""
        if not self.query_from_support:
            raise ValueError(f"task {self.name!r} has no support/query split of fixed data")
        return batch._replace(**{query: getattr(batch, support) for query, support in self.query_from_support.items()})

    def check_validation_split(self) -> None:
        """Refuse, in one line, a family that online adaptation cannot serve: one with neither a support/query split
        of fixed data (:meth:`validation_batch`) nor data of its own to collect (a fresh rollout)."""
        if not self.query_from_support and not self.collects_data:
            raise ML3Error(
                f"task {self.name!r} has no training split of fixed data to measure a validation loss on, which "
                "online loss adaptation (--adapt) needs: use a supervised family (sine, sine_shifted, "
                "sine_frequency, mnist_binary, mnist, inverse_dynamics_reacher, inverse_dynamics_sawyer) or one "
                "that collects rollouts (reacher_goal_mf, ant_goal, the model-based ones)"
            )

    def extra_term(self, name: str, theta: Theta, task: Any) -> Tensor:
        """The shaping term ``name`` (one of ``extra_term_names``) for ONE task; meta-train time only."""
        raise KeyError(f"task {self.name!r} has no extra term {name!r}")

    def target_theta(self, task: Any) -> Theta | None:
        """The ground-truth parameters θ* of ONE task when the family knows them (landscapes mark them), else None."""
        return None

    def provenance(self) -> dict[str, Any]:
        """What the task derived from its data that a reader of an artifact should see (e.g. scales the loss
        inputs are divided by); recorded by ``ml3 meta-train`` in the artifact's metrics. None by default."""
        return {}

    def report_metrics(self, theta: Theta, task: Any) -> dict[str, Tensor]:
        """Extra per-task scalars that meta-test/compare report beside the task loss (e.g. |θ − θ*|); none by default."""
        return {}

    def collect(self, theta: Theta, batch: Any, generator: torch.Generator, purpose: str) -> Any:
        """Data gathered with the current θ, for tasks with ``collects_data`` (e.g. rollouts of the real system).

        ``theta`` is a detached batch of θ (leading task axis), ``batch`` the tasks from :meth:`sample_tasks`;
        ``purpose`` is ``"inner"`` (the data of the next inner step) or ``"task_loss"`` (the data L_T and the
        meta-test metric are measured on). Returns a batch of the same type that is used for that one purpose;
        the tasks themselves stay ``batch``. Runs outside autograd and vmap, so it may step simulators; it draws
        randomness only from ``generator``.
        """
        return batch

    # -- tasks with state (e.g. a learned dynamics model refitted during meta-training) ---------------------
    def begin_outer_step(self, step: int, theta: Theta | None, generator: torch.Generator) -> None:
        """Called by the outer loop before outer step ``step`` (1-based) with the current θ batch (None before the
        first step). A task that keeps state, such as a dynamics model refitted on rollouts of the latest policy
        (paper, algorithm 3), updates it here, drawing randomness only from ``generator``. Default: nothing."""
        return None

    def state_tensors(self) -> dict[str, Tensor]:
        """The task's state as named tensors, saved in checkpoints so that a resumed run continues exactly."""
        return {}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Put back a state from :meth:`state_tensors`; raise ValueError if it does not fit this task."""
        if tensors:
            raise ValueError(f"task {self.name!r} keeps no state but the checkpoint has {sorted(tensors)[:3]}")

    # -- helpers -------------------------------------------------------------------------------------------
    def predict(self, theta: Theta, x: Tensor) -> Tensor:
        """f_θ(x) for one task (a plain function of θ for sequential MLPs, see :mod:`ml3cli.functional`)."""
        return self._forward(theta, x)

    def input_names(self) -> tuple[str, ...]:
        return tuple(item.name for item in self.loss_inputs_spec)
