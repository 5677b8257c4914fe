"""Small contracts of the engine's parts that the end-to-end engine tests do not pin down (found by mutation testing,
``scripts/mutation.py engine``): the pure step functions against hand-written SGD (their defaults included), L_T
with a shaping term, the one-task path with ``task_loss_at: every``, which estimator and path ``meta_gradient``
builds, what it does with a shard and a diagnostics generator, φ entries the learned loss does not read, the words
of the refusals, Adam's step counter and bias correction, and the outer loop's state snapshot.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import pytest
import torch
from test_collect import OPTIONS, FreshPointsSine
from test_engine import INNER_LR, assert_same_gradient, reference_loss, smooth_setup
from torch.func import vmap

from ml3cli.distributed import Shard
from ml3cli.engine import (
    FullBackprop,
    MetaTrainState,
    check_task_axis,
    diagnose,
    estimator_for,
    inner_step,
    inner_step_autograd,
    meta_gradient,
    sgd_step,
    sgd_step_autograd,
    task_objective,
    unroll,
)
from ml3cli.engine.estimators import _gradient_of
from ml3cli.engine.inner_optimizers import SGD, Adam
from ml3cli.errors import ML3Error
from ml3cli.metaloss import MetaLoss, mse
from ml3cli.recipes import InnerConfig, TaskLossConfig
from ml3cli.runtime import generator
from ml3cli.tasks.sine import SineOptions, SineRegression


# -- the pure step functions against hand-written SGD ---------------------------------------------------------
class Line(NamedTuple):
    x: torch.Tensor  # [N, d]
    y: torch.Tensor  # [N, 1]


class LinearTask:
    """Just enough of a task for the step functions: ŷ = x·w, and a θ leaf ``spare`` that no loss reads."""

    def loss_inputs(self, theta: dict[str, torch.Tensor], batch: Line) -> dict[str, torch.Tensor]:
        return {"y_pred": batch.x @ theta["w"], "y_true": batch.y}


def linear_setup() -> tuple[LinearTask, dict[str, torch.Tensor], Line]:
    gen = generator(3)
    batch = Line(torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(6, 1, generator=gen).double())
    theta = {"w": torch.randn(3, 1, generator=gen).double(), "spare": torch.randn(2).double()}
    return LinearTask(), theta, batch


def mse_loss(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return mse(**inputs)


def by_hand(w: torch.Tensor, batch: Line, lr: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w after ``steps`` SGD steps on the MSE, and d Σw_K / dw_0 = (I − αH)^K·1, by the closed forms
    ∇ = (2/N)·xᵀ(xw − y) and H = (2/N)·xᵀx."""
    n = batch.x.shape[0]
    for _ in range(steps):
        w = w - lr * 2 / n * batch.x.T @ (batch.x @ w - batch.y)
    jacobian = torch.linalg.matrix_power(torch.eye(3, dtype=w.dtype) - lr * 2 / n * batch.x.T @ batch.x, steps)
    return w, jacobian @ torch.ones_like(w)


