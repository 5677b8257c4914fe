"""Online loss adaptation (ml3cli.engine.online): φ's update is the true meta-gradient of the validation loss
through the last K steps, the validation data are the training (support) data and never the test (query) points,
an update of rate 0 leaves meta-test exactly as it was, and the CLI records and checks its settings.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from helpers import run_main
from torch.func import functional_call

from ml3cli import OnlineLoss
from ml3cli.engine import Adaptation, LossAdapter
from ml3cli.errors import ML3Error
from ml3cli.evaluate import NamedLoss, evaluate, train_curve
from ml3cli.metaloss import MetaLoss
from ml3cli.runtime import generator
from ml3cli.tasks import make_task

SMOOTH_SINE = {"hidden": [8, 8], "points": 16, "query_points": 16, "activation": "tanh"}
INNER_LR = 0.3


def smooth_setup(n_tasks: int = 2, seed: int = 0):
    """A tanh sine task, a tanh meta-loss, a batch of tasks and θ₀ (current default dtype)."""
    torch.manual_seed(seed)
    task = make_task("sine_shifted", SMOOTH_SINE)
    metaloss = MetaLoss(task.loss_inputs_spec, hidden=(8, 8), activation="tanh")
    gen = generator(seed)
    return task, metaloss, task.sample_tasks(n_tasks, gen), task.init_theta(n_tasks, gen)


def validation_after_steps(metaloss, phi, task, theta, batch, steps: int) -> torch.Tensor:
    """The mean over tasks of the task loss on the SUPPORT data after ``steps`` SGD steps with M_φ, one task at a
    time with plain autograd: independent of the engine."""
    losses = []
    for i in range(batch[0].shape[0]):
        x, y = batch.x_support[i], batch.y_support[i]
        th = {k: v[i].clone().requires_grad_() for k, v in theta.items()}
        for _ in range(steps):
            inner = functional_call(metaloss, phi, (), {"y_pred": task.predict(th, x), "y_true": y})
            grads = torch.autograd.grad(inner, list(th.values()), create_graph=True)
            th = {k: th[k] - INNER_LR * g for k, g in zip(th, grads, strict=True)}
        losses.append(((task.predict(th, x) - y) ** 2).mean())
    return torch.stack(losses).mean()


def test_the_adaptation_gradient_matches_finite_differences(float64):
    """∇_φ L_val through K = 3 steps (the meta-test path: the engine's estimator on the support data) equals
    central finite differences of L_val(φ) along random directions (relative error < 1e-5), and φ's update is the
    first Adam step along it, −η·g/(|g| + ε)."""
    task, metaloss, batch, theta = smooth_setup()
    adapter = LossAdapter(metaloss, Adaptation(every=3, unroll=3, lr=1e-2))
    phi = adapter.phi
    found = adapter.gradient(adapter.estimator(task, INNER_LR), theta, task.validation_batch(batch))

    def loss_at(p) -> float:
        return float(validation_after_steps(metaloss, p, task, theta, batch, 3).detach())

    assert float(found.task_loss.mean()) == pytest.approx(loss_at(phi), rel=1e-10)
    gen = torch.Generator().manual_seed(1)
    eps = 1e-5
    for _ in range(3):
        d = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in phi.items()}
        fd = (loss_at({k: phi[k] + eps * d[k] for k in phi}) - loss_at({k: phi[k] - eps * d[k] for k in phi})) / (
            2 * eps
        )
        analytic = float(sum((found.gradient[k] * d[k]).sum() for k in d))
        assert abs(analytic) > 1e-8
        assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-10)

    adapter.apply(found)
    for k, before in phi.items():
        g = found.gradient[k]
        torch.testing.assert_close(adapter.phi[k], before - 1e-2 * g / (g.abs() + 1e-8), rtol=1e-6, atol=1e-9)


def test_online_loss_replays_the_recorded_batches_in_order(float64):
    """Beside a user's loop, the meta-gradient is that of the validation loss after the last K steps replayed on
    the batches those steps took, in their order (checked against plain autograd on the same batches)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    metaloss = MetaLoss(make_task("sine").loss_inputs_spec, hidden=(8,), activation="tanh")
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.rand(6 + k, 1, generator=gen), torch.randn(6 + k, 1, generator=gen)) for k in range(2)]
    x_val, y_val = torch.rand(5, 1, generator=gen), torch.randn(5, 1, generator=gen)
    online = OnlineLoss(metaloss, model, lr=1e-2, every=2, unroll=2, inner_lr=INNER_LR)
    theta0 = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    phi = {k: v.detach().clone().requires_grad_() for k, v in metaloss.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    found = None
    for x, y in batches:
        optimizer.zero_grad()
        online(model(x), y).backward()
        optimizer.step()
        found = online.step((x, y), (x_val, y_val))
    assert found is not None and online.adapter.updates == 1

    th = dict(theta0)
    for x, y in batches:
        inner = functional_call(metaloss, phi, (), {"y_pred": functional_call(model, th, (x,)), "y_true": y})
        grads = torch.autograd.grad(inner, list(th.values()), create_graph=True)
        th = {k: th[k] - INNER_LR * g for k, g in zip(th, grads, strict=True)}
    validation = ((functional_call(model, th, (x_val,)) - y_val) ** 2).mean()
    reference = torch.autograd.grad(validation, list(phi.values()))
    for (name, value), expected in zip(found.gradient.items(), reference, strict=True):
        torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12, msg=name)
    assert not torch.equal(online.loss.net[0].weight, metaloss.net[0].weight)  # the copy learned, not the original


