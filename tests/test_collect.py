"""Tasks that gather data with the current θ (``Task.collect``, for rollouts of a simulator) and tasks that keep
state between outer steps (``Task.begin_outer_step``/``state_tensors``, for a refitted dynamics model).

Toy versions of both on the sine task: ``FreshPointsSine`` draws new training and query points from the engine's
generator at every use; ``DriftingSine`` keeps a tensor that changes every outer step and scales the targets.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TINY_RECIPE
from torch.func import vmap

from ml3cli.checkpoints import MetaTrainState, batch_type_of, load_checkpoint, save_checkpoint, validate_state
from ml3cli.engine import learned_loss_fn, meta_gradient, meta_train, sgd_step_autograd, task_objective
from ml3cli.errors import ML3Error
from ml3cli.evaluate import NamedLoss, evaluate, train_curve
from ml3cli.metaloss import MetaLoss, mse
from ml3cli.recipes import InnerConfig, TaskLossConfig, recipe_from_dict, recipe_to_dict
from ml3cli.runtime import generator
from ml3cli.tasks.sine import SineBatch, SineOptions, SineRegression

OPTIONS = SineOptions(points=12, query_points=12, hidden=[8], activation="tanh")


class FreshPointsSine(SineRegression):
    """Every inner step and every task loss sees freshly drawn x (from the engine's generator)."""

    collects_data = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.purposes: list[str] = []

    def collect(self, theta, batch: SineBatch, generator: torch.Generator, purpose: str) -> SineBatch:
        self.purposes.append(purpose)
        n = batch.amplitude.shape[0]
        x = -2 + 4 * torch.rand(n, self.options.points, 1, generator=generator)
        y = batch.amplitude[:, None, None] * torch.sin(x - batch.phase[:, None, None])
        if purpose == "inner":
            return batch._replace(x_support=x, y_support=y)
        return batch._replace(x_query=x, y_query=y)


class SameDataSine(SineRegression):
    """Collects, but returns the tasks unchanged: must give exactly the non-collecting meta-gradient."""

    collects_data = True


class DriftingSine(FreshPointsSine):
    """Keeps a scale that grows every outer step (drawing from the generator) and multiplies the targets."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = torch.ones(())

    def begin_outer_step(self, step, theta, generator):
        self.scale = self.scale + 0.01 * torch.rand((), generator=generator)

    def state_tensors(self):
        return {"scale": self.scale}

    def load_state_tensors(self, tensors):
        if set(tensors) != {"scale"}:
            raise ValueError(f"expected the tensor 'scale', got {sorted(tensors)}")
        self.scale = tensors["scale"].clone()

    def task_loss(self, theta, task):
        return mse(self.predict(theta, task.x_query), self.scale * task.y_query)


def setup(task_cls, n_tasks=2, seed=0):
    torch.manual_seed(seed)
    task = task_cls(OPTIONS)
    metaloss = MetaLoss(task.loss_inputs_spec, hidden=(8,), activation="tanh")
    gen = generator(seed)
    batch = task.sample_tasks(n_tasks, gen)
    theta = task.init_theta(n_tasks, gen)
    phi = {name: p.detach().clone() for name, p in metaloss.named_parameters()}
    return task, metaloss, phi, theta, batch


def post_update_loss(task, metaloss, phi, theta, batch, inner, state):
    gen = torch.Generator()
    gen.set_state(state)
    objective = task_objective(task, TaskLossConfig())
    _, seen = meta_gradient(metaloss, phi, task, theta, batch, inner, objective, diagnostics=False, gen=gen)
    return float(seen.task_loss.mean())


@pytest.mark.parametrize("task_loss_at", ["last", "every"])
@pytest.mark.parametrize("n_tasks", [1, 3])
def test_collecting_meta_gradient_matches_finite_differences(float64, n_tasks, task_loss_at):
    """With data drawn between inner steps, ∇_φ is still the derivative of the post-update task loss (same draws)."""
    task, metaloss, phi, theta, batch = setup(FreshPointsSine, n_tasks)
    inner = InnerConfig(lr=0.3, steps=3, task_loss_at=task_loss_at)
    state = generator(7).get_state()
    gen = torch.Generator()
    gen.set_state(state)
    gradient, _ = meta_gradient(
        metaloss, phi, task, theta, batch, inner, task_objective(task, TaskLossConfig()), diagnostics=False, gen=gen
    )
    expected = ["inner", "task_loss"] * 3 if task_loss_at == "every" else ["inner", "inner", "inner", "task_loss"]
    assert task.purposes == expected
    direction = {k: torch.randn(v.shape, generator=generator(1), dtype=v.dtype) for k, v in phi.items()}
    eps = 1e-6
    plus = post_update_loss(task, metaloss, {k: phi[k] + eps * direction[k] for k in phi}, theta, batch, inner, state)
    minus = post_update_loss(task, metaloss, {k: phi[k] - eps * direction[k] for k in phi}, theta, batch, inner, state)
    numeric = (plus - minus) / (2 * eps)
    analytic = float(sum((gradient[k] * direction[k]).sum() for k in phi))
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("task_loss_at", ["last", "every"])
def test_collecting_the_same_data_equals_the_plain_path(float64, task_loss_at):
    task, metaloss, phi, theta, batch = setup(SameDataSine, 3)
    plain = SineRegression(OPTIONS)
    inner = InnerConfig(lr=0.3, steps=2, task_loss_at=task_loss_at)
    objective = task_objective(plain, TaskLossConfig())
    got, seen = meta_gradient(metaloss, phi, task, theta, batch, inner, objective, gen=generator(0))
    want, reference = meta_gradient(metaloss, phi, plain, theta, batch, inner, objective)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(seen.task_loss, reference.task_loss)
    torch.testing.assert_close(seen.learned_loss, reference.learned_loss)


def test_task_loss_every_step_is_the_mean_over_inner_steps(float64):
    """L_T with ``every`` = mean over k of L_T(θ_k); for one inner step it equals ``last``."""
    task, metaloss, phi, theta, batch = setup(SineRegression, 2)
    objective = task_objective(task, TaskLossConfig())
    one_last = meta_gradient(metaloss, phi, task, theta, batch, InnerConfig(lr=0.3, steps=1), objective)[0]
    one_every = meta_gradient(
        metaloss, phi, task, theta, batch, InnerConfig(lr=0.3, steps=1, task_loss_at="every"), objective
    )[0]
    for k in one_last:
        torch.testing.assert_close(one_every[k], one_last[k])
    losses = [
        meta_gradient(metaloss, phi, task, theta, batch, InnerConfig(lr=0.3, steps=s), objective)[1].task_loss
        for s in (1, 2, 3)
    ]
    _, every = meta_gradient(
        metaloss, phi, task, theta, batch, InnerConfig(lr=0.3, steps=3, task_loss_at="every"), objective
    )
    torch.testing.assert_close(every.task_loss, torch.stack(losses).mean(0))


def test_meta_test_collects_before_every_step_and_pairs_the_randomness():
    task = FreshPointsSine(OPTIONS)
    gen = generator(0)
    batch = task.sample_tasks(2, gen)
    theta = task.init_theta(2, gen)
    loss = lambda inputs: mse(**inputs)  # noqa: E731
    train_curve(task, loss, theta, batch, 0.1, 2, gen=generator(3))
    assert task.purposes == ["task_loss", "inner", "task_loss", "inner", "task_loss"]
    with pytest.raises(ValueError, match="needs a generator"):
        train_curve(task, loss, theta, batch, 0.1, 2)
    # two copies of one loss under different labels: identical curves, because each loss sees the same draws
    a, b = evaluate(task, [NamedLoss("a", loss, 0.1), NamedLoss("b", loss, 0.1)], tasks=2, seeds=2, steps=3)
    assert (a.values == b.values).all()
    assert not (a.values[:, :, 0] == a.values[:, :, 1]).all()  # the data (hence the metric) changes between steps


def drifting_recipe(steps: int):
    data = copy.deepcopy(TINY_RECIPE)
    data["outer"]["steps"] = steps
    data["inner"]["steps"] = 2
    data["log_every"] = 2
    return recipe_from_dict(data)


def test_stateful_collecting_task_resumes_bit_for_bit(tmp_path):
    """Task state and the collection randomness survive a checkpoint file: φ after 6 steps equals the
    uninterrupted run's exactly, and so does the task's state."""
    recipe = drifting_recipe(6)
    full_task = DriftingSine(OPTIONS)
    full = meta_train(recipe, full_task)
    assert full_task.scale > 1

    task = DriftingSine(OPTIONS)
    path = tmp_path / "stop.checkpoint.safetensors"

    class Stop(Exception):
        pass

    def on_state(step, snapshot):
        if step == 3:
            save_checkpoint(path, snapshot(), recipe_to_dict(recipe), tmp_path / "a.safetensors")
            raise Stop

    with pytest.raises(Stop):
        meta_train(recipe, task, on_state=on_state)
    loaded = load_checkpoint(path, batch_type_of(task))
    assert set(loaded.state.task_state) == {"scale"}
    fresh = DriftingSine(OPTIONS)
    validate_state(loaded, recipe, fresh)
    resumed = meta_train(recipe, fresh, resume=loaded.state)
    for name, value in full.metaloss.state_dict().items():
        assert torch.equal(value, resumed.metaloss.state_dict()[name]), name
    assert torch.equal(full_task.scale, fresh.scale)


def test_a_task_without_state_refuses_a_checkpoint_with_state(tmp_path):
    recipe = drifting_recipe(2)
    states: list[MetaTrainState] = []
    meta_train(recipe, DriftingSine(OPTIONS), on_state=lambda s, snap: states.append(snap()) if s == 1 else None)
    path = save_checkpoint(tmp_path / "c.safetensors", states[0], recipe_to_dict(recipe), tmp_path / "a.safetensors")
    loaded = load_checkpoint(path, batch_type_of(SineRegression(OPTIONS)))
    with pytest.raises(ML3Error, match="task state"):
        validate_state(loaded, recipe, SineRegression(OPTIONS))


def graph_keeping_truncation(metaloss, phi, task, theta, batch, inner, objective):
    """The truncated meta-gradient the memory-hungry way: every inner step takes its gradient at a detached θ and
    keeps its graph, and one reverse pass goes through all of them."""
    leaf = {k: v.detach().requires_grad_() for k, v in phi.items()}
    loss_fn = learned_loss_fn(metaloss, leaf)
    every = inner.task_loss_at == "every"
    theta_k, total = theta, 0.0
    for k in range(inner.steps):
        theta_k = sgd_step_autograd(task, loss_fn, theta_k, batch, inner.lr, truncate=True, batched=True)
        if every or k == inner.steps - 1:
            total = total + vmap(objective)(theta_k, batch)
    after = total / inner.steps if every else total
    grads = torch.autograd.grad(after.mean(), list(leaf.values()))
    return dict(zip(leaf, grads, strict=True)), after.detach(), {k: v.detach() for k, v in theta_k.items()}


@pytest.mark.parametrize("task_loss_at", ["last", "every"])
@pytest.mark.parametrize("n_tasks", [1, 3])
def test_memory_light_truncation_equals_the_graph_keeping_one(float64, n_tasks, task_loss_at):
    """``truncate`` rebuilds one inner step's graph at a time (TruncatedBackprop); it must agree with keeping the
    graph of every detached-gradient inner step, and differ from the full meta-gradient."""
    task, metaloss, phi, theta, batch = setup(SineRegression, n_tasks)
    inner = InnerConfig(lr=0.3, steps=4, truncate=True, task_loss_at=task_loss_at)
    objective = task_objective(task, TaskLossConfig(extra={}))
    kept, kept_loss, kept_theta = graph_keeping_truncation(metaloss, phi, task, theta, batch, inner, objective)
    light, light_seen = meta_gradient(metaloss, phi, task, theta, batch, inner, objective)
    for k in kept:
        torch.testing.assert_close(light[k], kept[k], rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(light_seen.task_loss, kept_loss)
    for k in kept_theta:
        torch.testing.assert_close(light_seen.theta[k], kept_theta[k])
    full, _ = meta_gradient(metaloss, phi, task, theta, batch, inner.model_copy(update={"truncate": False}), objective)
    assert any(not torch.allclose(full[k], light[k]) for k in full)


def test_truncation_is_refused_for_a_task_that_collects_data():
    """Truncation replays the inner steps on fixed data, which a task that collects new data between inner steps
    does not have: meta_gradient and meta_train refuse it naming the field and the fix, before any rollout or
    outer step (instead of silently computing the full meta-gradient)."""
    task, metaloss, phi, theta, batch = setup(FreshPointsSine, 2)
    inner = InnerConfig(lr=0.3, steps=2, truncate=True)
    objective = task_objective(task, TaskLossConfig())
    with pytest.raises(ML3Error, match=r"^inner\.truncate: true cannot be used with task 'sine', which collects .*"
                       r"set inner\.truncate: false"):  # fmt: skip
        meta_gradient(metaloss, phi, task, theta, batch, inner, objective, gen=generator(0))
    assert task.purposes == []
    recipe = drifting_recipe(3).model_copy(update={"inner": inner})
    steps = []
    with pytest.raises(ML3Error, match="inner.truncate"):
        meta_train(recipe, task, on_step=lambda step, record: steps.append(step))
    assert steps == [] and task.purposes == []


def test_no_recipe_truncates_a_task_that_collects_data():
    from ml3cli.recipes import load_recipe, packaged_recipes
    from ml3cli.tasks import task_class

    paths = sorted(packaged_recipes().values())
    assert paths
    for path in paths:
        recipe = load_recipe(path)
        assert not (recipe.inner.truncate and task_class(recipe.task).collects_data), path.name


def logged_phi(task_cls, log_every: int):
    data = copy.deepcopy(TINY_RECIPE)
    data["outer"].update(steps=5, tasks=2)
    data["inner"]["steps"] = 2
    data["log_every"] = log_every
    result = meta_train(recipe_from_dict(data), task_cls(OPTIONS))
    return result.metaloss.state_dict(), result.curves


def test_diagnostics_do_not_change_phi_of_a_task_that_collects_data():
    """The curves' L_T and M_φ at θ₀ need rollouts of their own; they come from a generator of the seed and the
    outer step, not from the training generator, so logging every step or only at the first and last gives
    bit-identical φ, and the rows both runs log are identical."""
    every_step, often = logged_phi(FreshPointsSine, 1)
    rarely, seldom = logged_phi(FreshPointsSine, 1000)
    for name, value in every_step.items():
        assert torch.equal(value, rarely[name]), name
    assert [row["step"] for row in often] == [1, 2, 3, 4, 5] and [row["step"] for row in seldom] == [1, 5]
    strip = lambda row: {k: v for k, v in row.items() if k != "time/seconds"}  # noqa: E731
    assert [strip(often[0]), strip(often[-1])] == [strip(row) for row in seldom]


def test_diagnostics_leave_the_gradient_and_the_generator_alone():
    """meta_gradient with and without diagnostics: the same meta-gradient, and ``gen`` drawn exactly as far."""
    task, metaloss, phi, theta, batch = setup(FreshPointsSine, 2)
    inner, objective = InnerConfig(lr=0.3, steps=2), task_objective(task, TaskLossConfig())
    gens = generator(4), generator(4)
    with_diagnostics, seen = meta_gradient(metaloss, phi, task, theta, batch, inner, objective, gen=gens[0])
    without, _ = meta_gradient(metaloss, phi, task, theta, batch, inner, objective, diagnostics=False, gen=gens[1])
    for k in without:
        assert torch.equal(with_diagnostics[k], without[k]), k
    assert torch.equal(gens[0].get_state(), gens[1].get_state())
    assert seen.task_loss_before.shape == seen.learned_loss.shape == (2,)
