"""The task contract, checked for every registered task family (a new task gets these checks for free).

Tiny options (few points, small hidden layers) are used where the task family has those options.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import vmap

from ml3cli.engine import meta_gradient, task_objective
from ml3cli.errors import ML3Error
from ml3cli.metaloss import MetaLoss, flatten_inputs
from ml3cli.recipes import InnerConfig, TaskLossConfig
from ml3cli.runtime import generator
from ml3cli.tasks import TASKS, make_task, task_class
from ml3cli.tasks.base import Task

N = 3
SMALL = {"points": 16, "query_points": 16, "hidden": [8, 8], "start_noise": 0.05}  # start_noise: mountain_car


def tiny_task(name: str) -> Task:
    fields = TASKS[name].Options.model_fields
    return make_task(name, {k: v for k, v in SMALL.items() if k in fields})


def one(batch, i: int):
    """Task ``i`` of a batch, without its leading axis (what the engine sees inside vmap)."""
    return type(batch)(*(t[i] for t in batch))


def theta_one(theta, i: int):
    return {k: v[i] for k, v in theta.items()}


@pytest.fixture(params=sorted(TASKS))
def task(request) -> Task:
    return tiny_task(request.param)


def test_registry_names_match_classes():
    """TASKS maps each task's own name to its class, and unknown names are a user error listing known ones."""
    for name, cls in TASKS.items():
        assert cls.name == name
        assert task_class(name) is cls
    with pytest.raises(ML3Error, match="unknown task 'nope'.*known tasks"):
        task_class("nope")


def test_class_attributes(task):
    """Every task declares a summary, options, a non-empty loss-input spec, a metric and builtin losses."""
    assert task.summary and task.metric
    names = task.input_names()
    assert names and len(set(names)) == len(names)
    assert all(item.size > 0 for item in task.loss_inputs_spec)
    assert task.builtin_losses, "the first builtin loss is the baseline; there must be one"


def test_sample_tasks_shapes_and_determinism(task):
    """sample_tasks(n, gen) gives a tuple of tensors, each with leading axis n; the same seed gives the same
    tasks, another seed different ones."""
    batch = task.sample_tasks(N, generator(5))
    assert isinstance(batch, tuple) and len(batch) > 0
    for t in batch:
        assert isinstance(t, torch.Tensor)
        assert t.shape[0] == N
        assert torch.isfinite(t).all()
    again = task.sample_tasks(N, generator(5))
    assert all(torch.equal(a, b) for a, b in zip(batch, again, strict=True))
    other = task.sample_tasks(N, generator(6))
    assert any(not torch.equal(a, b) for a, b in zip(batch, other, strict=True))


def test_init_theta_is_stacked_and_deterministic(task):
    """init_theta(n, gen) has the optimizee's parameter names, each stacked on a leading axis of n, and is a
    function of the generator's state."""
    theta = task.init_theta(N, generator(7))
    params = dict(task.optimizee.named_parameters())
    assert theta.keys() == params.keys()
    for k, v in theta.items():
        assert v.shape == (N, *params[k].shape), k
        assert torch.isfinite(v).all()
    again = task.init_theta(N, generator(7))
    assert all(torch.equal(theta[k], again[k]) for k in theta)


def test_loss_inputs_match_the_spec(task):
    """loss_inputs(θ, task) returns exactly the names of loss_inputs_spec, each reshapeable to
    [samples, size] with the same number of samples, and the meta-loss accepts them by name."""
    batch, theta = task.sample_tasks(N, generator(0)), task.init_theta(N, generator(1))
    inputs = task.loss_inputs(theta_one(theta, 0), one(batch, 0))
    assert list(inputs) == list(task.input_names())
    flat = flatten_inputs(task.loss_inputs_spec, (), inputs)
    assert flat.ndim == 2 and flat.shape[1] == sum(i.size for i in task.loss_inputs_spec)
    assert torch.isfinite(flat).all()
    value = MetaLoss(task.loss_inputs_spec, hidden=(8, 8))(**inputs)
    assert value.ndim == 0 and torch.isfinite(value)


def test_task_loss_and_builtin_losses_are_finite_scalars(task):
    """task_loss is a finite non-negative scalar; each builtin loss over the loss inputs is a finite scalar;
    both work under vmap over the task axis and agree with a loop."""
    batch, theta = task.sample_tasks(N, generator(0)), task.init_theta(N, generator(1))
    looped = []
    for i in range(N):
        loss = task.task_loss(theta_one(theta, i), one(batch, i))
        assert loss.ndim == 0 and torch.isfinite(loss) and loss >= 0
        looped.append(loss)
        inputs = task.loss_inputs(theta_one(theta, i), one(batch, i))
        for name, fn in task.builtin_losses.items():
            value = fn(**inputs)
            assert value.ndim == 0 and torch.isfinite(value), name
    batched = vmap(task.task_loss)(theta, batch)
    torch.testing.assert_close(batched, torch.stack(looped))