def test_online_loss_steps_a_learned_lr_loss_at_its_step_scale(float64):
    """A loss meta-trained with learned_lr: plain SGD at inner_lr on OnlineLoss's output takes θ − α·scale·∇_θ M_φ
    (the step the loss was meta-trained for), so the replay is the model's own trajectory and φ adapts."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    metaloss = MetaLoss(make_task("sine").loss_inputs_spec, hidden=(8,), activation="tanh", learned_lr=True)
    online = OnlineLoss(metaloss, model, lr=1e-2, every=2, unroll=2, inner_lr=INNER_LR)
    optimizer = torch.optim.SGD(model.parameters(), lr=INNER_LR)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.rand(6, 1, generator=gen), torch.randn(6, 1, generator=gen)
    value, scale = metaloss.loss_and_step_scale(y_pred=model(x), y_true=y)
    scale = float(scale.detach())
    assert abs(scale - 1) > 0.05  # a step scale that is not 1, or the check below could not tell
    grads = torch.autograd.grad(value, list(model.parameters()))
    expected = [p.detach() - INNER_LR * scale * g for p, g in zip(model.parameters(), grads, strict=True)]
    found = []
    for _ in range(2):
        optimizer.zero_grad()
        online(model(x), y).backward()
        optimizer.step()
        if not found:
            for p, e in zip(model.parameters(), expected, strict=True):
                torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)
        found.append(online.step((x, y), (x, y)))
    assert found[0] is None and found[1] is not None and online.adapter.updates == 1
    assert not torch.equal(online.loss.net[0].weight, metaloss.net[0].weight)


def test_online_loss_refuses_a_model_that_did_not_take_the_replayed_steps():
    """Momentum moves θ elsewhere than the replayed SGD steps: the meta-gradient would be another trajectory's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    online = OnlineLoss(MetaLoss(make_task("sine").loss_inputs_spec, hidden=(8,)), model, inner_lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(8, 1), torch.rand(8, 1)
    with pytest.raises(ML3Error, match="plain SGD"):
        for _ in range(3):
            optimizer.zero_grad()
            online(model(x), y).backward()
            optimizer.step()
            online.step((x, y), (x, y))


def small_learned(task, lr: float = 0.1) -> NamedLoss:
    torch.manual_seed(3)
    metaloss = MetaLoss(task.loss_inputs_spec, hidden=(8,))
    return NamedLoss("learned", metaloss.as_loss_fn(), lr, "test", metaloss)


