"""The engine's contracts: the meta-gradient is the true gradient of the post-update task loss (checked against
finite differences and an independent plain-autograd implementation), truncation drops exactly the θ–θ chain,
vmap over tasks equals a loop, meta-training is reproducible from its seed, and divergence is reported.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.func import functional_call

from ml3cli.engine import meta_gradient, meta_train, task_objective
from ml3cli.errors import DivergenceError, ML3Error
from ml3cli.metaloss import MetaLoss
from ml3cli.recipes import InnerConfig, TaskLossConfig, recipe_from_dict
from ml3cli.runtime import generator
from ml3cli.tasks import make_task
from ml3cli.tasks.sine import SineOptions, SineRegression

SMOOTH_SINE = {"hidden": [8, 8], "points": 16, "query_points": 16, "activation": "tanh"}
INNER_LR = 0.3


def smooth_setup(n_tasks: int = 2, seed: int = 0):
    """A tanh sine task, a tanh meta-loss and a batch of tasks with θ₀, in the current default dtype."""
    torch.manual_seed(seed)
    task = make_task("sine", SMOOTH_SINE)
    metaloss = MetaLoss(task.loss_inputs_spec, hidden=(8, 8), activation="tanh")
    gen = generator(seed)
    batch = task.sample_tasks(n_tasks, gen)
    theta = task.init_theta(n_tasks, gen)
    phi = {name: p.detach().clone() for name, p in metaloss.named_parameters()}
    return task, metaloss, phi, theta, batch


def reference_loss(metaloss, phi, task, theta, batch, lr: float, steps: int, truncate: bool) -> torch.Tensor:
    """Mean task loss after ``steps`` inner SGD steps, one task at a time with ``torch.autograd.grad``.

    Independent of the engine's ``torch.func`` code: with ``truncate`` the inner gradient is taken at a
    detached copy of θ (so it depends on φ but not on earlier steps), otherwise at θ itself.
    """
    losses = []
    for i in range(batch[0].shape[0]):
        one = type(batch)(*(t[i] for t in batch))
        th = {k: v[i].clone().requires_grad_(True) for k, v in theta.items()}
        for _ in range(steps):
            at = {k: v.detach().requires_grad_(True) for k, v in th.items()} if truncate else th
            inner = functional_call(metaloss, phi, (), task.loss_inputs(at, one))
            grads = torch.autograd.grad(inner, list(at.values()), create_graph=True)
            th = {k: th[k] - lr * g for k, g in zip(th, grads, strict=True)}
        losses.append(task.task_loss(th, one))
    return torch.stack(losses).mean()


def reference_gradient(metaloss, phi, task, theta, batch, lr, steps, truncate) -> dict[str, torch.Tensor]:
    leaf = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    loss = reference_loss(metaloss, leaf, task, theta, batch, lr, steps, truncate)
    grads = torch.autograd.grad(loss, list(leaf.values()))
    return dict(zip(leaf, grads, strict=True))


def engine_gradient(metaloss, phi, task, theta, batch, steps: int, truncate: bool = False):
    inner = InnerConfig(lr=INNER_LR, steps=steps, truncate=truncate)
    return meta_gradient(metaloss, phi, task, theta, batch, inner, task_objective(task, TaskLossConfig()))


def dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k] * b[k]).sum() for k in a))


def assert_same_gradient(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, atol: float):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=f"gradient of {k} differs")


@pytest.mark.parametrize("n_tasks", [1, 2], ids=["one-task-path", "vmap-path"])
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_matches_finite_differences(float64, steps, n_tasks):
    """∇_φ L_T from the engine equals central finite differences of L_T(φ) along random directions and
    along single coordinates of φ (float64, relative error < 1e-5), for K = 1 and K = 3 inner steps, on both
    the single-task (plain autograd) path and the vmap path."""
    task, metaloss, phi, theta, batch = smooth_setup(n_tasks)
    gradient, seen = engine_gradient(metaloss, phi, task, theta, batch, steps)

    def loss_at(p: dict[str, torch.Tensor]) -> float:
        return float(reference_loss(metaloss, p, task, theta, batch, INNER_LR, steps, False).detach())

    # the engine's forward value is the same L_T as the independent implementation's
    assert float(seen.task_loss.mean()) == pytest.approx(loss_at(phi), rel=1e-10)

    gen = torch.Generator().manual_seed(1)
    directions = [{k: torch.randn(v.shape, generator=gen) for k, v in phi.items()} for _ in range(2)]
    names = list(phi)
    for name, index in [(names[0], (3, 1)), (names[-1], (0,))]:  # a first-layer weight, the output bias
        unit = {k: torch.zeros_like(v) for k, v in phi.items()}
        unit[name][index] = 1.0
        directions.append(unit)

    eps = 1e-5
    for d in directions:
        plus = {k: phi[k] + eps * d[k] for k in phi}
        minus = {k: phi[k] - eps * d[k] for k in phi}
        fd = (loss_at(plus) - loss_at(minus)) / (2 * eps)
        analytic = dot(gradient, d)
        assert abs(analytic) > 1e-8, "a degenerate direction would make the check vacuous"
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-10)


@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_matches_plain_autograd(float64, steps):
    """The engine's torch.func meta-gradient equals a loop over tasks with torch.autograd.grad(create_graph)."""
    task, metaloss, phi, theta, batch = smooth_setup(n_tasks=3)
    gradient, _ = engine_gradient(metaloss, phi, task, theta, batch, steps)
    reference = reference_gradient(metaloss, phi, task, theta, batch, INNER_LR, steps, truncate=False)
    assert_same_gradient(gradient, reference, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("truncate", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_single_task_path_equals_the_vmap_path(float64, steps, truncate):
    """One task skips vmap (plain autograd inner gradients): meta-gradient, task loss and θ_K are those of the
    vmap path to rounding."""
    task, metaloss, phi, theta, batch = smooth_setup(n_tasks=1)
    inner = InnerConfig(lr=INNER_LR, steps=steps, truncate=truncate)
    objective = task_objective(task, TaskLossConfig())
    fast = meta_gradient(metaloss, phi, task, theta, batch, inner, objective)
    vmapped = meta_gradient(metaloss, phi, task, theta, batch, inner, objective, single_task_path=False)
    assert_same_gradient(fast[0], vmapped[0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(fast[1].task_loss, vmapped[1].task_loss, rtol=1e-12, atol=0)
    assert_same_gradient(fast[1].theta, vmapped[1].theta, rtol=1e-12, atol=1e-15)
    assert fast[1].task_loss.shape == (1,) and not fast[1].theta["0.weight"].requires_grad


def test_truncated_gradient_is_the_detached_inner_gradient_and_differs_from_full(float64):
    """truncate=True equals the reference in which each inner gradient is taken at a detached θ_k, and for
    K ≥ 2 it is a different vector from the full second-order meta-gradient."""
    task, metaloss, phi, theta, batch = smooth_setup()
    steps = 3
    full, _ = engine_gradient(metaloss, phi, task, theta, batch, steps, truncate=False)
    truncated, _ = engine_gradient(metaloss, phi, task, theta, batch, steps, truncate=True)

    reference = reference_gradient(metaloss, phi, task, theta, batch, INNER_LR, steps, truncate=True)
    assert_same_gradient(truncated, reference, rtol=1e-9, atol=1e-12)

    flat_full = torch.cat([full[k].flatten() for k in full])
    flat_truncated = torch.cat([truncated[k].flatten() for k in truncated])
    assert torch.linalg.vector_norm(flat_full - flat_truncated) > 1e-3 * torch.linalg.vector_norm(flat_full)


def test_truncation_changes_nothing_for_one_inner_step(float64):
    """With K = 1 there is no θ–θ chain to drop: truncated and full meta-gradients agree."""
    task, metaloss, phi, theta, batch = smooth_setup()
    full, _ = engine_gradient(metaloss, phi, task, theta, batch, 1, truncate=False)
    truncated, _ = engine_gradient(metaloss, phi, task, theta, batch, 1, truncate=True)
    assert_same_gradient(truncated, full, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("steps", [1, 2])
def test_vmap_over_tasks_equals_a_loop(float64, steps):
    """One vmapped call on n tasks gives the mean of the per-task meta-gradients and the per-task losses
    that n separate calls give."""
    n = 4
    task, metaloss, phi, theta, batch = smooth_setup(n_tasks=n)
    gradient, seen = engine_gradient(metaloss, phi, task, theta, batch, steps)

    per_task_grads, after, before, learned = [], [], [], []
    for i in range(n):
        one_batch = type(batch)(*(t[i : i + 1] for t in batch))
        one_theta = {k: v[i : i + 1] for k, v in theta.items()}
        g, s = engine_gradient(metaloss, phi, task, one_theta, one_batch, steps)
        per_task_grads.append(g)
        after.append(s.task_loss)
        before.append(s.task_loss_before)
        learned.append(s.learned_loss)
        for k in seen.theta:
            torch.testing.assert_close(seen.theta[k][i : i + 1], s.theta[k], rtol=1e-12, atol=1e-14)

    mean_grad = {k: torch.stack([g[k] for g in per_task_grads]).mean(0) for k in gradient}
    assert_same_gradient(gradient, mean_grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(seen.task_loss, torch.cat(after), rtol=1e-12, atol=0)
    torch.testing.assert_close(seen.task_loss_before, torch.cat(before), rtol=1e-12, atol=0)
    torch.testing.assert_close(seen.learned_loss, torch.cat(learned), rtol=1e-12, atol=0)
    assert seen.task_loss.shape == (n,)


def test_meta_gradient_is_finite_and_non_zero():
    """In float32 with the default ReLU networks, every tensor of ∇_φ is finite and the whole is non-zero
    (ML³ has no first-order shortcut that would make it vanish), and θ_K has moved from θ₀."""
    task = make_task("sine", {"hidden": [8, 8], "points": 16, "query_points": 16})
    metaloss = MetaLoss(task.loss_inputs_spec, hidden=(8, 8))
    gen = generator(0)
    batch, theta = task.sample_tasks(3, gen), task.init_theta(3, gen)
    phi = {k: p.detach() for k, p in metaloss.named_parameters()}
    gradient, seen = meta_gradient(
        metaloss, phi, task, theta, batch, InnerConfig(lr=1e-2, steps=2), task_objective(task, TaskLossConfig())
    )
    assert gradient.keys() == phi.keys()
    for k, g in gradient.items():
        assert g.shape == phi[k].shape
        assert torch.isfinite(g).all(), k
    assert sum(float(g.abs().sum()) for g in gradient.values()) > 0
    assert torch.isfinite(seen.task_loss).all() and seen.task_loss.shape == (3,)
    assert any(not torch.equal(seen.theta[k], theta[k]) for k in theta)


# -- what vmap over tasks needs ---------------------------------------------------------------------------------
class NormalizedSine(SineRegression):
    """The sine task with batch norm in the optimizee: running statistics are state outside θ."""

    def build_optimizee(self) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(1, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        )


class ScaledSine(SineRegression):
    """A constant registered as a non-persistent buffer (as the mountain-car and inverse-dynamics optimizees do)."""

    def build_optimizee(self) -> torch.nn.Module:
        module = super().build_optimizee()
        module.register_buffer("gain", torch.tensor(1.0), persistent=False)
        return module


class UnstackedSine(SineRegression):
    """Draws one first-layer weight shared by all tasks: a θ leaf without the task axis."""

    def init_theta(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        theta = super().init_theta(n, generator)
        return theta | {"0.weight": theta["0.weight"][0]}


def guard_setup(task: SineRegression, n_tasks: int):
    metaloss = MetaLoss(task.loss_inputs_spec, hidden=(8,))
    gen = generator(0)
    batch, theta = task.sample_tasks(n_tasks, gen), task.init_theta(n_tasks, gen)
    return metaloss, {k: p.detach() for k, p in metaloss.named_parameters()}, theta, batch


def refused_run(tiny_recipe, task, match: str, **inner) -> None:
    """meta_train on ``task`` raises an ML3Error matching ``match`` before it finishes any outer step."""
    tiny_recipe["inner"].update(inner)
    done: list[int] = []
    with pytest.raises(ML3Error, match=match):
        meta_train(recipe_from_dict(tiny_recipe), task, on_step=lambda step, record: done.append(step))
    assert done == []


@pytest.mark.parametrize("truncate", [False, True], ids=["full", "truncated"])
@pytest.mark.parametrize("n_tasks", [1, 2], ids=["one-task-path", "vmap-path"])
def test_an_optimizee_with_running_statistics_is_refused(tiny_recipe, n_tasks, truncate):
    """θ holds parameters only: batch norm's running statistics would be shared by the tasks of a batch and
    overwritten by the inner steps (silently on the one-task path). The estimator refuses such an optimizee,
    naming the buffers and the fix, before any step; the statistics stay untouched."""
    options = SineOptions(points=8, query_points=8)
    task = NormalizedSine(options)
    metaloss, phi, theta, batch = guard_setup(task, n_tasks)
    inner = InnerConfig(lr=0.1, steps=2, truncate=truncate)
    expected = r"task 'sine': the optimizee keeps state outside θ in buffer\(s\) \['1.running_mean', '1.running_var'"
    with pytest.raises(ML3Error, match=expected + r".*track_running_stats=False"):
        meta_gradient(metaloss, phi, task, theta, batch, inner, task_objective(task, TaskLossConfig()))
    assert torch.equal(task.optimizee[1].running_mean, torch.zeros(8))
    assert int(task.optimizee[1].num_batches_tracked) == 0
    refused_run(tiny_recipe, NormalizedSine(options), expected, truncate=truncate)


def test_constant_buffers_are_allowed():
    """A non-persistent buffer is a constant of the architecture, read and never written: no refusal, and the
    meta-gradient is that of the same network without it."""
    options = SineOptions(points=8, query_points=8, hidden=[8])
    scaled, plain = ScaledSine(options), SineRegression(options)
    metaloss, phi, theta, batch = guard_setup(scaled, 2)
    inner = InnerConfig(lr=0.1, steps=2)
    got, _ = meta_gradient(metaloss, phi, scaled, theta, batch, inner, task_objective(scaled, TaskLossConfig()))
    want, _ = meta_gradient(metaloss, phi, plain, theta, batch, inner, task_objective(plain, TaskLossConfig()))
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("truncate", [False, True], ids=["full", "truncated"])
@pytest.mark.parametrize("n_tasks", [1, 2], ids=["one-task-path", "vmap-path"])
def test_a_theta_leaf_without_the_task_axis_is_refused(tiny_recipe, n_tasks, truncate):
    """Every leaf of θ must lead with the task axis (vmap maps it, the one-task path slices it): a leaf without it,
    or θ of another number of tasks than the batch, is refused naming the leaf, by meta_gradient and by meta_train
    at its first step."""
    task = SineRegression(SineOptions(points=8, query_points=8))
    metaloss, phi, theta, batch = guard_setup(task, n_tasks)
    inner = InnerConfig(lr=0.1, steps=2, truncate=truncate)
    objective = task_objective(task, TaskLossConfig())
    unstacked = theta | {"0.weight": theta["0.weight"][0]}
    with pytest.raises(ML3Error, match=rf"θ leaf '0.weight' has shape \[40, 1\] but the task batch holds {n_tasks} "):
        meta_gradient(metaloss, phi, task, unstacked, batch, inner, objective)
    more = task.init_theta(n_tasks + 1, generator(1))
    with pytest.raises(ML3Error, match=rf"θ leaf '0.weight' has shape \[{n_tasks + 1}, 40, 1\]"):
        meta_gradient(metaloss, phi, task, more, batch, inner, objective)
    tiny_recipe["outer"]["tasks"] = n_tasks
    unstacked_task = UnstackedSine(SineOptions(points=16, query_points=16, hidden=[8, 8]))
    refused_run(tiny_recipe, unstacked_task, "θ leaf '0.weight'.*task.init_theta", truncate=truncate)


# -- meta_train -----------------------------------------------------------------------------------------------
def train(data: dict[str, Any]):
    recipe = recipe_from_dict(data)
    return meta_train(recipe, make_task(recipe.task, recipe.task_options))


def phi_of(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.metaloss.state_dict().items()}


def test_meta_train_is_reproducible_from_its_seed(tiny_recipe):
    """Same recipe and seed → bit-identical φ and curves; another seed → a different φ."""
    tiny_recipe["outer"]["steps"] = 8
    tiny_recipe["inner"].update(steps=2, reset_every=4)
    first, second = train(tiny_recipe), train(tiny_recipe)
    a, b = phi_of(first), phi_of(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in row.items() if k != "time/seconds"} for row in first.curves]
    assert strip == [{k: v for k, v in row.items() if k != "time/seconds"} for row in second.curves]

    tiny_recipe["seed"] = 1
    c = phi_of(train(tiny_recipe))
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_meta_train_changes_phi_and_records_curves(tiny_recipe):
    """meta_train takes Adam steps on φ (φ differs from its initialisation) and records the curves at step 1,
    every log_every steps and the last step, with finite values."""
    from ml3cli.engine import build_metaloss

    tiny_recipe["outer"]["steps"] = 25
    recipe = recipe_from_dict(tiny_recipe)
    task = make_task(recipe.task, recipe.task_options)
    initial = build_metaloss(recipe, task, generator(recipe.seed)).state_dict()
    result = meta_train(recipe, task)
    final = result.metaloss.state_dict()
    assert any(not torch.equal(initial[k], final[k]) for k in initial)
    assert [row["step"] for row in result.curves] == [1, 10, 20, 25]
    for row in result.curves:
        for key in ("meta/task_loss", "meta/task_loss_before", "inner/learned_loss", "meta/grad_norm"):
            assert torch.isfinite(torch.tensor(row[key])), key


@pytest.mark.parametrize(
    ("inner", "outer_lr", "step"),
    [
        ({"lr": 1e6, "steps": 3}, 1e-3, 1),  # the inner steps explode on the very first meta-update
        ({"lr": 1e-3, "steps": 1}, 1e30, 2),  # φ explodes after the first Adam step
    ],
)
def test_divergence_raises_and_names_the_outer_step(tiny_recipe, inner, outer_lr, step):
    """A run that produces non-finite values raises DivergenceError (an ML3Error, so the CLI exits 2) whose
    message names the outer step where it happened and suggests a fix."""
    tiny_recipe["inner"] = inner
    tiny_recipe["outer"].update(lr=outer_lr, steps=10)
    with pytest.raises(DivergenceError) as info:
        train(tiny_recipe)
    assert isinstance(info.value, ML3Error)
    assert info.value.outer_step == step
    message = str(info.value)
    assert f"outer step {step}" in message
    assert "not finite" in message and "lr" in message


def test_overflowing_gradient_norm_is_divergence(tiny_recipe):
    """A meta-gradient norm of inf (inner lr 1e6) is divergence, with or without grad_clip."""
    tiny_recipe["inner"] = {"lr": 1e6, "steps": 1}
    tiny_recipe["outer"].update(steps=20, grad_clip=1.0)
    with pytest.raises(DivergenceError):
        train(tiny_recipe)


def test_the_fast_pure_forward_is_bit_identical_to_functional_call():
    """ml3cli.functional rewrites sequential MLPs as plain functions of θ/φ: same operations, same bits."""
    from torch.func import functional_call

    from ml3cli.functional import sequential_function

    task, metaloss, phi, theta, batch = smooth_setup(3)
    one = {k: v[0] for k, v in theta.items()}
    x = batch.x_support[0]
    assert torch.equal(task.predict(one, x), functional_call(task.optimizee, one, (x,)))
    inputs = task.loss_inputs(one, type(batch)(*(t[0] for t in batch)))
    assert torch.equal(metaloss.with_phi(phi)(inputs), functional_call(metaloss, phi, (), inputs))
    assert sequential_function(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())) is None


# -- the outer loop: when tasks and θ are redrawn, and what gradient Adam gets -------------------------------
class RecordingSine(SineRegression):
    """The sine family, recording every task batch and θ₀ it is asked for, with the outer step that asked."""

    def __init__(self, options=None, device="cpu"):
        super().__init__(options, device)
        self.step, self.batches, self.thetas = 0, {}, {}

    def begin_outer_step(self, step, theta, generator):
        self.step = step

    def sample_tasks(self, n, generator):
        assert self.step not in self.batches, f"tasks drawn twice in outer step {self.step}"
        self.batches[self.step] = super().sample_tasks(n, generator)
        return self.batches[self.step]

    def init_theta(self, n, generator):
        assert self.step not in self.thetas, f"θ₀ drawn twice in outer step {self.step}"
        self.thetas[self.step] = super().init_theta(n, generator)
        return self.thetas[self.step]


def recorded_run(monkeypatch, data: dict[str, Any]):
    """meta_train on a RecordingSine, with every estimator call (its θ, batch and estimate) and the metaloss
    whose parameters' ``.grad`` hold the gradient Adam applied, read after each outer step."""
    import ml3cli.engine.outer as outer

    recipe = recipe_from_dict(data)
    task = RecordingSine(SineOptions(**recipe.task_options))
    calls, applied, built = [], [], []
    real_estimator_for, real_build = outer.estimator_for, outer.build_metaloss

    class Recording:
        def __init__(self, estimator):
            self.estimator = estimator

        def estimate(self, metaloss, phi, theta, batch, gen=None, shard=None, state=None):
            estimate = self.estimator.estimate(metaloss, phi, theta, batch, gen, shard, state=state)
            calls.append((task.step, theta, batch, estimate))
            return estimate

    def build(recipe, task, gen):
        built.append(real_build(recipe, task, gen))
        return built[-1]

    def on_step(step, record):
        applied.append({name: p.grad.detach().clone() for name, p in built[0].named_parameters()})

    monkeypatch.setattr(outer, "estimator_for", lambda *args: Recording(real_estimator_for(*args)))
    monkeypatch.setattr(outer, "build_metaloss", build)
    meta_train(recipe, task, on_step=on_step)
    return task, calls, applied


def same(a, b) -> bool:
    """Two θ dicts or two task batches hold equal tensors."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("inner", "redraws"),
    [
        ({"steps": 1, "reset_every": 3}, [1, 4, 7]),
        ({"steps": 2, "reset_every": 4}, [1, 3, 5, 7]),
        ({"steps": 2}, [1, 2, 3, 4, 5, 6, 7, 8]),
    ],
    ids=["K1-reset3", "K2-reset4", "K2-every-step"],
)
def test_tasks_and_theta_are_redrawn_exactly_every_reset_every_inner_steps(monkeypatch, tiny_recipe, inner, redraws):
    """New tasks AND a new θ₀ at the outer steps where θ has taken reset_every inner steps, never in between;
    in between, the outer step continues from the θ the previous one reached, on the same tasks."""
    tiny_recipe["outer"]["steps"] = 8
    tiny_recipe["inner"].update(inner)
    task, calls, _ = recorded_run(monkeypatch, tiny_recipe)
    assert sorted(task.batches) == sorted(task.thetas) == redraws
    assert [step for step, *_ in calls] == list(range(1, 9))
    for (step, theta, batch, _), (_, _, previous_batch, previous) in zip(calls, [(None,) * 4, *calls], strict=False):
        if step in redraws:
            assert same(batch, task.batches[step]) and same(theta, task.thetas[step]), step
            if step > 1:
                assert not same(batch, previous_batch), f"outer step {step} kept the old tasks"
                assert not same(theta, previous.theta), f"outer step {step} kept the old θ"
        else:
            assert batch is previous_batch, f"outer step {step} drew other tasks"
            assert same(theta, previous.theta), f"outer step {step} did not continue from θ_K"


def test_the_applied_meta_gradient_is_clipped_to_grad_clip(monkeypatch, tiny_recipe):
    """Adam gets the meta-gradient scaled down to norm grad_clip where it is longer (direction kept), as it is
    where it is not (the clip sits between the two: some steps of this run are clipped, some not)."""
    clip = 1.5e-3  # the norms of this run are 0.0008 … 0.0035
    tiny_recipe["outer"].update(steps=12, grad_clip=clip)
    _, calls, applied = recorded_run(monkeypatch, tiny_recipe)

    def norm(gradient) -> float:
        return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in gradient.values()])))

    clipped = 0
    for (step, _, _, estimate), gradient in zip(calls, applied, strict=True):
        raw = norm(estimate.gradient)
        assert norm(gradient) <= clip * (1 + 1e-6), f"outer step {step}: Adam got norm {norm(gradient):.4g} > {clip}"
        factor = clip / raw if raw > clip else 1.0
        for name, g in gradient.items():
            torch.testing.assert_close(g, estimate.gradient[name] * factor, rtol=1e-6, atol=1e-12, msg=name)
        clipped += raw > clip
    assert 0 < clipped < len(calls), f"{clipped} of {len(calls)} steps clipped: choose a clip between the norms"


class CollectingSine(SineRegression):
    """A sine family that "collects" its data: the inner steps get the support points with the query points NaN,
    the task loss the query points with the support points NaN, so data handed to the wrong side turns NaN."""

    collects_data = True

    def __init__(self, options=None, device="cpu"):
        super().__init__(options, device)
        self.purposes: list[str] = []

    def collect(self, theta, batch, generator, purpose):
        self.purposes.append(purpose)
        hidden = {"inner": ("x_query", "y_query"), "task_loss": ("x_support", "y_support")}[purpose]
        return batch._replace(**{f: torch.full_like(getattr(batch, f), float("nan")) for f in hidden})


@pytest.mark.parametrize("inner", [{"steps": 2}, {"steps": 2, "task_loss_at": "every"}], ids=["last", "every"])
def test_collected_inner_data_reach_only_the_inner_steps_and_task_loss_data_only_l_t(tiny_recipe, inner):
    """For a task that gathers data with the current θ, meta-training and meta-test hand the inner steps only the
    data collected for them, and L_T (and the meta-test metric) only the data collected for it."""
    from ml3cli.evaluate import train_curve

    tiny_recipe["outer"].update(steps=3, tasks=2)
    tiny_recipe["inner"].update(inner)
    tiny_recipe["log_every"] = 1
    recipe = recipe_from_dict(tiny_recipe)
    task = CollectingSine(SineOptions(**recipe.task_options))
    result = meta_train(recipe, task)  # data on the wrong side: a NaN L_T or meta-gradient, a DivergenceError
    assert all(torch.isfinite(torch.tensor(list(row.values()))).all() for row in result.curves)
    assert {"inner", "task_loss"} == set(task.purposes)

    gen = generator(0)
    batch, theta = task.sample_tasks(2, gen), task.init_theta(2, gen)
    curve, _ = train_curve(task, result.metaloss.as_loss_fn(), theta, batch, 1e-2, 3, gen=gen)
    assert curve.shape == (4, 2) and torch.isfinite(curve).all()
