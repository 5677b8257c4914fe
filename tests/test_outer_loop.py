"""The outer loop's own duties (:func:`ml3cli.engine.meta_train`), beyond the meta-gradient: which check names a
divergence, what the clocks record, what the callbacks and the task are handed, which stream the diagnostics draw
from, and sharding: several processes, each differentiating its share of the tasks, must meta-train exactly like
one. The processes are simulated by threads that exchange tensors in memory (:class:`ThreadShard`), so the sharded
code paths run in this process, without torchrun (tests/test_distributed.py runs the real thing)."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import pytest
import torch
from helpers import TINY_RECIPE
from test_collect import OPTIONS, FreshPointsSine
from torch.utils._pytree import tree_map

import ml3cli.engine.outer as outer
from ml3cli.distributed import Shard
from ml3cli.engine import meta_train
from ml3cli.engine.data import share
from ml3cli.engine.diagnostics import diagnostics_generator
from ml3cli.errors import DivergenceError
from ml3cli.recipes import recipe_from_dict
from ml3cli.tasks.sine import SineRegression


def tiny(outer_steps: int = 4, **inner: Any):
    """The tiny sine recipe with 4 tasks per outer step, logging every 2 steps, ``inner`` settings changed."""
    data = {**TINY_RECIPE, "outer": {**TINY_RECIPE["outer"], "steps": outer_steps, "tasks": 4}, "log_every": 2}
    data["inner"] = {**TINY_RECIPE["inner"], **inner}
    return recipe_from_dict(data)


def phi_of(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.metaloss.state_dict().items()}


# -- divergence: each check names its outer step and what diverged --------------------------------------------------
def poison_estimate(monkeypatch, at_step: int, change) -> None:
    """The estimator's result at outer step ``at_step`` changed by ``change(estimate)``."""
    real = outer.estimator_for
    calls = {"n": 0}

    def estimator_for(*args, **kwargs):
        estimator = real(*args, **kwargs)
        estimate = estimator.estimate

        def poisoned(*a, **k):
            calls["n"] += 1
            found = estimate(*a, **k)
            return change(found) if calls["n"] == at_step else found

        return _Wrapped(estimator, poisoned)

    monkeypatch.setattr(outer, "estimator_for", estimator_for)


class _Wrapped:
    """An estimator whose ``estimate`` is replaced (the rest delegated)."""

    def __init__(self, estimator, estimate):
        self._estimator, self.estimate = estimator, estimate

    def __getattr__(self, name):
        return getattr(self._estimator, name)


def nan_like(tree):
    return tree_map(lambda t: torch.full_like(t, float("nan")) if t.is_floating_point() else t, tree)


@pytest.mark.parametrize(
    ("what", "change"),
    [
        ("the task loss", lambda e: dataclasses.replace(e, task_loss=nan_like(e.task_loss))),
        ("the meta-gradient", lambda e: dataclasses.replace(e, gradient=nan_like(e.gradient))),
        ("θ after the inner steps", lambda e: dataclasses.replace(e, theta=nan_like(e.theta))),
        # every value finite, their norm not: 3e38 is near float32's largest number
        ("the meta-gradient's norm", lambda e: dataclasses.replace(
            e, gradient={k: torch.full_like(g, 3e38) for k, g in e.gradient.items()})),
    ],
)  # fmt: skip
def test_each_divergence_check_names_the_outer_step_and_what_diverged(monkeypatch, what, change):
    poison_estimate(monkeypatch, 3, change)
    with pytest.raises(DivergenceError) as info:
        meta_train(tiny(), SineRegression(OPTIONS))
    assert (info.value.outer_step, info.value.what) == (3, what)
    assert f"meta-training diverged at outer step 3: {what} is not finite" in str(info.value)


