"""Online loss adaptation: φ keeps learning while the optimizee trains (in the spirit of AdaLFL, Raymond et al.
2023, *Online Loss Function Learning*).

Meta-training fixes φ, then meta-test trains fresh optimizees with it. Here φ goes on learning during that
training: every N optimizee steps, φ takes one Adam step on the meta-gradient of a **validation loss** through the
last K ≤ N inner steps,

    θ_t = unroll_K(θ_{t−K}; M_φ)                      (the last K steps, replayed from θ_{t−K} with the current φ)
    φ  ← Adam(φ, ∇_φ L_val(θ_t))                       (every N steps; η = ``lr``)

computed by the engine's own estimators (:func:`~.estimators.estimator_for`: full or truncated backpropagation
through the K steps), never by a second implementation. Because K ≤ N, the last K steps all used the current φ,
so the replay is the very trajectory the optimizee took and the meta-gradient is exact.

The validation loss is the task loss on the TRAINING data: at meta-test the task's support data
(:meth:`~ml3cli.tasks.base.Task.validation_batch`), in a user's loop the validation batch they pass. The query
data that meta-test measures its metric on never reach φ. Note the choice: the validation points are the points the
optimizee trains on (as in AdaLFL, whose meta-objective is the training loss), so adaptation rewards a loss that
fits the training data faster; nothing of the test split is held back for it.

A task that collects its data (a policy's rollouts, :attr:`~ml3cli.tasks.base.Task.collects_data`) has no fixed
training split: its validation loss is the task loss (for model-free RL the REINFORCE surrogate, whose value is the
return) on a FRESH rollout of the current policy, the agent's own experience, gathered for the update alone (its
environment steps are counted; the rollouts that measure the metric are never used). The replay is fed the
rollouts the last K steps actually trained on (:class:`RecordedData`), so it is again the optimizee's trajectory.

* :class:`Adaptation`: the settings (N, η, K);
* :class:`LossAdapter`: an adapting copy of a learned loss and Adam on its φ, stepped by a caller that owns the
  optimizee's steps (meta-test, :func:`ml3cli.evaluate.train_curve`);
* :class:`RecordedData`: a collecting task whose replay reads the recorded rollouts instead of new ones;
* :class:`OnlineLoss`: the same beside an ordinary PyTorch training loop.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ml3cli.engine.estimators import Estimator, MetaGradient, estimator_for
from ml3cli.engine.inner_optimizers import SGD, InnerOptimizer, InnerState
from ml3cli.engine.unroll import LossFn, Phi
from ml3cli.errors import ML3Error
from ml3cli.metaloss import MetaLoss
from ml3cli.recipes import InnerConfig
from ml3cli.runtime import generator, hashed_seed
from ml3cli.tasks.base import Task, TaskOptions, Theta


@dataclass(frozen=True)
class Adaptation:
    """How often and how far φ adapts online (see the module docstring).

    Defaults: AdaLFL's one-step look-ahead, a φ step after every optimizee step.
    """

    every: int = 1  #: N, optimizee steps between two updates of φ
    lr: float = 1e-3  #: η, Adam's learning rate on φ (0: φ never moves)
    unroll: int = 1  #: K ≤ N, the inner steps the meta-gradient flows back through
    truncate: bool = False  #: drop the θ–θ Hessian chain of the K steps (the engine's truncated estimator)

    def __post_init__(self) -> None:
        if self.every < 1 or self.unroll < 1:
            raise ML3Error(f"online adaptation: every ({self.every}) and unroll ({self.unroll}) must be at least 1")
        if self.unroll > self.every:
            raise ML3Error(
                f"online adaptation: unroll ({self.unroll}) exceeds every ({self.every}): the meta-gradient can flow "
                "back only through steps taken with the current φ; lower unroll or raise every"
            )
        if not self.lr >= 0:
            raise ML3Error(f"online adaptation: lr ({self.lr}) must be 0 or more")

    def opens_window(self, step: int) -> bool:
        """Whether ``step`` (0-based, before it is taken) is the first of the K steps the next update replays."""
        return (step + self.unroll) % self.every == 0

    def due(self, taken: int) -> bool:
        """Whether φ updates once ``taken`` optimizee steps have been taken."""
        return taken > 0 and taken % self.every == 0

    def record(self) -> dict[str, Any]:
        """The settings as results record them."""
        return {"every": self.every, "lr": self.lr, "unroll": self.unroll, "truncate": self.truncate}


def inner_config(optimizer: InnerOptimizer, lr: float, steps: int, truncate: bool = False) -> InnerConfig:
    """The recipe section that the estimators take, for ``steps`` steps of ``optimizer`` at ``lr``."""
    settings: dict[str, Any] = {}
    if optimizer.name == "momentum":
        settings["momentum"] = optimizer.beta  # type: ignore[attr-defined]
    elif optimizer.name == "adam":
        settings |= {"betas": list(optimizer.betas), "eps": optimizer.eps}  # type: ignore[attr-defined]
    return InnerConfig(lr=lr, steps=steps, truncate=truncate, optimizer=optimizer.name, **settings)


class LossAdapter:
    """An adapting copy of the learned loss ``metaloss`` (the original is left as it is) and Adam on its φ.

    The caller takes the optimizee's steps with :attr:`loss_fn` (it reads the current φ) and, when
    ``adaptation.due(taken)``, calls :meth:`adapt` with θ and the inner optimizer's state from where the last K steps
    began and the batch whose task loss is the validation loss.
    """

    def __init__(self, metaloss: MetaLoss, adaptation: Adaptation):
        self.metaloss = copy.deepcopy(metaloss)
        self.metaloss.requires_grad_(False)  # φ learns only from the meta-gradient, never from a backward of M_φ
        self.adaptation = adaptation
        self.adam = torch.optim.Adam(self.metaloss.parameters(), lr=adaptation.lr)
        self.loss_fn: LossFn = self.metaloss.as_loss_fn()
        self.updates = 0

    @property
    def phi(self) -> Phi:
        """φ now, by name: a copy, which later updates leave as it is."""
        return {name: value.detach().clone() for name, value in self.metaloss.named_parameters()}

    def estimator(self, task: Task, lr: float, optimizer: InnerOptimizer = SGD()) -> Estimator:
        """The engine's estimator through K steps of ``optimizer`` at ``lr``, with the task loss as L_val."""
        inner = inner_config(optimizer, lr, self.adaptation.unroll, self.adaptation.truncate)
        return estimator_for(inner, task, task.task_loss)

    def gradient(
        self,
        estimator: Estimator,
        theta: Theta,
        batch: Any,
        state: InnerState | None = None,
        gen: torch.Generator | None = None,
    ) -> MetaGradient:
        """∇_φ L_val(θ_t) through K steps from ``theta`` (θ_{t−K}, leading task axis; the mean over the tasks)."""
        with torch.enable_grad():
            return estimator.estimate(self.metaloss, self.phi, theta, batch, gen, state=state)

    def adapt(
        self,
        estimator: Estimator,
        theta: Theta,
        batch: Any,
        state: InnerState | None = None,
        gen: torch.Generator | None = None,
    ) -> MetaGradient:
        """One update of φ: Adam on :meth:`gradient`; returns the gradient and what the replay saw."""
        return self.apply(self.gradient(estimator, theta, batch, state, gen))

    def apply(self, found: MetaGradient) -> MetaGradient:
        """The Adam step on φ along ``found.gradient``."""
        for name, value in self.metaloss.named_parameters():
            value.grad = found.gradient[name].detach().to(value.dtype)
        self.adam.step()
        self.adam.zero_grad(set_to_none=True)
        self.updates += 1
        return found


