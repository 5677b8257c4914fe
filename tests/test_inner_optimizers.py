"""The inner optimizers (``inner.optimizer``: sgd, momentum, adam): their update rules are heavy-ball momentum and
bias-corrected Adam as torch.optim has them, the meta-gradient through them is the true gradient (finite
differences, an independent plain-autograd unroll; truncation drops the Hessian chain only), vmap over tasks equals
a loop, and ``sgd`` is the paper's inner loop exactly as before, bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import platform
import re

import pytest
import torch
from helpers import TINY_RECIPE
from test_engine import SMOOTH_SINE, assert_same_gradient, dot
from test_resume import assert_same_phi, stopped_at, tiny, without_time

from ml3cli import checkpoints
from ml3cli.artifacts import load_loss
from ml3cli.checkpoints import MetaTrainState, batch_type_of, load_checkpoint
from ml3cli.distributed import Shard
from ml3cli.engine import (
    estimator_for,
    loss_and_scale,
    meta_gradient,
    meta_train,
    optimizer_for,
    sgd_update,
    task_objective,
)
from ml3cli.engine.inner_optimizers import SGD, Adam, Momentum
from ml3cli.errors import ML3Error
from ml3cli.evaluate import NamedLoss, evaluate, step_size_ratio
from ml3cli.losses import builtin_loss, inner_optimizer
from ml3cli.metaloss import MetaLoss
from ml3cli.recipes import InnerConfig, TaskLossConfig, recipe_from_dict, recipe_to_dict
from ml3cli.runtime import generator
from ml3cli.tasks import make_task

LR = 0.05


def random_theta(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """θ of n tasks with two leaves of different ranks."""
    return {"w": torch.randn(n, 3, 2, generator=gen), "b": torch.randn(n, 3, generator=gen)}


def hand_written(name: str, theta, gradients, lr: float, scales, beta=0.9, betas=(0.9, 0.999), eps=1e-8):
    """θ after the steps with ``gradients`` (one dict per step) by the textbook formulas, one task at a time,
    element by element in Python floats; ``scales[k][i]``: the learned step scale of step k for task i."""
    n = next(iter(theta.values())).shape[0]
    out = {key: value.clone() for key, value in theta.items()}
    for key in theta:
        for i in range(n):
            flat = out[key][i].reshape(-1)
            for j in range(flat.numel()):
                x, v, m, s = float(flat[j]), 0.0, 0.0, 0.0
                for k, gradient in enumerate(gradients):
                    g, alpha = float(gradient[key][i].reshape(-1)[j]), lr * scales[k][i]
                    if name == "sgd":
                        x -= alpha * g
                    elif name == "momentum":
                        v = beta * v + g
                        x -= alpha * v
                    else:
                        m = betas[0] * m + (1 - betas[0]) * g
                        s = betas[1] * s + (1 - betas[1]) * g * g
                        m_hat, s_hat = m / (1 - betas[0] ** (k + 1)), s / (1 - betas[1] ** (k + 1))
                        x -= alpha * m_hat / (s_hat**0.5 + eps)
                flat[j] = x
    return out


def run_rule(optimizer, theta, gradients, lr: float, scales=None):
    """θ after the steps with ``gradients`` by ``optimizer.update`` on the whole batch, and the final state."""
    state = optimizer.init(theta)
    for k, gradient in enumerate(gradients):
        scale = None if scales is None else torch.tensor(scales[k])
        theta, state = optimizer.update(theta, gradient, state, lr, scale)
    return theta, state


RULES = {"sgd": SGD(), "momentum": Momentum(0.8), "adam": Adam((0.85, 0.99), 1e-6)}


@pytest.mark.parametrize("name", list(RULES))
def test_update_rules_equal_the_textbook_formulas_and_torch_optim(float64, name):
    """Four steps of each rule on a batch of 2 tasks (float64): θ equals the textbook formulas written element by
    element in Python floats, with a learned step scale per task and step multiplying α; without a scale θ equals
    torch.optim.SGD(momentum=β) / torch.optim.Adam(betas, eps) on the same gradients; Adam's step count is 4."""
    gen = torch.Generator().manual_seed(0)
    theta = random_theta(2, gen)
    gradients = [random_theta(2, gen) for _ in range(4)]
    optimizer = RULES[name]
    hyper = {"beta": 0.8, "betas": (0.85, 0.99), "eps": 1e-6}

    scales = [[0.5, 1.5], [1.0, 0.25], [2.0, 1.0], [0.75, 1.25]]
    got, state = run_rule(optimizer, theta, gradients, LR, scales)
    want = hand_written(name, theta, gradients, LR, scales, **hyper)
    for key in theta:
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-14, msg=key)

    plain, state = run_rule(optimizer, theta, gradients, LR)
    params = [theta[key].clone().requires_grad_() for key in theta]
    if name == "adam":
        reference = torch.optim.Adam(params, lr=LR, betas=(0.85, 0.99), eps=1e-6)
        assert state["step"].tolist() == [4, 4]
    else:
        reference = torch.optim.SGD(params, lr=LR, momentum=0.8 if name == "momentum" else 0.0)
    for gradient in gradients:
        for p, key in zip(params, theta, strict=True):
            p.grad = gradient[key].clone()
        reference.step()
    for p, key in zip(params, theta, strict=True):
        torch.testing.assert_close(plain[key], p.detach(), rtol=1e-13, atol=1e-15, msg=key)