def test_a_non_finite_phi_after_the_adam_step_is_divergence_named_so(monkeypatch):
    step = outer.OuterOptimizer.step
    calls = {"n": 0}

    def poisoned(self, metaloss, gradient):
        step(self, metaloss, gradient)
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                next(metaloss.parameters())[0] = float("inf")

    monkeypatch.setattr(outer.OuterOptimizer, "step", poisoned)
    with pytest.raises(DivergenceError) as info:
        meta_train(tiny(), SineRegression(OPTIONS))
    assert (info.value.outer_step, info.value.what) == (2, "φ after the Adam step")


# -- clocks, callbacks, what the task is handed ---------------------------------------------------------------------
def test_the_recorded_seconds_are_the_runs_own_and_a_resume_adds_the_earlier_part():
    """result.seconds, the curves' time/seconds and a checkpoint's seconds count this run's wall time (never more
    than measured around it); a resumed run continues the clock of the state it resumes."""
    recipe, states = tiny(outer_steps=4), {}
    started = time.perf_counter()
    result = meta_train(recipe, SineRegression(OPTIONS), on_state=lambda s, snap: states.update({s: snap()}))
    elapsed = time.perf_counter() - started
    assert 0 < result.seconds <= elapsed
    times = [row["time/seconds"] for row in result.curves]
    assert times == sorted(times) and 0 < times[0] and times[-1] <= result.seconds
    assert 0 < states[2].seconds <= states[4].seconds <= elapsed

    earlier = dataclasses.replace(states[2], seconds=1000.0)
    started = time.perf_counter()
    resumed = meta_train(recipe, SineRegression(OPTIONS), resume=earlier)
    elapsed = time.perf_counter() - started
    assert 1000 < resumed.seconds <= 1000 + elapsed
    assert 1000 < resumed.curves[-1]["time/seconds"] <= resumed.seconds


def test_on_step_gets_the_curve_row_at_logging_steps_and_none_between():
    seen: list[tuple[int, Any]] = []
    result = meta_train(tiny(outer_steps=5), SineRegression(OPTIONS), on_step=lambda s, row: seen.append((s, row)))
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5]
    rows = {s: row for s, row in seen if row is not None}
    assert sorted(rows) == [1, 2, 4, 5]  # step 1, every log_every = 2, the last step
    assert list(rows.values()) == result.curves


class RecordingSine(SineRegression):
    """Records the θ that begin_outer_step is handed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handed: list[Any] = []

    def begin_outer_step(self, step, theta, generator):
        self.handed.append(None if theta is None else {k: v.clone() for k, v in theta.items()})


def test_begin_outer_step_is_handed_the_theta_of_the_step_before():
    task, states = RecordingSine(OPTIONS), {}
    meta_train(tiny(outer_steps=3), task, on_state=lambda s, snap: states.update({s: snap()}))
    assert task.handed[0] is None  # before the first draw
    for step in (2, 3):
        after = states[step - 1].theta
        assert all(torch.equal(task.handed[step - 1][k], after[k]) for k in after)


def test_the_diagnostics_draw_from_their_own_stream_of_the_seed_and_step(monkeypatch):
    """At every logging step the diagnostics get the generator of (recipe seed, outer step), whatever the run
    drew before: a resumed run and every process of a sharded one draw the same."""
    diagnose, handed = outer.diagnose, []

    def recording(metaloss, phi, task, theta, batch, objective, gen, shard=None):
        handed.append(gen.get_state())
        return diagnose(metaloss, phi, task, theta, batch, objective, gen, shard)

    monkeypatch.setattr(outer, "diagnose", recording)
    recipe = recipe_from_dict({**TINY_RECIPE, "seed": 7, "outer": {**TINY_RECIPE["outer"], "steps": 4},
                               "log_every": 2})  # fmt: skip
    meta_train(recipe, FreshPointsSine(OPTIONS))
    expected = [diagnostics_generator(7, step).get_state() for step in (1, 2, 4)]
    assert len(handed) == 3 and all(torch.equal(a, b) for a, b in zip(handed, expected, strict=True))


# -- sharding ---------------------------------------------------------------------------------------------------------
class Exchange:
    """What the ranks of a simulated process group share: a slot per rank and a barrier."""

    def __init__(self, world: int):
        self.slots: list[Any] = [None] * world
        self.barrier = threading.Barrier(world, timeout=60)

    def all(self, rank: int, value: Any) -> list[Any]:
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return values


@dataclasses.dataclass(frozen=True)
class ThreadShard(Shard):
    """A rank of ``world`` threads: all-reduce and all-gather through an :class:`Exchange`, in rank order as
    gloo's ring would add them."""

    exchange: Exchange | None = None

    def mean(self, tensors):
        values = self.exchange.all(self.rank, tensors)
        return {name: sum(v[name] for v in values) / self.world for name in tensors}

    def any(self, flag):
        return True in self.exchange.all(self.rank, bool(flag))

    def gather(self, tree):
        parts = self.exchange.all(self.rank, tree)
        return tree_map(lambda *leaves: None if leaves[0] is None else torch.cat(leaves), *parts,
                        is_leaf=lambda x: x is None)  # fmt: skip