def stepped_and_slope(step, theta: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """θ' = step(θ) and d Σw' / dw."""
    w = theta["w"].clone().requires_grad_()
    stepped = step({"w": w, "spare": theta["spare"]})
    (slope,) = torch.autograd.grad(stepped["w"].sum(), w)
    return stepped, slope


def test_unroll_takes_k_sgd_steps_and_differentiates_through_them_unless_truncated(float64):
    """unroll = K hand-written SGD steps; θ_K's derivative in θ₀ is (I − αH)^K, or the identity with ``truncate``
    (every inner gradient at a detached θ)."""
    task, theta, batch = linear_setup()
    want, want_slope = by_hand(theta["w"], batch, 0.1, 3)
    stepped, slope = stepped_and_slope(lambda th: unroll(task, mse_loss, th, batch, 0.1, 3), theta)
    torch.testing.assert_close(stepped["w"], want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(slope, want_slope, rtol=1e-12, atol=1e-14)
    assert torch.equal(stepped["spare"], theta["spare"])
    assert not torch.allclose(want_slope, torch.ones_like(want_slope))  # the two derivatives are told apart
    stepped, slope = stepped_and_slope(lambda th: unroll(task, mse_loss, th, batch, 0.1, 3, truncate=True), theta)
    torch.testing.assert_close(stepped["w"], want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(slope, torch.ones_like(slope), rtol=1e-12, atol=1e-14)


STEPS = {
    "inner_step": lambda task, th, batch, **kw: inner_step(task, mse_loss, th, {}, batch, 0.1, SGD(), **kw)[0],
    "sgd_step": lambda task, th, batch, **kw: sgd_step(task, mse_loss, th, batch, 0.1, **kw),
    "inner_step_autograd": lambda task, th, batch, **kw: inner_step_autograd(
        task, mse_loss, th, {}, batch, 0.1, SGD(), **kw
    )[0],
    "sgd_step_autograd": lambda task, th, batch, **kw: sgd_step_autograd(task, mse_loss, th, batch, 0.1, **kw),
}


@pytest.mark.parametrize("name", list(STEPS))
def test_every_step_function_is_one_sgd_step_of_one_task_through_its_gradient_by_default(float64, name):
    """By default each step function takes ONE task's SGD step and differentiates through its inner gradient
    (dθ'/dθ = I − αH); with ``truncate`` the gradient is a constant (dθ'/dθ = I). A θ leaf that the inner loss
    does not read has a zero inner gradient: it stays where it is."""
    task, theta, batch = linear_setup()
    step = STEPS[name]
    want, want_slope = by_hand(theta["w"], batch, 0.1, 1)
    stepped, slope = stepped_and_slope(lambda th: step(task, th, batch), theta)
    torch.testing.assert_close(stepped["w"], want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(slope, want_slope, rtol=1e-12, atol=1e-14)
    assert torch.equal(stepped["spare"], theta["spare"])
    stepped, slope = stepped_and_slope(lambda th: step(task, th, batch, truncate=True), theta)
    torch.testing.assert_close(stepped["w"], want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(slope, torch.ones_like(slope), rtol=1e-12, atol=1e-14)


class PenalizedSine(SineRegression):
    """The sine task with a shaping term: the squared norm of θ."""

    def extra_term(self, name: str, theta: dict[str, torch.Tensor], task: Any) -> torch.Tensor:
        assert name == "norm"
        return sum((value**2).sum() for value in theta.values())


def test_task_objective_is_beta_times_the_task_loss_plus_gamma_times_each_extra_term(float64):
    task = PenalizedSine(SineOptions(points=8, query_points=8, hidden=[8]))
    gen = generator(0)
    batch, theta = task.sample_tasks(1, gen), task.init_theta(1, gen)
    one_batch, one_theta = type(batch)(*(t[0] for t in batch)), {k: v[0] for k, v in theta.items()}
    objective = task_objective(task, TaskLossConfig(weight=0.5, extra={"norm": 0.25}))
    norm = sum(float((v**2).sum()) for v in one_theta.values())
    want = 0.5 * float(mse(task.predict(one_theta, one_batch.x_query), one_batch.y_query)) + 0.25 * norm
    assert float(objective(one_theta, one_batch)) == pytest.approx(want, rel=1e-12)


# -- the estimators -------------------------------------------------------------------------------------------
def test_the_one_task_path_with_task_loss_at_every_is_the_mean_task_loss_over_the_inner_steps(float64):
    """One task, ``task_loss_at: every``: L_T is the mean over k = 1 … K of the task loss at θ_k (an independent
    plain-autograd unroll), and ∇_φ is its gradient."""
    task, metaloss, phi, theta, batch = smooth_setup(n_tasks=1)
    inner = InnerConfig(lr=INNER_LR, steps=3, task_loss_at="every")
    gradient, seen = meta_gradient(metaloss, phi, task, theta, batch, inner, task_objective(task, TaskLossConfig()))
    leaf = {k: v.clone().requires_grad_() for k, v in phi.items()}
    want = sum(reference_loss(metaloss, leaf, task, theta, batch, INNER_LR, k, False) for k in (1, 2, 3)) / 3
    torch.testing.assert_close(seen.task_loss, want.detach().reshape(1), rtol=1e-12, atol=0)
    reference = dict(zip(leaf, torch.autograd.grad(want, list(leaf.values())), strict=True))
    assert_same_gradient(gradient, reference, rtol=1e-9, atol=1e-12)


def test_meta_gradient_takes_the_one_task_path_by_default_and_the_vmap_path_when_told(monkeypatch):
    """``single_task_path`` defaults to True in estimator_for and meta_gradient (the outer loop relies on the
    default) and is passed on as given; a batch of one task then skips vmap."""
    task, metaloss, phi, theta, batch = smooth_setup(n_tasks=1)
    inner, objective = InnerConfig(lr=INNER_LR, steps=1), task_objective(task, TaskLossConfig())
    assert estimator_for(inner, task, objective).single_task_path is True
    assert estimator_for(inner, task, objective, single_task_path=False).single_task_path is False
    paths: list[str] = []
    for path in ("_one_task", "_batched"):
        original = getattr(FullBackprop, path)

        def spy(self, *args, original=original, path=path):
            paths.append(path)
            return original(self, *args)

        monkeypatch.setattr(FullBackprop, path, spy)
    meta_gradient(metaloss, phi, task, theta, batch, inner, objective, diagnostics=False)
    meta_gradient(metaloss, phi, task, theta, batch, inner, objective, diagnostics=False, single_task_path=False)
    assert paths == ["_one_task", "_batched"]


def test_without_diagnostics_the_step_reports_none_for_them():
    task, metaloss, phi, theta, batch = smooth_setup(n_tasks=2)
    inner, objective = InnerConfig(lr=INNER_LR, steps=1), task_objective(task, TaskLossConfig())
    _, seen = meta_gradient(metaloss, phi, task, theta, batch, inner, objective, diagnostics=False)
    assert seen.task_loss_before is None and seen.learned_loss is None


@pytest.mark.parametrize("truncate", [False, True], ids=["full", "truncated"])
def test_a_shard_differentiates_and_diagnoses_its_own_share_of_the_tasks(float64, truncate):
    """meta_gradient with a shard (one of 2 processes) on the whole batch: its L_T and diagnostics are its half of
    the single process's, and the two halves' meta-gradients average to the single process's."""
    task, metaloss, phi, theta, batch = smooth_setup(n_tasks=4)
    inner, objective = InnerConfig(lr=INNER_LR, steps=2, truncate=truncate), task_objective(task, TaskLossConfig())
    whole_gradient, whole = meta_gradient(metaloss, phi, task, theta, batch, inner, objective)
    gradients = []
    for rank in (0, 1):
        gradient, seen = meta_gradient(metaloss, phi, task, theta, batch, inner, objective, shard=Shard(rank, 2))
        gradients.append(gradient)
        half = slice(2 * rank, 2 * rank + 2)
        for part in ("task_loss", "task_loss_before", "learned_loss"):
            torch.testing.assert_close(getattr(seen, part), getattr(whole, part)[half], rtol=1e-12, atol=0)
    mean = {k: (gradients[0][k] + gradients[1][k]) / 2 for k in whole_gradient}
    assert_same_gradient(mean, whole_gradient, rtol=1e-10, atol=1e-13)
    assert any(not torch.allclose(gradients[0][k], whole_gradient[k]) for k in whole_gradient)


def test_a_given_diagnostics_generator_is_what_a_collecting_task_draws_its_diagnostics_from():
    """With ``diagnostics_gen`` given (the outer loop passes one), the diagnostics' rollouts come from it, not from
    a generator seeded off the training generator ``gen``."""
    torch.manual_seed(0)
    task = FreshPointsSine(OPTIONS)
    metaloss = MetaLoss(task.loss_inputs_spec, hidden=(8,), activation="tanh")
    phi = {name: p.detach().clone() for name, p in metaloss.named_parameters()}
    gen = generator(0)
    batch, theta = task.sample_tasks(2, gen), task.init_theta(2, gen)
    inner, objective = InnerConfig(lr=0.3, steps=1), task_objective(task, TaskLossConfig())
    want = diagnose(metaloss, phi, task, theta, batch, objective, generator(5))
    given = generator(5)
    _, seen = meta_gradient(
        metaloss, phi, task, theta, batch, inner, objective, gen=generator(1), diagnostics_gen=given
    )
    assert not torch.equal(given.get_state(), generator(5).get_state())  # drawn from
    torch.testing.assert_close(seen.task_loss_before, want.task_loss_before, rtol=0, atol=0)
    torch.testing.assert_close(seen.learned_loss, want.learned_loss, rtol=0, atol=0)


class ScaledMSE:
    """A stand-in for MetaLoss (the estimators read only ``inner_loss_with_phi``): M_φ = φ_scale · MSE(ŷ, y), with a
    φ entry ``spare`` that it never reads. ``reads_phi=False``: M = MSE(ŷ, y), which reads no φ at all.
    ``blind_calls``: that many of the first losses built from a φ that requires grad (the truncated backward's,
    which rebuilds the last inner step first) read φ_scale as a constant."""

    def __init__(self, reads_phi: bool = True, blind_calls: int = 0) -> None:
        self.reads_phi, self.blind_calls = reads_phi, blind_calls

    def inner_loss_with_phi(self, phi: dict[str, torch.Tensor]):
        def loss(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            if not self.reads_phi:
                return mse(**inputs)
            scale = phi["scale"]
            if scale.requires_grad and self.blind_calls > 0:
                self.blind_calls -= 1
                scale = scale.detach()
            return scale * mse(**inputs)

        return loss


def scaled_setup(n_tasks: int):
    task = SineRegression(OPTIONS)
    gen = generator(0)
    batch, theta = task.sample_tasks(n_tasks, gen), task.init_theta(n_tasks, gen)
    phi = {"scale": torch.tensor(1.5), "spare": torch.ones(3)}
    return task, phi, theta, batch


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
@pytest.mark.parametrize("truncate", [False, True], ids=["full", "truncated"])
@pytest.mark.parametrize("n_tasks", [1, 2], ids=["one-task-path", "vmap-path"])
def test_phi_entries_the_learned_loss_does_not_read_get_a_zero_meta_gradient(float64, n_tasks, truncate, optimizer):
    """∇_φ has an entry for every φ entry: zeros for one the learned loss never reads (not None, not an error), and
    all zeros for a loss that reads no φ at all, on both estimators and paths."""
    task, phi, theta, batch = scaled_setup(n_tasks)
    inner = InnerConfig(lr=0.3, steps=2, truncate=truncate, optimizer=optimizer)
    objective = task_objective(task, TaskLossConfig())
    gradient, _ = meta_gradient(ScaledMSE(), phi, task, theta, batch, inner, objective, diagnostics=False)
    assert gradient.keys() == phi.keys()
    assert float(gradient["scale"].abs()) > 0 and torch.equal(gradient["spare"], torch.zeros(3))
    gradient, _ = meta_gradient(ScaledMSE(reads_phi=False), phi, task, theta, batch, inner, objective)
    assert all(torch.equal(gradient[k], torch.zeros_like(phi[k])) for k in phi)


def test_the_gradient_of_a_loss_without_a_graph_is_zero_for_every_phi_entry():
    """L_T that does not depend on φ at all (no graph: e.g. θ_K that no inner gradient moved through φ) has the
    meta-gradient zero, one tensor per φ entry shaped like it."""
    phi = {"scale": torch.tensor(1.5, requires_grad=True), "spare": torch.ones(3, requires_grad=True)}
    gradient = _gradient_of(torch.tensor([0.5, 2.0]), phi)
    assert gradient.keys() == phi.keys()
    assert all(torch.equal(gradient[k], torch.zeros_like(phi[k])) for k in phi)
    gradient = _gradient_of(phi["scale"] * torch.tensor([0.5, 2.0]), phi)
    assert float(gradient["scale"]) == 1.25 and torch.equal(gradient["spare"], torch.zeros(3))


def test_a_truncated_step_whose_inner_gradient_does_not_depend_on_phi_leaves_the_others_counted(float64):
    """Truncation sums one term per inner step; a step whose inner gradient does not depend on φ adds nothing, and
    the earlier steps still count: the result is the graph-keeping truncated gradient with that step's φ constant."""
    task, phi, theta, batch = scaled_setup(2)
    inner = InnerConfig(lr=0.3, steps=3, truncate=True)
    objective = task_objective(task, TaskLossConfig())
    gradient, _ = meta_gradient(ScaledMSE(blind_calls=1), phi, task, theta, batch, inner, objective)
    leaf = phi["scale"].clone().requires_grad_()
    theta_k = theta
    for k in range(3):
        scale = leaf.detach() if k == 2 else leaf  # the last step reads φ as a constant
        theta_k = sgd_step_autograd(
            task, lambda inputs, scale=scale: scale * mse(**inputs), theta_k, batch, 0.3, truncate=True, batched=True
        )
    (want,) = torch.autograd.grad(vmap(objective)(theta_k, batch).mean(), leaf)
    assert float(want.abs()) > 0
    torch.testing.assert_close(gradient["scale"], want, rtol=1e-9, atol=1e-13)


# -- the refusals name what is wrong and the fix ------------------------------------------------------------------
class DoublyNormalizedSine(SineRegression):
    """Two batch norm layers: six buffers of running state outside θ."""

    def build_optimizee(self) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(1, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.BatchNorm1d(8),
            torch.nn.Linear(8, 1),
        )  # fmt: skip


def test_the_running_statistics_refusal_lists_the_first_four_buffers_and_both_fixes():
    task = DoublyNormalizedSine(SineOptions(points=8, query_points=8))
    inner, objective = InnerConfig(lr=0.1, steps=1), task_objective(task, TaskLossConfig())
    with pytest.raises(ML3Error) as refused:
        estimator_for(inner, task, objective)
    message = str(refused.value)
    listed = "['1.running_mean', '1.running_var', '1.num_batches_tracked', '3.running_mean']"
    assert f"buffer(s) {listed} (e.g. batch norm's running statistics), which every task" in message
    assert "3.running_var" not in message
    assert (
        "which every task of a batch would share and the inner steps would overwrite; use layers without running "
        "statistics (nn.LayerNorm, or BatchNorm with track_running_stats=False), or register constants with "
        "register_buffer(..., persistent=False)"
    ) in message


def test_full_backprop_asked_to_truncate_is_refused_naming_the_builder_to_use():
    task = SineRegression(OPTIONS)
    objective = task_objective(task, TaskLossConfig())
    with pytest.raises(ValueError, match=r"^FullBackprop does not truncate; build the estimator with estimator_for\("):
        FullBackprop(task, InnerConfig(lr=0.1, steps=2, truncate=True), objective)


def test_truncation_of_a_collecting_task_is_refused_saying_why_and_the_fix():
    task = FreshPointsSine(OPTIONS)
    inner, objective = InnerConfig(lr=0.1, steps=2, truncate=True), task_objective(task, TaskLossConfig())
    with pytest.raises(ML3Error) as refused:
        estimator_for(inner, task, objective)
    assert str(refused.value).endswith(
        "which collects new data with the current θ between inner steps (rollouts), while truncation replays the "
        "inner steps on fixed data; set inner.truncate: false (the full second-order meta-gradient)"
    )


def test_a_theta_leaf_of_one_number_per_task_is_accepted_and_a_scalar_leaf_is_refused():
    task = SineRegression(OPTIONS)
    batch = task.sample_tasks(2, generator(0))
    check_task_axis({"gain": torch.ones(2), "0.weight": torch.ones(2, 8, 1)}, batch)
    with pytest.raises(ML3Error, match=r"θ leaf 'gain' has shape \[\] but the task batch holds 2 tasks"):
        check_task_axis({"gain": torch.tensor(1.0)}, batch)


# -- Adam's step counter and bias correction ----------------------------------------------------------------------
def test_adams_step_count_is_an_int64_per_task_on_thetas_device():
    """The count is exact integers (compared with the inner steps taken, stored in checkpoints), wherever θ lives;
    the meta device stands in for an accelerator."""
    for device in ("cpu", "meta"):
        step = Adam().init({"w": torch.zeros(3, 2, device=device)})["step"]
        assert (step.dtype, step.device.type, tuple(step.shape)) == (torch.int64, device, (3,))


def test_adams_bias_correction_is_computed_in_thetas_dtype():
    """A float64 θ under torch's default float32: the first steps equal the textbook formula in double precision
    (a correction 1 − β₂^t in the default dtype would be off by ~1e-5 relative)."""
    assert torch.get_default_dtype() == torch.float32
    betas, eps, lr = (0.9, 0.999), 1e-8, 0.1
    theta = {"w": torch.tensor([[0.5, -1.0]], dtype=torch.float64)}
    state = Adam(betas, eps).init(theta)
    x, m, v = [0.5, -1.0], [0.0, 0.0], [0.0, 0.0]
    for t, gradient in enumerate(([0.3, -2.0], [0.1, 0.7]), start=1):
        theta, state = Adam(betas, eps).update(theta, {"w": torch.tensor([gradient], dtype=torch.float64)}, state, lr)
        for j, g in enumerate(gradient):
            m[j] = betas[0] * m[j] + (1 - betas[0]) * g
            v[j] = betas[1] * v[j] + (1 - betas[1]) * g * g
            x[j] -= lr * (m[j] / (1 - betas[0] ** t)) / ((v[j] / (1 - betas[1] ** t)) ** 0.5 + eps)
        assert theta["w"].dtype == torch.float64
        torch.testing.assert_close(theta["w"], torch.tensor([x], dtype=torch.float64), rtol=1e-14, atol=0)


# -- the outer loop's state ---------------------------------------------------------------------------------------
class Pair(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


def test_a_captured_state_keeps_the_seconds_and_owns_copies_of_theta_and_the_batch():
    """capture keeps the wall time so far, clones θ and the batch (changing the originals in place later does not
    change the record), and keeps a None θ and batch (before the first step) None."""
    metaloss = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(metaloss.parameters())
    theta, batch = {"w": torch.ones(2, 3)}, Pair(torch.zeros(2), torch.ones(2))
    state = MetaTrainState.capture(3, metaloss, optimizer, generator(0), theta, batch, 1, [], seconds=12.5)
    assert state.seconds == 12.5
    theta["w"].add_(1.0)
    batch.a.add_(1.0)
    assert torch.equal(state.theta["w"], torch.ones(2, 3))
    assert isinstance(state.batch, Pair) and torch.equal(state.batch.a, torch.zeros(2))
    empty = MetaTrainState.capture(0, metaloss, optimizer, generator(0), None, None, 0, [], seconds=0.0)
    assert empty.theta is None and empty.batch is None