def test_adapt_lr_zero_gives_exactly_the_curves_of_plain_meta_test():
    """With η = 0 every adaptation runs and φ stays put, so the curves are bit for bit those of meta-test without
    adaptation; with η > 0 they are not (the comparison is not vacuous)."""
    task = make_task("sine_shifted", {"points": 8, "query_points": 8, "hidden": [8]})
    losses = [
        small_learned(task),
        NamedLoss("mse", lambda inputs: ((inputs["y_pred"] - inputs["y_true"]) ** 2).mean(), 0.1),
    ]
    plain = evaluate(task, losses, tasks=3, seeds=2, steps=6)
    frozen = evaluate(task, losses, tasks=3, seeds=2, steps=6, adaptation=Adaptation(every=2, unroll=2, lr=0.0))
    moving = evaluate(task, losses, tasks=3, seeds=2, steps=6, adaptation=Adaptation(every=2, unroll=2, lr=0.05))
    for a, b in zip(plain, frozen, strict=True):
        assert np.array_equal(a.values, b.values), a.label
    assert [c.adapts for c in frozen] == [True, False]
    assert not np.array_equal(plain[0].values, moving[0].values)
    assert np.array_equal(plain[1].values, moving[1].values)  # a hand-written loss stays fixed


def test_a_tiny_run_where_adaptation_beats_the_frozen_loss():
    """A small, untrained learned loss on held-out sine tasks (fixed seeds): adapting it online (a one-step
    look-ahead on the training points after every step) ends with a lower query MSE than keeping it frozen, on
    average and on most tasks."""
    task = make_task("sine_shifted", {"points": 8, "query_points": 8, "hidden": [8]})
    loss = small_learned(task)
    frozen = evaluate(task, [loss], tasks=4, seeds=2, steps=30)[0].values[..., -1]
    adapted = evaluate(task, [loss], tasks=4, seeds=2, steps=30, adaptation=Adaptation(every=1, unroll=1, lr=0.01))
    final = adapted[0].values[..., -1]
    assert final.mean() < 0.9 * frozen.mean()
    assert (final < frozen).sum() >= 6  # of 8 (seed, task) pairs


#: supervised families with their support (training) and query (test) fields, small
SPLITS = {
    "sine_shifted": (
        {"points": 8, "query_points": 8, "hidden": [8]},
        ("x_support", "y_support"),
        ("x_query", "y_query"),
    ),
    "sine_frequency": ({"points": 8, "query_points": 8}, ("x_support", "y_support"), ("x_query", "y_query")),
    "mnist_binary": (
        {"images": 8, "test_images": 8, "architecture": "mlp", "hidden": [8]},
        ("x_train", "y_train"),
        ("x_test", "y_test"),
    ),
    "inverse_dynamics_reacher": (
        {"trajectories": 2, "held_out_trajectories": 1, "samples": 40, "points": 16, "query_points": 16, "hidden": [8]},
        ("q", "qd", "qdd", "u"),
        ("q_query", "qd_query", "qdd_query", "u_query"),
    ),
}


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_the_validation_loss_never_reads_the_query_points(name, tmp_path):
    """Poisoning the query (test) points with NaN leaves every φ update exactly as it was, and adaptation still
    runs (the metric on those points is NaN, as it must be); poisoning the support points does change φ, so the
    validation loss does read the training split."""
    options, support, query = SPLITS[name]
    task = make_task(name, {**options, "cache_dir": str(tmp_path)} if name.startswith("inverse") else options)
    gen = generator(0)
    batch, theta = task.sample_tasks(2, gen), task.init_theta(2, gen)
    torch.manual_seed(3)
    metaloss = MetaLoss(task.loss_inputs_spec, hidden=(8,))

    def adapted(batch):
        adapter = LossAdapter(metaloss, Adaptation(every=2, unroll=2, lr=0.05))
        curve, _ = train_curve(task, None, theta, batch, 0.1, 4, adapter=adapter)
        return adapter, curve

    def poisoned(fields):
        return batch._replace(**{f: torch.full_like(getattr(batch, f), math.nan) for f in fields})

    clean, clean_curve = adapted(batch)
    blind, blind_curve = adapted(poisoned(query))
    assert clean.updates == blind.updates == 2
    assert all(torch.isfinite(v).all() for v in clean.phi.values())
    assert any(not torch.equal(clean.phi[k], v.detach()) for k, v in metaloss.named_parameters())
    for k in clean.phi:
        assert torch.equal(clean.phi[k], blind.phi[k]), f"φ's update {k} read the query points"
    assert torch.isfinite(clean_curve).all() and not torch.isfinite(blind_curve).any()
    touched, _ = adapted(poisoned(support))
    assert not all(torch.isfinite(v).all() for v in touched.phi.values())