class ThetaCollectingSine(FreshPointsSine):
    """Collects data that depend on the current θ (as a policy's rollouts do): the training x are shifted by the
    tanh of the sum of each task's first weight matrix."""

    def collect(self, theta, batch, generator, purpose):
        found = super().collect(theta, batch, generator, purpose)
        first = next(iter(theta.values()))
        shift = torch.tanh(first.reshape(first.shape[0], -1).sum(1))[:, None, None]
        if purpose == "inner":
            return found._replace(x_support=found.x_support + shift)
        return found


def initialise_one_thread_at_a_time(monkeypatch, task_class=None) -> None:
    """φ (and θ₀ of ``task_class``) are initialised from torch's global generator, seeded from the run's own: one
    thread at a time, as each process of a real process group has a global generator of its own."""
    lock = threading.Lock()

    def one_at_a_time(function):
        def locked(*args, **kwargs):
            with lock:
                return function(*args, **kwargs)

        return locked

    monkeypatch.setattr(outer, "build_metaloss", one_at_a_time(outer.build_metaloss))
    if task_class is not None:
        monkeypatch.setattr(task_class, "init_theta", one_at_a_time(task_class.init_theta))


def sharded(monkeypatch, recipe, task_class, world: int, resume=None, on_state=None):
    """meta_train in ``world`` threads, one rank each (from the state ``resume``; rank 0 calls ``on_state``);
    every rank's result."""
    exchange, results, errors = Exchange(world), [None] * world, []
    tasks = [task_class(OPTIONS) for _ in range(world)]  # built here: a task builds a module from the global RNG
    initialise_one_thread_at_a_time(monkeypatch, task_class)

    def rank(r: int) -> None:
        try:
            shard = ThreadShard(rank=r, world=world, exchange=exchange)
            results[r] = meta_train(recipe, tasks[r], shard=shard, resume=resume, on_state=on_state if r == 0 else None)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)
            exchange.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def record_applied_gradients(monkeypatch) -> dict[int, list[dict[str, torch.Tensor]]]:
    """The meta-gradient every Adam step of φ applies, in order, by the thread (rank) that applied it."""
    applied: dict[int, list[dict[str, torch.Tensor]]] = {}
    step = outer.OuterOptimizer.step

    def recording(self, metaloss, gradient):
        applied.setdefault(threading.get_ident(), []).append({k: g.clone() for k, g in gradient.items()})
        step(self, metaloss, gradient)

    monkeypatch.setattr(outer.OuterOptimizer, "step", recording)
    return applied