class RecordedData:
    """A task that collects data, seen by a replay: its :meth:`collect` hands out the recorded batches of the last K
    inner steps in order (``inner``) and the validation batch (``task_loss``) instead of rolling out again;
    everything else is the task's own. The caller records: :meth:`open` at the window's first step, :meth:`record`
    after each inner batch is gathered, :meth:`collect_validation` before the update.

    The validation rollouts draw from a generator of their own, derived from the optimizee's (``gen``), so that
    adapting leaves the optimizee's training and measurement rollouts as they would have been: with η = 0 the
    curves are those of the frozen loss, bit for bit."""

    def __init__(self, task: Task, gen: torch.Generator):
        self._task = task
        self.gen = generator(hashed_seed("online-adaptation", gen.initial_seed()))
        self._inner: list[Any] = []
        self._replayed: list[Any] = []
        self.validation: Any = None

    def open(self) -> None:
        """Forget the batches of the previous window."""
        self._inner = []

    def record(self, batch: Any) -> None:
        self._inner.append(batch)

    def collect_validation(self, theta: Theta, batch: Any) -> None:
        """Before a meta-gradient: a fresh rollout at ``theta`` (the optimizee now) for L_val, from this replay's own
        generator, and the recorded batches handed out again from the first."""
        self.validation = self._task.collect(theta, batch, self.gen, "task_loss")
        self._replayed = list(self._inner)

    def collect(self, theta: Theta, batch: Any, generator: torch.Generator, purpose: str) -> Any:
        if purpose == "inner":
            if not self._replayed:
                raise RuntimeError("RecordedData: the replay asked for more inner steps than were recorded")
            return self._replayed.pop(0)
        return self.validation

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)


