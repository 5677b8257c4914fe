"""The ML³ engine: inner unroll, meta-gradient estimators and the outer loop (paper, section 3.1, algorithm 1).

It knows nothing of sines or robots: a :class:`~ml3cli.tasks.base.Task` supplies tasks, the optimizee, the loss
inputs and the task loss. Everything is written with ``torch.func``: θ is a ``dict[str, Tensor]``, inner updates
are out of place, and a batch of tasks is one ``vmap``. One concern per module:

* :mod:`~ml3cli.engine.inner_optimizers`: the inner update rules (SGD, heavy-ball momentum, Adam), pure functions
  of θ, its gradient and the rule's state, chosen once from the recipe;
* :mod:`~ml3cli.engine.unroll`: pure inner steps, θ' = θ − α·scale·∇_θ M_φ for SGD, and L_T;
* :mod:`~ml3cli.engine.data`: the data of an unroll (the task batch, or rollouts with the current θ; sharding);
* :mod:`~ml3cli.engine.estimators`: ∇_φ L_T, by full or truncated backpropagation, chosen once from the recipe;
* :mod:`~ml3cli.engine.diagnostics`: L_T and M_φ at θ₀ for the curves, on a random stream of their own;
* :mod:`~ml3cli.engine.graphs`: a meta-step replayed from a CUDA graph (:class:`GraphedEstimator`, GPU only);
* :mod:`~ml3cli.engine.outer`: the outer loop, Adam on φ;
* :mod:`~ml3cli.engine.online`: online loss adaptation, φ learning on while an optimizee trains (meta-test, or
  :class:`OnlineLoss` beside a user's training loop);
* :mod:`~ml3cli.engine.state`: the outer loop's state between steps (what a checkpoint holds).
"""

from ml3cli.engine.data import TaskData, share, task_count
from ml3cli.engine.diagnostics import Diagnostics, diagnose, diagnostics_generator
from ml3cli.engine.estimators import (
    Estimator,
    FullBackprop,
    MetaGradient,
    MetaStep,
    TruncatedBackprop,
    check_optimizee,
    check_task_axis,
    estimator_for,
    meta_gradient,
)
from ml3cli.engine.inner_optimizers import InnerOptimizer, InnerState, optimizer_for, sgd_update
from ml3cli.engine.online import Adaptation, LossAdapter, OnlineLoss
from ml3cli.engine.outer import MetaTrainResult, OuterOptimizer, build_metaloss, meta_train
from ml3cli.engine.state import MetaTrainState
from ml3cli.engine.unroll import (
    LossFn,
    Objective,
    Phi,
    detached,
    inner_gradient,
    inner_loss,
    inner_step,
    inner_step_autograd,
    learned_loss_fn,
    loss_and_scale,
    loss_value,
    sgd_step,
    sgd_step_autograd,
    task_objective,
    unroll,
)

__all__ = [
    "Adaptation",
    "Diagnostics",
    "Estimator",
    "InnerOptimizer",
    "InnerState",
    "FullBackprop",
    "LossAdapter",
    "LossFn",
    "MetaGradient",
    "MetaStep",
    "MetaTrainResult",
    "MetaTrainState",
    "Objective",
    "OnlineLoss",
    "OuterOptimizer",
    "Phi",
    "TaskData",
    "TruncatedBackprop",
    "build_metaloss",
    "check_optimizee",
    "check_task_axis",
    "detached",
    "diagnose",
    "diagnostics_generator",
    "estimator_for",
    "inner_gradient",
    "inner_loss",
    "inner_step",
    "inner_step_autograd",
    "learned_loss_fn",
    "loss_and_scale",
    "loss_value",
    "meta_gradient",
    "meta_train",
    "optimizer_for",
    "sgd_step",
    "sgd_step_autograd",
    "sgd_update",
    "share",
    "task_count",
    "task_objective",
    "unroll",
]