@pytest.mark.parametrize("task_class", [SineRegression, ThetaCollectingSine], ids=["plain", "collecting"])
@pytest.mark.parametrize(
    ("truncate", "optimizer"), [(False, "sgd"), (True, "sgd"), (False, "adam")], ids=["full", "truncated", "adam"]
)
def test_two_shards_meta_train_like_one_process(monkeypatch, task_class, truncate, optimizer):
    """Two ranks, each differentiating half of the 4 tasks: every rank applies the meta-gradient one process
    applies, and records the same curves, to float rounding (the mean of two half-means is summed in another
    order). Two outer steps: Adam's first steps move φ by ±η whatever a gradient entry's size, so an entry within
    rounding of 0 can flip φ by 2η and every later step with it. θ is carried from the first outer step into the
    second (reset every 4 inner steps), so the gathered θ must be the whole batch's, no more. Each rank diagnoses
    its own share only. With Adam as the inner optimizer its state (moments, step count) is carried and split with θ."""
    if truncate and task_class.collects_data:
        pytest.skip("truncation is refused for a task that collects data")
    recipe = tiny(outer_steps=2, steps=2, reset_every=4, truncate=truncate, optimizer=optimizer)
    applied = record_applied_gradients(monkeypatch)
    diagnose, diagnosed = outer.diagnose, []

    def diagnosing(metaloss, phi, task, theta, batch, objective, gen, shard=None):
        diagnosed.append(shard)
        return diagnose(metaloss, phi, task, theta, batch, objective, gen, shard)

    monkeypatch.setattr(outer, "diagnose", diagnosing)
    alone = meta_train(recipe, task_class(OPTIONS))
    expected = applied.pop(threading.get_ident())
    diagnosed.clear()
    results = sharded(monkeypatch, recipe, task_class, world=2)
    assert len(diagnosed) == 4 and all(isinstance(shard, ThreadShard) for shard in diagnosed)
    assert len(applied) == 2
    for gradients in applied.values():
        assert len(gradients) == 2
        for mine, theirs in zip(gradients, expected, strict=True):
            for k in theirs:
                torch.testing.assert_close(mine[k], theirs[k], rtol=1e-5, atol=1e-8)
    for result in results:
        assert [row["step"] for row in result.curves] == [1, 2]
        for mine, theirs in zip(result.curves, alone.curves, strict=True):
            for key in ("meta/task_loss", "meta/task_loss_before", "inner/learned_loss", "meta/grad_norm"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5), key


def test_a_collecting_task_without_a_generator_is_refused_by_name():
    task = FreshPointsSine(OPTIONS)
    gen = torch.Generator().manual_seed(0)
    batch, theta = task.sample_tasks(2, gen), task.init_theta(2, gen)
    with pytest.raises(ValueError, match=r"task 'sine' collects data and needs a generator"):
        share(task, theta, batch, None, None)


def test_a_checkpoint_resumes_under_another_number_of_processes(monkeypatch):
    """Every rank holds the whole outer-loop state after each step, so a state captured by one process resumes
    under two ranks, and rank 0's state under one process, each applying the meta-gradient the uninterrupted
    single process applies at the next step (to float rounding)."""
    recipe = tiny(outer_steps=3, steps=2)
    applied = record_applied_gradients(monkeypatch)
    states: dict[int, Any] = {}
    meta_train(recipe, SineRegression(OPTIONS), on_state=lambda s, snap: states.update({s: snap()}))
    expected = applied.pop(threading.get_ident())[2]  # the meta-gradient of step 3

    ranks = sharded(monkeypatch, recipe, SineRegression, world=2, resume=states[2])
    assert len(applied) == 2 and all(len(gradients) == 1 for gradients in applied.values())
    rank_states: dict[int, Any] = {}
    for gradients in applied.values():
        for k in expected:
            torch.testing.assert_close(gradients[0][k], expected[k], rtol=1e-5, atol=1e-8)
    assert all(len(result.curves) == len(ranks[0].curves) for result in ranks)

    applied.clear()
    sharded(monkeypatch, recipe, SineRegression, world=2, on_state=lambda s, snap: rank_states.update({s: snap()}))
    applied.clear()
    meta_train(recipe, SineRegression(OPTIONS), resume=rank_states[2])
    (resumed,) = applied.values()
    for k in expected:
        torch.testing.assert_close(resumed[0][k], expected[k], rtol=1e-5, atol=1e-8)