# -- beside an ordinary training loop -----------------------------------------------------------------------------
class _Step(NamedTuple):
    """One batch of a user's loop (or the validation batch), with a leading task axis of 1 for the engine."""

    x: Tensor
    y: Tensor


class _ReplayTask(Task):
    """A user's model and the batches of its last K steps as the engine's inner problem: the batch of inner step k
    is the k-th recorded one (handed out in order, as a task that gathers data between inner steps is fed), and the
    task loss is the validation loss on the validation batch."""

    name = "online_replay"
    summary = "the last steps of a user's training loop, replayed"
    Options = TaskOptions
    loss_inputs_spec = ()
    metric = "validation_loss"
    builtin_losses = {}
    collects_data = True

    def __init__(
        self,
        model: nn.Module,
        inputs: Callable[[Tensor, Tensor], dict[str, Tensor]],
        validation_loss: Callable[[Tensor, Tensor], Tensor],
        steps: Sequence[_Step],
        validation: _Step,
    ):
        self._model, self._inputs, self._validation_loss = model, inputs, validation_loss
        self._steps, self._validation = list(steps), validation
        super().__init__(device=next(model.parameters()).device)

    def build_optimizee(self) -> nn.Module:
        return self._model

    def sample_tasks(self, n: int, generator: torch.Generator) -> Any:
        raise NotImplementedError("a replay has its recorded batches, not a family to sample from")

    def loss_inputs(self, theta: Theta, task: _Step) -> dict[str, Tensor]:
        return self._inputs(self.predict(theta, task.x), task.y)

    def task_loss(self, theta: Theta, task: _Step) -> Tensor:
        return self._validation_loss(self.predict(theta, task.x), task.y)

    def collect(self, theta: Theta, batch: Any, generator: torch.Generator, purpose: str) -> _Step:
        return self._steps.pop(0) if purpose == "inner" else self._validation


def _with_task_axis(x: Tensor, y: Tensor) -> _Step:
    return _Step(x.detach().unsqueeze(0), y.detach().unsqueeze(0))