TINY_REACHER = {"hidden": [8], "episodes": 2, "task_loss_episodes": 2, "horizon": 10}


def rl_adaptation(poison_measurements: bool = False, lr: float = 0.05):
    """Two ReacherGoal policies trained 4 steps by a small learned loss adapting every 2 steps through both; with
    ``poison_measurements`` every rollout that measures the metric (a ``task_loss`` rollout from the optimizee's
    generator) has NaN rewards and distances. Returns the adapter, the curve, the θ each replay reached, the θ at
    each validation rollout and the learned loss as it was."""
    task = make_task("reacher_goal_mf", TINY_REACHER)
    gen = generator(0)
    batch, theta = task.sample_tasks(2, gen), task.init_theta(2, gen)
    torch.manual_seed(3)
    metaloss = MetaLoss(task.loss_inputs_spec, hidden=(8,))
    adapter = LossAdapter(metaloss, Adaptation(every=2, unroll=2, lr=lr))
    replayed, validated = [], []
    real_collect, real_apply = task.collect, adapter.apply

    def collect(theta, batch, generator, purpose):
        data = real_collect(theta, batch, generator, purpose)
        if purpose == "task_loss" and generator is not gen:
            validated.append(theta)
        if poison_measurements and purpose == "task_loss" and generator is gen:
            return data._replace(reward=data.reward * math.nan, distance=data.distance * math.nan)
        return data

    task.collect = collect
    adapter.apply = lambda found: replayed.append(found.theta) or real_apply(found)
    curve, _ = train_curve(task, None, theta, batch, 0.1, 4, gen=gen, adapter=adapter)
    return adapter, curve, replayed, validated, metaloss


def test_rl_adaptation_replays_the_rollouts_trained_on_and_never_reads_the_measurements():
    """On a task that collects rollouts, each φ update replays the very steps the policies took (the replay ends at
    the θ the optimizee reached, which fresh rollouts would not give) and takes L_val on a rollout of its own at that
    θ; rollouts that measure the metric never reach φ: poisoned with NaN, φ's updates are bit for bit the same."""
    clean, clean_curve, replayed, validated, metaloss = rl_adaptation()
    assert clean.updates == 2 and len(replayed) == len(validated) == 2
    for reached, at in zip(replayed, validated, strict=True):
        for name in reached:
            torch.testing.assert_close(reached[name], at[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(clean.phi[k], v.detach()) for k, v in metaloss.named_parameters())
    blind, blind_curve, *_ = rl_adaptation(poison_measurements=True)
    for k in clean.phi:
        assert torch.equal(clean.phi[k], blind.phi[k]), f"φ's update {k} read a measurement rollout"
    assert torch.isfinite(clean_curve).all() and not torch.isfinite(blind_curve).any()


def test_rl_adaptation_at_rate_zero_leaves_the_policies_curves_as_frozen():
    """The validation rollouts draw from a generator of their own: at η = 0 the curves of a collecting task are the
    frozen loss's bit for bit (its training and measurement rollouts unchanged), and at η > 0 they are not."""
    task = make_task("reacher_goal_mf", TINY_REACHER)
    losses = [small_learned(task)]
    frozen = evaluate(task, losses, tasks=2, seeds=1, steps=4)
    still = evaluate(task, losses, tasks=2, seeds=1, steps=4, adaptation=Adaptation(every=2, unroll=2, lr=0.0))
    moving = evaluate(task, losses, tasks=2, seeds=1, steps=4, adaptation=Adaptation(every=2, unroll=2, lr=0.5))
    assert np.array_equal(frozen[0].values, still[0].values) and still[0].adapts
    assert not np.array_equal(frozen[0].values, moving[0].values)


def test_a_family_without_a_training_split_is_refused():
    task = make_task("mountain_car", {})
    with pytest.raises(ML3Error, match="training split"):
        evaluate(task, [small_learned(task)], tasks=1, seeds=1, steps=1, adaptation=Adaptation())


SMALL_SINE = ["--task-option", "points=8", "--task-option", "query_points=8", "--task-option", "hidden=[8]"]


def test_meta_test_adapt_round_trip(tmp_path, monkeypatch, capsys):
    """`ml3 meta-test --adapt ...` trains, says in its table that the learned loss adapts, and results.json and
    settings.json record the settings; the baseline does not adapt."""
    args = ["meta-test", "--loss", "sine", "--task", "sine_shifted", *SMALL_SINE, "--tasks", "2", "--num-seeds", "2"]
    args += ["--steps", "6", "--adapt", "--adapt-every", "3", "--adapt-unroll", "2", "--adapt-lr", "0.01"]
    result = run_main(monkeypatch, capsys, *args, "--out-dir", "out", "--quiet", cwd=tmp_path)
    assert result.code == 0, result.output
    assert "adapting" in result.output and "adapt online" in result.output
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    expected = {"every": 3, "lr": 0.01, "unroll": 2, "truncate": False}
    assert {k: document["online_adaptation"][k] for k in expected} == expected
    assert "support" in document["online_adaptation"]["validation"]
    assert [loss["adapts"] for loss in document["losses"]] == [True, False]
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())["settings"]
    assert settings["adapt"] is True and settings["online_adaptation"] == document["online_adaptation"]

    plain = run_main(monkeypatch, capsys, *args[:-7], "--out-dir", "plain", "--quiet", cwd=tmp_path)
    assert (
        plain.code == 0 and json.loads((tmp_path / "plain" / "results.json").read_text())["online_adaptation"] is None
    )


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--adapt", "--adapt-every", "0"], "--adapt-every"),
        (["--adapt", "--adapt-unroll", "0"], "--adapt-unroll"),
        (["--adapt", "--adapt-lr", "-1"], "--adapt-lr"),
        (["--adapt", "--adapt-lr", "nan"], "--adapt-lr"),
        (["--adapt", "--adapt-lr", "inf"], "--adapt-lr"),
        (["--adapt", "--adapt-every", "2", "--adapt-unroll", "3"], "--adapt-unroll"),
        (["--adapt-every", "3"], "--adapt"),
    ],
)
def test_bad_adaptation_settings_are_refused_naming_the_option(tmp_path, monkeypatch, capsys, extra, named):
    args = ["meta-test", "--loss", "sine", "--task", "sine_shifted", *SMALL_SINE, "--steps", "2", *extra]
    result = run_main(monkeypatch, capsys, *args, "--quiet", cwd=tmp_path)
    assert result.code == 2 and named in result.stderr and "Traceback" not in result.stderr, result.output
    assert not (tmp_path / "runs").exists()