def test_extra_terms_are_finite_scalars(task):
    """Every declared extra (shaping) term is a finite scalar; an undeclared one is a KeyError."""
    batch, theta = task.sample_tasks(N, generator(0)), task.init_theta(N, generator(1))
    for name in task.extra_term_names:
        value = task.extra_term(name, theta_one(theta, 0), one(batch, 0))
        assert value.ndim == 0 and torch.isfinite(value), name
    with pytest.raises(KeyError):
        task.extra_term("no_such_term", theta_one(theta, 0), one(batch, 0))


def test_meta_gradient_is_non_zero(task):
    """Through this task, the meta-gradient of the task loss after one inner step is finite and non-zero."""
    metaloss = MetaLoss(task.loss_inputs_spec, hidden=(8, 8))
    phi = {k: p.detach() for k, p in metaloss.named_parameters()}
    batch, theta = task.sample_tasks(N, generator(0)), task.init_theta(N, generator(1))
    objective, inner = task_objective(task, TaskLossConfig()), InnerConfig(lr=1e-2, steps=1)
    # tasks that collect data (simulator rollouts) draw from gen; the others ignore it
    gradient, seen = meta_gradient(metaloss, phi, task, theta, batch, inner, objective, gen=generator(2))
    assert all(torch.isfinite(g).all() for g in gradient.values())
    assert sum(float(g.abs().sum()) for g in gradient.values()) > 0
    assert seen.task_loss.shape == (N,)


def test_unknown_task_option_is_refused():
    """Task options are validated: an unknown key is an ML3Error naming `task_options.<key>`."""
    for name in TASKS:
        with pytest.raises(ML3Error, match=r"task_options\.foo"):
            make_task(name, {"foo": 1})


def test_shipped_catalog_matches_the_task_classes():
    """`ml3 tasks` lists the shipped catalog without importing any task: it must say what the classes say."""
    from ml3cli.tasks import catalog_from_classes, read_catalog

    assert read_catalog() == catalog_from_classes(), "the catalog is stale: regenerate with python -m ml3cli.tasks"


def test_test_tasks_are_never_meta_train_or_validation_tasks(task):
    """Meta-train, validation and test draws come from separate random streams: over 3 run seeds, no task of a
    test batch equals a task of a meta-train or validation batch. (A family that draws from a short fixed list of
    targets is split by its options instead: reacher_demos' TRAIN_GOALS / TEST_GOALS.)"""
    from ml3cli.runtime import stream_seed

    def tasks_of(purpose: str) -> list[bytes]:
        keys = []
        for seed in range(3):
            batch = task.sample_tasks(N, generator(stream_seed(purpose, seed)))
            for i in range(N):
                keys.append(b"|".join(t[i].detach().cpu().contiguous().numpy().tobytes() for t in batch))
        return keys

    if task.name == "reacher_demos":  # its targets come from a short list: meta-train and test lists are disjoint
        from ml3cli.tasks.reacher_demos import TEST_GOALS, TRAIN_GOALS

        assert not set(map(tuple, TRAIN_GOALS)) & set(map(tuple, TEST_GOALS))
        return
    meta_train = tasks_of("meta_train")
    seen = set(meta_train) | set(tasks_of("validation"))
    assert not seen & set(tasks_of("test"))


# -- support and query: the inner steps never see the data L_T is measured on ---------------------------------
#: per supervised family, (options small enough to build at once, the support fields the inner steps train on,
#: the query fields the task loss is measured on). Fields in neither are task parameters (amplitude, ν, digits).
_SINE = ("x_support", "y_support"), ("x_query", "y_query")
_DIGITS = ("x_train", "y_train"), ("x_test", "y_test")
_JOINTS = ("q", "qd", "qdd", "u"), ("q_query", "qd_query", "qdd_query", "u_query", "inertia_query")
_ROBOT = {"trajectories": 2, "held_out_trajectories": 1, "samples": 20, "points": 8, "query_points": 8, "hidden": [8]}
SUPERVISED = {
    "sine": ({"points": 8, "query_points": 8, "hidden": [8]}, *_SINE),
    "sine_shifted": ({"points": 8, "query_points": 8, "hidden": [8]}, *_SINE),
    "sine_frequency": ({"points": 8, "query_points": 8}, *_SINE),
    "mnist_binary": ({"images": 8, "test_images": 8, "architecture": "mlp", "hidden": [8]}, *_DIGITS),
    "mnist": ({"images": 20, "test_images": 20, "architecture": "mlp", "hidden": [8]}, *_DIGITS),
    "inverse_dynamics_reacher": (_ROBOT, *_JOINTS),
    "inverse_dynamics_sawyer": (_ROBOT, *_JOINTS),
}
#: families without a support/query split of fixed data, and why
WITHOUT_SPLIT = {
    "mountain_car": "no data: every loss input and the task loss are rollouts of π_θ from the task's start",
}


def test_every_family_is_checked_for_a_support_query_split():
    """A new family is either supervised (its split is declared above) or gathers its data with the current θ, and
    then the engine keeps the inner and task-loss data apart (tests/test_engine.py)."""
    collecting = {name for name in TASKS if TASKS[name].collects_data}
    assert set(TASKS) == set(SUPERVISED) | set(WITHOUT_SPLIT) | collecting
    assert not collecting & set(SUPERVISED)