@pytest.mark.parametrize("name", list(RULES))
def test_one_task_inside_vmap_equals_the_batch(float64, name):
    """The rule for one task (scalar scale and step count, under torch.func.vmap) gives the batch's θ and state."""
    gen = torch.Generator().manual_seed(1)
    theta, gradients = random_theta(3, gen), [random_theta(3, gen) for _ in range(3)]
    optimizer = RULES[name]
    batch_theta, batch_state = theta, optimizer.init(theta)
    one_theta, one_state = theta, optimizer.init(theta)
    step = torch.func.vmap(lambda th, g, s, scale: optimizer.update(th, g, s, LR, scale))
    for gradient in gradients:
        scale = torch.rand(3, generator=gen) + 0.5
        batch_theta, batch_state = optimizer.update(batch_theta, gradient, batch_state, LR, scale)
        one_theta, one_state = step(one_theta, gradient, one_state, scale)
    for key in theta:
        torch.testing.assert_close(one_theta[key], batch_theta[key], rtol=1e-14, atol=0)
    assert batch_state.keys() == one_state.keys()
    for key in batch_state:
        assert batch_state[key].shape[0] == 3
        torch.testing.assert_close(one_state[key], batch_state[key], rtol=1e-14, atol=0)


def test_sgd_is_sgd_update_and_momentum_zero_is_sgd(float64):
    """The sgd rule is :func:`sgd_update` itself, with an empty state; momentum with β = 0 takes the same steps."""
    gen = torch.Generator().manual_seed(2)
    theta, gradient, scale = random_theta(2, gen), random_theta(2, gen), torch.tensor([0.5, 2.0])
    stepped, state = SGD().update(theta, gradient, SGD().init(theta), LR, scale)
    assert state == {} and all(torch.equal(stepped[k], sgd_update(theta, gradient, LR, scale)[k]) for k in theta)
    heavy, _ = run_rule(Momentum(0.0), theta, [gradient, gradient], LR)
    plain, _ = run_rule(SGD(), theta, [gradient, gradient], LR)
    assert all(torch.equal(heavy[k], plain[k]) for k in theta)


def test_adam_has_a_finite_meta_derivative_where_a_gradient_is_exactly_zero(float64):
    """A θ entry whose inner gradient is exactly 0 (a dead ReLU unit) keeps v = 0, where √v has no derivative:
    differentiating Adam's first step θ' = −α·g/(|g| + ε) there gives the derivative of −α·g/ε (the |g| term
    counts 0), not NaN, and the other entry its true derivative."""
    x = torch.tensor([[0.0, 0.3]], requires_grad=True)
    theta = {"w": torch.zeros(1, 2)}
    stepped, _ = Adam().update(theta, {"w": 2 * x}, Adam().init(theta), LR)
    (derivative,) = torch.autograd.grad(stepped["w"].sum(), x)
    assert torch.isfinite(derivative).all()
    torch.testing.assert_close(derivative[0, 0], torch.tensor(-LR * 2 / 1e-8))
    y = x.detach()[0, 1].requires_grad_()
    (exact,) = torch.autograd.grad(-LR * 2 * y / ((2 * y).abs() + 1e-8), y)
    torch.testing.assert_close(derivative[0, 1], exact)