def test_adapt_with_only_hand_written_losses_is_refused(tmp_path, monkeypatch, capsys):
    args = ["compare", "--task", "sine_shifted", "--loss", "mse", "--loss", "l1", *SMALL_SINE, "--adapt", "--quiet"]
    result = run_main(monkeypatch, capsys, *args, cwd=tmp_path)
    assert result.code == 2 and "--adapt" in result.stderr and "learned loss" in result.stderr, result.output


def test_online_loss_trains_a_model_beside_its_optimizer():
    """The README's loop: the model learns, φ moves, and the loss given to OnlineLoss is left as it was."""
    from ml3cli import load_loss

    torch.manual_seed(0)
    loss_fn = load_loss("sine", expect_inputs=("y_pred", "y_true"))
    original = copy.deepcopy(loss_fn.state_dict())
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    x = torch.rand(40, 1) * 4 - 2
    y = 2 * torch.sin(x - 1)
    x_val, y_val = x[:10], y[:10]
    online = OnlineLoss(loss_fn, model, lr=1e-2, every=2, unroll=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=online.inner_lr)
    before = float(torch.nn.functional.mse_loss(model(x), y).detach())
    for _ in range(20):
        optimizer.zero_grad()
        online(model(x), y).backward()
        optimizer.step()
        online.step((x, y), (x_val, y_val))
    assert online.adapter.updates == 10
    assert {k for k, _ in online.named_parameters()} == {f"loss.{k}" for k, _ in loss_fn.named_parameters()}
    assert float(torch.nn.functional.mse_loss(model(x), y).detach()) < before
    assert all(torch.equal(v, loss_fn.state_dict()[k]) for k, v in original.items())
    assert not torch.equal(online.loss.net[0].weight, loss_fn.net[0].weight)