def test_a_stop_request_on_one_process_stops_every_process_after_the_same_outer_step(monkeypatch, tmp_path):
    """`ml3 meta-train --nproc N`: a signal that reaches one process (here rank 1, before its first step ends)
    stops every process after that same outer step, rank 0 keeping the checkpoint; without the agreement rank 0
    would go on alone and wait forever for rank 1's share of the next step."""
    import signal

    from rich.console import Console

    from ml3cli.checkpoints import batch_type_of, load_checkpoint
    from ml3cli.commands.meta_train import _meta_train_into, _StopRequest
    from ml3cli.errors import RunInterrupted

    initialise_one_thread_at_a_time(monkeypatch)
    exchange, outcomes = Exchange(2), [None, None]
    exchange.barrier = threading.Barrier(2, timeout=20)
    artifact = tmp_path / "tiny.safetensors"

    def rank(r: int) -> None:
        stop = _StopRequest()
        stop.training = True
        stop.signum = signal.SIGTERM if r == 1 else None
        try:
            _meta_train_into(tiny(outer_steps=4), artifact, Console(quiet=True), True, None, stop, "cpu",
                             ThreadShard(rank=r, world=2, exchange=exchange))  # fmt: skip
        except BaseException as err:  # noqa: BLE001 - inspected below
            outcomes[r] = err
            if not isinstance(err, RunInterrupted):
                exchange.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(err, RunInterrupted) for err in outcomes), outcomes
    assert [(err.outer_step, err.signum) for err in outcomes] == [(1, signal.SIGTERM)] * 2
    kept = load_checkpoint(artifact.with_name("tiny.checkpoint.safetensors"), batch_type_of(SineRegression(OPTIONS)))
    assert kept.state.step == 1


def test_phi_starts_as_metalosss_own_initialisation_under_the_first_draw_of_the_runs_generator():
    """φ₀ of seed s: torch's default initialisation of the MetaLoss, seeded with the first number the run's
    generator draws from [0, 2⁶²), so that φ₀ depends on the seed alone (not on torch's global generator, which it
    leaves as it found it)."""
    from ml3cli.metaloss import MetaLoss
    from ml3cli.runtime import generator

    recipe = tiny()
    task = SineRegression(OPTIONS)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    built = outer.build_metaloss(recipe, task, generator(recipe.seed))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(int(torch.randint(0, 2**62, (), generator=generator(recipe.seed))))
    config = recipe.meta_loss
    expected = MetaLoss(task.loss_inputs_spec, config.hidden, config.activation, config.bias, config.output)
    for (name, value), (_, other) in zip(built.state_dict().items(), expected.state_dict().items(), strict=True):
        assert torch.equal(value, other), name


def test_the_cosine_schedule_steps_adam_at_half_one_plus_cos_of_the_steps_done_also_after_a_resume(monkeypatch):
    """outer.lr_schedule: cosine: outer step s (of S) takes its Adam step at η·½(1 + cos(π(s−1)/S)), from η at the
    first step down towards 0; a run resumed after step 2 continues the same rates."""
    import math

    recipe = recipe_from_dict({**TINY_RECIPE, "outer": {**TINY_RECIPE["outer"], "steps": 5, "lr_schedule": "cosine"}})
    rates: list[float] = []
    step = outer.OuterOptimizer.step

    def recording(self, metaloss, gradient):
        rates.append(self.adam.param_groups[0]["lr"])
        step(self, metaloss, gradient)

    monkeypatch.setattr(outer.OuterOptimizer, "step", recording)
    states: dict[int, Any] = {}
    meta_train(recipe, SineRegression(OPTIONS), on_state=lambda s, snap: states.update({s: snap()}))
    eta = recipe.outer.lr
    expected = [eta * 0.5 * (1 + math.cos(math.pi * (s - 1) / 5)) for s in range(1, 6)]
    assert rates == pytest.approx(expected, rel=1e-12)
    rates.clear()
    meta_train(recipe, SineRegression(OPTIONS), resume=states[2])
    assert rates == pytest.approx(expected[2:], rel=1e-12)