def poisoned(batch, fields: tuple[str, ...]):
    """``batch`` with every value of ``fields`` NaN: anything computed from them is NaN, even times zero."""
    return batch._replace(**{f: torch.full_like(getattr(batch, f), math.nan) for f in fields})


@pytest.mark.parametrize("name", sorted(SUPERVISED))
def test_inner_steps_see_only_support_data_and_the_task_loss_only_query_data(name):
    """Poisoning the query data leaves the loss inputs (what M_φ and the inner steps see) exactly as they were,
    and poisoning the support data leaves the task loss exactly as it was; each does read its own side."""
    options, support, query = SUPERVISED[name]
    task = make_task(name, options)
    batch, theta = task.sample_tasks(N, generator(0)), task.init_theta(N, generator(1))
    assert set(support) | set(query) <= set(batch._fields)
    for i in range(N):
        clean, th = one(batch, i), theta_one(theta, i)
        inputs, loss = task.loss_inputs(th, clean), task.task_loss(th, clean)
        assert all(torch.isfinite(v).all() for v in inputs.values()) and torch.isfinite(loss)

        without_query = task.loss_inputs(th, poisoned(clean, query))
        assert all(torch.equal(without_query[k], inputs[k]) for k in inputs), f"the inner steps read {query}"
        assert torch.equal(task.task_loss(th, poisoned(clean, support)), loss), f"the task loss reads {support}"

        assert not all(torch.isfinite(v).all() for v in task.loss_inputs(th, poisoned(clean, support)).values())
        assert not torch.isfinite(task.task_loss(th, poisoned(clean, query)))


@pytest.mark.parametrize("name", sorted(SUPERVISED))
def test_no_query_sample_is_also_a_support_sample(name):
    """The held-out points are other points: no query sample (an x, an image, a joint state) is among the
    support samples of its task."""
    options, support, query = SUPERVISED[name]
    task = make_task(name, options)
    batch = task.sample_tasks(N, generator(0))
    for i in range(N):
        rows = getattr(batch, support[0])[i].flatten(1)
        held_out = getattr(batch, query[0])[i].flatten(1)
        repeated = int((held_out[:, None, :] == rows[None, :, :]).all(-1).any(1).sum())
        assert repeated == 0, f"task {i}: {repeated} of its {len(held_out)} {query[0]} rows are {support[0]} rows"


# -- the sine families against their data sheet (ml3cli/tasks/sine.py) -----------------------------------------
def test_shifted_sines_follow_the_data_sheet():
    """y = A·sin(x − ω) at every support and query point, with x, A and ω inside the ranges of the options."""
    task = make_task("sine_shifted", {"points": 16, "query_points": 8, "x_range": [-1.0, 3.0], "hidden": [8]})
    batch = task.sample_tasks(64, generator(0))
    amplitude, phase = batch.amplitude[:, None, None], batch.phase[:, None, None]
    for x, y in ((batch.x_support, batch.y_support), (batch.x_query, batch.y_query)):
        assert ((-1.0 <= x) & (x <= 3.0)).all() and x.min() < 0.0 < 2.0 < x.max()
        torch.testing.assert_close(y, amplitude * torch.sin(x - phase))
    assert ((0.2 <= batch.amplitude) & (batch.amplitude <= 5.0)).all() and batch.amplitude.max() > 4.0
    assert ((-math.pi <= batch.phase) & (batch.phase <= math.pi)).all() and batch.phase.min() < -2.0


def test_the_meta_train_sine_is_one_fixed_curve():
    """``sine``: A = 1 and ω = π for every task, so y = sin(x − π) = −sin(x)."""
    batch = make_task("sine", {"points": 8, "query_points": 8, "hidden": [8]}).sample_tasks(4, generator(0))
    assert (batch.amplitude == 1.0).all() and (batch.phase == math.pi).all()
    torch.testing.assert_close(batch.y_support, -torch.sin(batch.x_support))


def test_sine_ranges_must_be_ordered():
    """A range is [low, high] with low <= high: a single value is allowed, a reversed range is refused."""
    from pydantic import ValidationError

    from ml3cli.tasks.sine import SineOptions

    assert SineOptions(amplitude_range=(2.0, 2.0)).amplitude_range == (2.0, 2.0)
    with pytest.raises(ValidationError, match=r"expected \[low, high\] with low <= high, got \[3.0, 2.0\]"):
        SineOptions(phase_range=(3.0, 2.0))


def test_sine_tasks_are_drawn_onto_the_tasks_device():
    """The tasks are drawn on the CPU (the same numbers on any device) and moved to the task's device."""
    from ml3cli.tasks.sine import ShiftedSineOptions, ShiftedSineRegression

    task = ShiftedSineRegression(ShiftedSineOptions(points=4, query_points=4, hidden=[4]), device="meta")
    assert all(t.device.type == "meta" for t in task.sample_tasks(2, generator(0)))