class OnlineLoss(nn.Module):
    """A learned loss that keeps learning while ``model`` trains, stepped beside the model's optimizer::

        online = OnlineLoss(load_loss("sine"), model, lr=1e-3, every=1, unroll=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=online.inner_lr)
        for x, y in batches:
            optimizer.zero_grad()
            online(model(x), y).backward()           # M_φ(ŷ, y) with the current φ
            optimizer.step()
            online.step((x, y), (x_val, y_val))      # every `every` steps: φ ← Adam(φ, ∇_φ L_val)

    :meth:`step` records the batch of the step just taken; every ``every`` steps it replays the last ``unroll`` of
    them from the θ it recorded before them (plain SGD at ``inner_lr``, the steps the loss was meta-trained to
    shape: train the model that way, or the replay is not the model's trajectory) and takes an Adam step of rate
    ``lr`` on φ along the meta-gradient of ``validation_loss(model(x_val), y_val)`` after them (see the module
    docstring). Hold the validation batch out of the test data you report.

    Args:
        loss: a learned loss (:func:`ml3cli.load_loss`); it is copied, the original stays as it is.
        model: the model being trained; it must keep no state outside its parameters (no batch norm statistics).
        lr, every, unroll: η, N and K of :class:`Adaptation`.
        inner_lr: α of the model's SGD (default: the rate the loss was meta-trained with).
        validation_loss: ``(prediction, target) → scalar``, default the mean squared error.
        inputs: ``(prediction, target) → the loss's named inputs``; default: the two in the order of
            ``loss.inputs`` (``y_pred, y_true``).
    """

    def __init__(
        self,
        loss: MetaLoss,
        model: nn.Module,
        *,
        lr: float = Adaptation.lr,
        every: int = Adaptation.every,
        unroll: int = Adaptation.unroll,
        inner_lr: float | None = None,
        validation_loss: Callable[[Tensor, Tensor], Tensor] = nn.functional.mse_loss,
        inputs: Callable[[Tensor, Tensor], dict[str, Tensor]] | None = None,
    ):
        super().__init__()
        inner_lr = inner_lr if inner_lr is not None else loss.meta_trained_lr
        if inner_lr is None or not inner_lr > 0:
            raise ML3Error(f"OnlineLoss: give inner_lr > 0, the model's SGD rate (this loss records {inner_lr})")
        if inputs is None and len(loss.inputs) != 2:
            names = ", ".join(item.name for item in loss.inputs)
            raise ML3Error(f"OnlineLoss: the loss takes ({names}); say how to make them with inputs=")
        names = tuple(item.name for item in loss.inputs)
        self.adapter = LossAdapter(loss, Adaptation(every=every, lr=lr, unroll=unroll))
        self.loss = self.adapter.metaloss
        # not a submodule: online.parameters() and online.state_dict() are φ alone, never the model's θ
        object.__setattr__(self, "model", model)
        self.inner_lr = float(inner_lr)
        self.validation_loss = validation_loss
        self.make_inputs = inputs or (lambda prediction, target: dict(zip(names, (prediction, target), strict=True)))
        self.taken = 0
        self._start: Theta | None = None
        self._steps: list[_Step] = []
        self._open_window()

    @property
    def adaptation(self) -> Adaptation:
        return self.adapter.adaptation

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor:
        """M_φ of the inputs with the current φ (as the loss module itself; φ gets no gradient from it). A loss
        meta-trained with ``learned_lr`` returns its value times its step scale, the scale held constant, so that
        plain SGD at ``inner_lr`` takes the step it was meta-trained for, θ − α·scale·∇_θ M_φ (and the one the
        replay takes)."""
        if self.loss.learned_lr:
            value, scale = self.loss.loss_and_step_scale(*args, **kwargs)
            return value * scale.detach()
        return self.loss(*args, **kwargs)

    def _open_window(self) -> None:
        if self.adaptation.opens_window(self.taken):
            self._start = {name: value.detach().clone().unsqueeze(0) for name, value in self.model.named_parameters()}
            self._steps = []

    def step(self, batch: tuple[Tensor, Tensor], validation: tuple[Tensor, Tensor]) -> MetaGradient | None:
        """After the model's optimizer step on ``batch`` = (x, y): record it and, when due, update φ on the
        ``validation`` = (x_val, y_val) batch. Returns the meta-gradient when φ was updated, else None."""
        if self._start is not None:
            self._steps.append(_with_task_axis(*batch))
        self.taken += 1
        found = None
        if self.adaptation.due(self.taken):
            if self._start is None or len(self._steps) != self.adaptation.unroll:
                raise ML3Error("OnlineLoss.step: call it once after every optimizer step, from the first one on")
            task = _ReplayTask(
                self.model, self.make_inputs, self.validation_loss, self._steps, _with_task_axis(*validation)
            )
            estimator = self.adapter.estimator(task, self.inner_lr)
            # a replay task is fed like a task that gathers data, which the engine asks to draw from a generator
            found = self.adapter.gradient(estimator, self._start, _with_task_axis(*validation), gen=torch.Generator())
            self._start = None
            self._check_replay(found.theta)
            self.adapter.apply(found)
        self._open_window()
        return found

    def _check_replay(self, replayed: Theta) -> None:
        """Refuse a model that did not take the steps the replay took: the meta-gradient would be another
        trajectory's."""
        for name, value in self.model.named_parameters():
            if not torch.allclose(replayed[name][0], value.detach(), rtol=1e-4, atol=1e-6):
                raise ML3Error(
                    f"OnlineLoss: replaying the last {self.adaptation.unroll} step(s) gives another {name!r} than the "
                    f"model's: train it with plain SGD at inner_lr={self.inner_lr:g} (no momentum, weight decay or "
                    "schedule), one OnlineLoss.step after each optimizer step"
                )