def test_optimizer_for_reads_the_recipe_and_bounds_are_refused():
    """inner.optimizer picks the rule with its settings; out-of-range settings, and a setting of another rule
    than the chosen one (it would be silently ignored), are refused naming the field."""
    assert optimizer_for(InnerConfig()) == SGD()
    assert optimizer_for(InnerConfig(optimizer="momentum", momentum=0.5)) == Momentum(0.5)
    assert optimizer_for(InnerConfig(optimizer="adam", betas=[0.8, 0.9], eps=1e-6)) == Adam((0.8, 0.9), 1e-6)
    bad = [
        ({"optimizer": "rmsprop"}, "inner.optimizer"),
        ({"optimizer": "momentum", "momentum": 1.0}, "inner.momentum"),
        ({"optimizer": "momentum", "momentum": -0.1}, "inner.momentum"),
        ({"optimizer": "adam", "betas": [0.9]}, "inner.betas"),
        ({"optimizer": "adam", "betas": [0.9, 1.0]}, "inner.betas"),
        ({"optimizer": "adam", "eps": 0.0}, "inner.eps"),
        ({"momentum": 0.5}, "momentum .0.5. is a setting of optimizer momentum, not of sgd"),
        ({"optimizer": "momentum", "eps": 1e-3}, "eps .0.001. is a setting of optimizer adam, not of momentum"),
    ]
    for inner, message in bad:
        data = copy.deepcopy(TINY_RECIPE)
        data["inner"].update(inner)
        with pytest.raises(ML3Error, match=message):
            recipe_from_dict(data)


# -- the meta-gradient through the optimizer's state -----------------------------------------------------------
#: the inner settings of the meta-gradient checks: rates at which K = 3 steps move θ well but smoothly
STATEFUL = {
    "momentum": {"optimizer": "momentum", "lr": 0.1, "momentum": 0.8},
    "adam": {"optimizer": "adam", "lr": 0.02, "betas": [0.8, 0.95], "eps": 1e-6},
}


def setup(n_tasks: int, learned_lr: bool = False):
    """A tanh sine task and tanh meta-loss (test_engine's) with a batch of tasks and θ₀, in the default dtype."""
    torch.manual_seed(0)
    task = make_task("sine", SMOOTH_SINE)
    metaloss = MetaLoss(task.loss_inputs_spec, hidden=(8, 8), activation="tanh", learned_lr=learned_lr)
    if learned_lr:
        with torch.no_grad():  # a scale far from 1, so that a misplaced scale cannot hide
            metaloss.net[-1].bias[1] = 0.8
    gen = generator(0)
    batch, theta = task.sample_tasks(n_tasks, gen), task.init_theta(n_tasks, gen)
    return task, metaloss, {name: p.detach().clone() for name, p in metaloss.named_parameters()}, theta, batch


def reference_loss(metaloss, phi, task, theta, batch, settings: dict, steps: int, truncate: bool) -> torch.Tensor:
    """Mean task loss after ``steps`` inner steps of momentum or Adam, one task at a time: the textbook formulas
    in plain torch, each inner gradient by ``torch.autograd.grad(create_graph=True)``; with ``truncate`` the
    inner gradient (and learned scale) at a detached copy of θ, the optimizer's state left as it is."""
    loss_fn = metaloss.inner_loss_with_phi(phi)
    lr = settings["lr"]
    losses = []
    for i in range(batch[0].shape[0]):
        one = type(batch)(*(t[i] for t in batch))
        th = {k: v[i].clone().requires_grad_(True) for k, v in theta.items()}
        first = {k: torch.zeros_like(v) for k, v in th.items()}
        second = {k: torch.zeros_like(v) for k, v in th.items()}
        for k in range(steps):
            at = {key: v.detach().requires_grad_(True) for key, v in th.items()} if truncate else th
            loss, scale = loss_and_scale(loss_fn(task.loss_inputs(at, one)))
            grads = torch.autograd.grad(loss, list(at.values()), create_graph=True)
            for key, g in zip(th, grads, strict=True):
                if settings["optimizer"] == "momentum":
                    first[key] = settings["momentum"] * first[key] + g
                    move = first[key]
                else:
                    (b1, b2), t = settings["betas"], k + 1
                    first[key] = b1 * first[key] + (1 - b1) * g
                    second[key] = b2 * second[key] + (1 - b2) * g * g
                    move = (first[key] / (1 - b1**t)) / (torch.sqrt(second[key] / (1 - b2**t)) + settings["eps"])
                th[key] = th[key] - lr * (1.0 if scale is None else scale) * move
        losses.append(task.task_loss(th, one))
    return torch.stack(losses).mean()


def reference_gradient(metaloss, phi, task, theta, batch, settings, steps, truncate) -> dict[str, torch.Tensor]:
    leaf = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    loss = reference_loss(metaloss, leaf, task, theta, batch, settings, steps, truncate)
    return dict(zip(leaf, torch.autograd.grad(loss, list(leaf.values())), strict=True))


def engine_gradient(metaloss, phi, task, theta, batch, settings, steps, truncate=False, **options):
    inner = InnerConfig(steps=steps, truncate=truncate, **settings)
    return meta_gradient(metaloss, phi, task, theta, batch, inner, task_objective(task, TaskLossConfig()), **options)


@pytest.mark.parametrize("n_tasks", [1, 2], ids=["one-task-path", "vmap-path"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", list(STATEFUL))
def test_meta_gradient_through_the_optimizer_matches_finite_differences(float64, name, steps, n_tasks):
    """∇_φ L_T through K = 1 and K = 3 steps of momentum and Adam equals central finite differences of L_T(φ)
    along random directions and single coordinates of φ (float64, relative error < 1e-5), on the single-task
    and the vmap paths; the engine's L_T is that of the independent unroll."""
    task, metaloss, phi, theta, batch = setup(n_tasks)
    settings = STATEFUL[name]
    gradient, seen = engine_gradient(metaloss, phi, task, theta, batch, settings, steps)

    def loss_at(p: dict[str, torch.Tensor]) -> float:
        return float(reference_loss(metaloss, p, task, theta, batch, settings, steps, False).detach())

    assert float(seen.task_loss.mean()) == pytest.approx(loss_at(phi), rel=1e-10)
    gen = torch.Generator().manual_seed(1)
    directions = [{k: torch.randn(v.shape, generator=gen) for k, v in phi.items()} for _ in range(2)]
    names = list(phi)
    for key, index in [(names[0], (3, 1)), (names[-1], (0,))]:  # a first-layer weight, the output bias
        unit = {k: torch.zeros_like(v) for k, v in phi.items()}
        unit[key][index] = 1.0
        directions.append(unit)
    eps = 1e-5
    for d in directions:
        fd = (loss_at({k: phi[k] + eps * d[k] for k in phi}) - loss_at({k: phi[k] - eps * d[k] for k in phi})) / (
            2 * eps
        )
        analytic = dot(gradient, d)
        assert abs(analytic) > 1e-8, "a degenerate direction would make the check vacuous"
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-10)


@pytest.mark.parametrize("learned_lr", [False, True], ids=["plain", "learned-lr"])
@pytest.mark.parametrize("truncate", [False, True], ids=["full", "truncated"])
@pytest.mark.parametrize("name", list(STATEFUL))
def test_meta_gradient_through_the_optimizer_matches_plain_autograd(float64, name, truncate, learned_lr):
    """On 3 tasks and K = 3, the engine's meta-gradient (full, or truncated: each inner gradient at a detached
    θ_k with the state's derivative kept) equals the plain-autograd unroll of the textbook formulas, also with a
    learned step scale multiplying α; the truncated one differs from the full one."""
    task, metaloss, phi, theta, batch = setup(3, learned_lr)
    settings = STATEFUL[name]
    gradient, _ = engine_gradient(metaloss, phi, task, theta, batch, settings, 3, truncate)
    reference = reference_gradient(metaloss, phi, task, theta, batch, settings, 3, truncate)
    assert_same_gradient(gradient, reference, rtol=1e-9, atol=1e-12)
    if truncate:
        full, _ = engine_gradient(metaloss, phi, task, theta, batch, settings, 3)
        flat_full = torch.cat([full[k].flatten() for k in full])
        flat_truncated = torch.cat([gradient[k].flatten() for k in gradient])
        assert torch.linalg.vector_norm(flat_full - flat_truncated) > 1e-3 * torch.linalg.vector_norm(flat_full)


@pytest.mark.parametrize("truncate", [False, True], ids=["full", "truncated"])
@pytest.mark.parametrize("name", list(STATEFUL))
def test_vmap_over_tasks_equals_a_loop_with_the_state(float64, name, truncate):
    """One call on 3 tasks, continuing from a state carried over from earlier steps, gives the mean of the
    per-task meta-gradients, and each task's L_T, θ_K and optimizer state, that 3 one-task calls give; 2 + 2 steps
    with the state carried reach the θ and state of 4 steps in one go."""
    n = 3
    task, metaloss, phi, theta_0, batch = setup(n)
    settings = STATEFUL[name]
    _, earlier = engine_gradient(metaloss, phi, task, theta_0, batch, settings, 2, diagnostics=False)
    theta, state = earlier.theta, earlier.state  # a state that is not zero, as the outer loop carries it
    gradient, seen = engine_gradient(metaloss, phi, task, theta, batch, settings, 2, truncate, state=state)
    _, straight = engine_gradient(metaloss, phi, task, theta_0, batch, settings, 4, truncate, diagnostics=False)
    assert_same_gradient(seen.theta, straight.theta, rtol=1e-12, atol=1e-14)
    assert_same_gradient(seen.state, straight.state, rtol=1e-12, atol=1e-14)
    per_task = []
    for i in range(n):
        one = {k: v[i : i + 1] for k, v in theta.items()}
        one_state = {k: v[i : i + 1] for k, v in state.items()}
        one_batch = type(batch)(*(t[i : i + 1] for t in batch))
        g, s = engine_gradient(metaloss, phi, task, one, one_batch, settings, 2, truncate, state=one_state)
        per_task.append(g)
        torch.testing.assert_close(seen.task_loss[i : i + 1], s.task_loss, rtol=1e-12, atol=0)
        for k in seen.theta:
            torch.testing.assert_close(seen.theta[k][i : i + 1], s.theta[k], rtol=1e-12, atol=1e-14)
        assert seen.state.keys() == s.state.keys() == state.keys()
        for k in seen.state:
            torch.testing.assert_close(seen.state[k][i : i + 1], s.state[k], rtol=1e-12, atol=1e-14)
    mean = {k: torch.stack([g[k] for g in per_task]).mean(0) for k in gradient}
    assert_same_gradient(gradient, mean, rtol=1e-10, atol=1e-13)
    if name == "adam":
        assert seen.state["step"].tolist() == [4] * n


@pytest.mark.parametrize("truncate", [False, True], ids=["full", "truncated"])
@pytest.mark.parametrize("name", list(STATEFUL))
def test_each_process_differentiates_its_share_of_theta_and_the_state(float64, name, truncate):
    """With a shard (one of 2 processes) the estimator takes its half of the tasks from the WHOLE θ and state;
    the two halves' meta-gradients average to the single process's, and their θ_K and states join into its."""
    task, metaloss, phi, theta, batch = setup(4)
    settings = STATEFUL[name]
    _, earlier = engine_gradient(metaloss, phi, task, theta, batch, settings, 2, diagnostics=False)
    inner = InnerConfig(steps=2, truncate=truncate, **settings)
    estimator = estimator_for(inner, task, task_objective(task, TaskLossConfig()))
    whole = estimator.estimate(metaloss, phi, earlier.theta, batch, state=earlier.state)
    shares = [
        estimator.estimate(metaloss, phi, earlier.theta, batch, shard=Shard(rank, 2), state=earlier.state)
        for rank in (0, 1)
    ]
    mean = {k: (shares[0].gradient[k] + shares[1].gradient[k]) / 2 for k in whole.gradient}
    assert_same_gradient(mean, whole.gradient, rtol=1e-10, atol=1e-13)
    for part in ("theta", "state"):
        joined = {k: torch.cat([getattr(s, part)[k] for s in shares]) for k in getattr(whole, part)}
        assert_same_gradient(joined, getattr(whole, part), rtol=1e-12, atol=1e-14)


# -- sgd is exactly the inner loop of before ------------------------------------------------------------------
#: φ after 6 outer steps of the tiny recipe (sha256 of its tensors' bytes, first 16 hex digits), the meta-test
#: curves of the last run's loss and its step-size ratio, computed by this test's code on the commit before the
#: inner optimizers existed (torch 2.13.0+cpu, x86_64, float32, one thread)
BEFORE_INNER_OPTIMIZERS = {
    "full": "5f26ca603fda0457",
    "one_task": "5315d1e133ecc9c9",
    "truncated_every": "560fc038c989b3a1",
    "learned_lr": "ae9fa44e9cc6dfc9",
    "meta_test": "5545a85291492f72",
    "step_size_ratio": "0x1.1339ee3333333p-8",
}
RECORDED_ON = ("2.13.0+cpu", "x86_64")
SGD_CASES = {
    "full": {"inner": {"steps": 2, "reset_every": 4}},
    "one_task": {"inner": {"steps": 2, "reset_every": 4}, "outer": {"tasks": 1}},
    "truncated_every": {"inner": {"steps": 3, "reset_every": 6, "truncate": True, "task_loss_at": "every"}},
    "learned_lr": {"inner": {"steps": 2}, "meta_loss": {"learned_lr": True}},
}


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def sgd_fingerprints() -> dict[str, str]:
    out = {}
    for name, change in SGD_CASES.items():
        data = copy.deepcopy(TINY_RECIPE)
        data["outer"]["steps"] = 6
        for section, values in change.items():
            data[section].update(values)
        recipe = recipe_from_dict(data)
        result = meta_train(recipe, make_task(recipe.task, recipe.task_options))
        out[name] = digest(result.metaloss.state_dict().values())
    test_task = make_task("sine_shifted", data["meta_test"]["task_options"])
    learned = NamedLoss("learned", result.metaloss.as_loss_fn(), 0.01)
    curves = evaluate(test_task, [learned, builtin_loss(test_task, "mse", 0.01)], 2, 1, 5)
    out["meta_test"] = digest([torch.from_numpy(c.values) for c in curves])
    ratio = step_size_ratio(test_task, learned, builtin_loss(test_task, "mse", 0.01), 2, [0], 5)
    out["step_size_ratio"] = float(ratio.mean).hex()
    return out


@pytest.mark.slow  # float kernels differ between CPU models: a check to run on a machine like the one it was recorded on
@pytest.mark.skipif(
    (torch.__version__, platform.machine()) != RECORDED_ON,
    reason="the recorded bits are those of one torch build on one kind of CPU",
)
def test_sgd_is_bit_identical_to_the_inner_loop_before_the_optimizers():
    """With the default inner.optimizer sgd, meta-training (vmap and one-task paths, truncated with
    task_loss_at every, a learned step scale) and meta-test give the very bits they gave before the inner
    optimizers were added: φ, the meta-test curves and the step-size ratio."""
    assert sgd_fingerprints() == BEFORE_INNER_OPTIMIZERS


# -- the outer loop carries the state; checkpoints keep it --------------------------------------------------------
def stateful_recipe(name: str, steps: int = 10) -> dict:
    """The tiny recipe with K = 2 inner steps and θ (and the optimizer's state) reset every 6 inner steps."""
    settings = {"momentum": {"momentum": 0.8}, "adam": {"lr": 3e-3, "betas": [0.8, 0.95]}}[name]
    return tiny(steps, inner={"steps": 2, "reset_every": 6, "optimizer": name, **settings})


@pytest.mark.parametrize("name", list(STATEFUL))
def test_the_outer_loop_carries_the_state_and_resets_it_with_theta(monkeypatch, name):
    """Between redraws every outer step continues from the θ AND the optimizer state the previous one reached; at
    a redraw (every reset_every inner steps) the state starts afresh (zero, Adam's count 0) with the new θ₀."""
    import ml3cli.engine.outer as outer

    seen = []
    real = outer.estimator_for

    class Recording:
        def __init__(self, estimator):
            self.estimator = estimator

        def estimate(self, metaloss, phi, theta, batch, gen=None, shard=None, state=None):
            estimate = self.estimator.estimate(metaloss, phi, theta, batch, gen, shard, state=state)
            seen.append((state, estimate.state))
            return estimate

    monkeypatch.setattr(outer, "estimator_for", lambda *args: Recording(real(*args)))
    recipe = recipe_from_dict(stateful_recipe(name, 7))
    meta_train(recipe, make_task(recipe.task, recipe.task_options))
    for step, (given, _) in enumerate(seen, start=1):
        if step in (1, 4, 7):  # θ redrawn: 3 outer steps of 2 inner steps fill a reset period of 6
            assert all(not value.any() for value in given.values()), f"outer step {step}: state not reset"
        else:
            before = seen[step - 2][1]
            assert all(torch.equal(given[k], before[k]) for k in before), f"outer step {step}: state not carried"
            assert any(value.any() for value in given.values())
    if name == "adam":
        assert [int(after["step"][0]) for _, after in seen] == [2, 4, 6, 2, 4, 6, 2]


@pytest.mark.parametrize("name", list(STATEFUL))
def test_resume_mid_reset_period_is_bit_identical_with_the_state(tmp_path, name):
    """Stop at an outer step inside a reset period (the optimizer's state neither fresh nor spent) and at its
    end, save and load the checkpoint, resume: φ, the curves and the final inner state equal the uninterrupted
    run's bit for bit; the checkpoint holds the state (Adam's step count = θ's age) and validate_state accepts it."""
    recipe = recipe_from_dict(stateful_recipe(name))
    task = make_task(recipe.task, recipe.task_options)
    finals: list[MetaTrainState] = []
    full = meta_train(recipe, task, on_state=lambda s, snap: finals.append(snap()) if s == recipe.outer.steps else None)
    for k in (2, 6):
        loaded = load_checkpoint(stopped_at(recipe, task, k, tmp_path), batch_type_of(task))
        state = loaded.state
        assert state.inner_state.keys() == optimizer_for(recipe.inner).init(state.theta).keys()
        assert any(value.any() for value in state.inner_state.values())
        if name == "adam":
            assert state.inner_state["step"].tolist() == [state.age] * recipe.outer.tasks
        checkpoints.validate_state(loaded, recipe, task)
        ends: list[MetaTrainState] = []
        resumed = meta_train(
            recipe, task, resume=state, on_state=lambda s, snap, out=ends: out.append(snap()) if s == 10 else None
        )
        assert_same_phi(full.metaloss.state_dict(), resumed.metaloss.state_dict())
        assert without_time(full.curves) == without_time(resumed.curves)
        assert_same_phi(finals[0].inner_state, ends[0].inner_state)


def test_a_checkpoint_with_a_damaged_or_missing_state_is_refused(tmp_path):
    """validate_state refuses an Adam state whose step count is not θ's age, with a negative v, or missing, and a
    momentum checkpoint under an adam recipe is refused naming inner.optimizer; a checkpoint written before the
    optimizers existed (no inner.optimizer in its recipe) resumes as the sgd it ran with."""
    recipe = recipe_from_dict(stateful_recipe("adam"))
    task = make_task(recipe.task, recipe.task_options)
    loaded = load_checkpoint(stopped_at(recipe, task, 2, tmp_path), batch_type_of(task))
    inner = loaded.state.inner_state
    damaged = {
        "Adam's step count": inner | {"step": inner["step"] + 1},
        "Adam's v/0.weight is negative": inner | {"v/0.weight": -inner["v/0.weight"] - 1},
        "the adam optimizer's state: names": {},
    }
    for message, state in damaged.items():
        broken = dataclasses.replace(loaded, state=dataclasses.replace(loaded.state, inner_state=state))
        with pytest.raises(ML3Error, match=re.escape(f"does not fit this recipe's model or task ({message}")):
            checkpoints.validate_state(broken, recipe, task)

    momentum = recipe_from_dict(tiny(4, inner={"optimizer": "momentum"}))
    saved = load_checkpoint(stopped_at(momentum, task, 2, tmp_path), batch_type_of(task))
    adam = recipe_to_dict(recipe_from_dict(tiny(4, inner={"optimizer": "adam"})))
    with pytest.raises(ML3Error, match="field `inner.optimizer` is 'momentum' in the checkpoint but 'adam'"):
        checkpoints.check_resumable(saved, adam, 4)

    plain = recipe_from_dict(tiny(4))
    old = load_checkpoint(stopped_at(plain, task, 2, tmp_path), batch_type_of(task))
    for key in ("optimizer", "momentum", "betas", "eps"):
        del old.recipe["inner"][key]
    checkpoints.check_resumable(old, recipe_to_dict(plain), 4)
    with pytest.raises(ML3Error, match="field `inner.optimizer` is 'sgd' in the checkpoint but 'adam'"):
        checkpoints.check_resumable(old, adam, 4)


# -- meta-test ----------------------------------------------------------------------------------------------------
def adam_by_hand(task, loss_fn, theta, batch, lr: float, steps: int, betas, eps) -> torch.Tensor:
    """Mean task loss over the tasks at steps 0 … S of Adam with ``loss_fn``, one task at a time: the textbook
    formulas in plain torch, the gradient by torch.autograd.grad, a learned step scale multiplying α."""
    curves = []
    for i in range(batch[0].shape[0]):
        one = type(batch)(*(t[i] for t in batch))
        th = {k: v[i].clone() for k, v in theta.items()}
        m = {k: torch.zeros_like(v) for k, v in th.items()}
        v2 = {k: torch.zeros_like(v) for k, v in th.items()}
        curve = [float(task.task_loss(th, one))]
        for t in range(1, steps + 1):
            at = {k: v.requires_grad_(True) for k, v in th.items()}
            loss, scale = loss_and_scale(loss_fn(task.loss_inputs(at, one)))
            grads = torch.autograd.grad(loss, list(at.values()))
            with torch.no_grad():
                for k, g in zip(th, grads, strict=True):
                    m[k] = betas[0] * m[k] + (1 - betas[0]) * g
                    v2[k] = betas[1] * v2[k] + (1 - betas[1]) * g * g
                    move = (m[k] / (1 - betas[0] ** t)) / ((v2[k] / (1 - betas[1] ** t)).sqrt() + eps)
                    th[k] = th[k] - lr * (1.0 if scale is None else float(scale)) * move
            th = {k: v.detach() for k, v in th.items()}
            curve.append(float(task.task_loss(th, one)))
        curves.append(curve)
    return torch.tensor(curves).mean(0)


def test_meta_test_trains_with_the_recorded_or_chosen_optimizer(tmp_path, monkeypatch, capsys):
    """A loss meta-trained with inner.optimizer adam is meta-tested with Adam by default (its recorded betas and
    eps), and `--optimizer` chooses another: the curves of the learned loss and of the baseline equal a
    hand-written Adam loop with each loss on the same tasks and θ₀; sgd gives other curves from the same θ₀; an
    unknown name is refused in one line; momentum takes the recorded β when the artifact has one."""
    from helpers import run_main

    from ml3cli.artifacts import save_loss
    from ml3cli.runtime import stream_seed

    recipe = recipe_from_dict(stateful_recipe("adam", steps=3))
    result = meta_train(recipe, make_task(recipe.task, recipe.task_options))
    artifact = save_loss(tmp_path / "adam.safetensors", result.metaloss, {"recipe": recipe_to_dict(recipe)})
    common = ("--task", "sine_shifted", "--tasks", "2", "--seed", "3", "--num-seeds", "1", "--steps", "6", "-q")

    def meta_test(*extra: str) -> dict:
        out = tmp_path / f"run-{'-'.join(extra) or 'recorded'}"
        result = run_main(monkeypatch, capsys, "meta-test", "--loss", artifact, *common, "--out-dir", out, *extra,
                          cwd=tmp_path)  # fmt: skip
        assert result.code == 0, result.output
        return json.loads((out / "results.json").read_text())

    recorded = meta_test()
    assert recorded["inner_optimizer"] == {"name": "adam", "betas": [0.8, 0.95], "eps": 1e-8}
    task = make_task("sine_shifted", TINY_RECIPE["meta_test"]["task_options"])
    gen = generator(stream_seed("test", 3))
    batch, theta = task.sample_tasks(2, gen), task.init_theta(2, gen)
    module = load_loss(artifact)
    for loss, fn in zip(recorded["losses"], [module.as_loss_fn(), builtin_loss(task, "mse", 0.01).fn], strict=True):
        assert loss["lr"] == 0.01
        want = adam_by_hand(task, fn, theta, batch, 0.01, 6, (0.8, 0.95), 1e-8)
        torch.testing.assert_close(torch.tensor(loss["per_seed"][0]), want, rtol=1e-4, atol=1e-6, msg=loss["name"])

    plain = meta_test("--optimizer", "sgd")
    assert plain["inner_optimizer"] == {"name": "sgd"}
    assert plain["losses"][0]["per_seed"][0][0] == recorded["losses"][0]["per_seed"][0][0]  # the same θ₀
    assert plain["losses"][0]["per_seed"][0][-1] != recorded["losses"][0]["per_seed"][0][-1]

    refused = run_main(monkeypatch, capsys, "meta-test", "--loss", artifact, *common, "--optimizer", "rmsprop",
                       cwd=tmp_path)  # fmt: skip
    assert refused.code == 2
    assert refused.stderr.strip() == "error: --optimizer 'rmsprop': expected one of sgd, momentum, adam"
    assert inner_optimizer("momentum", {"optimizer": "adam", "betas": [0.8, 0.95]}) == Momentum(0.9)
    assert inner_optimizer(None, {"optimizer": "momentum", "momentum": 0.5}) == Momentum(0.5)
    assert inner_optimizer(None, {"lr": 0.1}) == SGD()  # an artifact from before inner.optimizer
