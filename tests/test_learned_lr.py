"""``meta_loss.learned_lr``: M_φ also outputs the inner learning rate (paper 4.1.2).

The step is θ' = θ − α·s_φ(θ)·∇_θ ℓ_φ(θ) with s = 2·sigmoid(mean of the second output unit over the rows); s is
evaluated at θ but not differentiated with respect to θ, and φ reaches it. Checked against an independent
implementation (plain autograd, the network written out by hand) and against finite differences, on every path
of the engine; the artifact keeps the switch and meta-test steps with the learned scale.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import run_main, write_recipe

from ml3cli import artifacts
from ml3cli.engine import meta_gradient, sgd_step, task_objective
from ml3cli.metaloss import MetaLoss, grouped_inputs
from ml3cli.recipes import InnerConfig, TaskLossConfig
from ml3cli.runtime import generator
from ml3cli.tasks import make_task

SMOOTH_SINE = {"hidden": [8, 8], "points": 16, "query_points": 16, "activation": "tanh"}
INNER_LR = 0.3


def setup(n_tasks: int):
    torch.manual_seed(0)
    task = make_task("sine", SMOOTH_SINE)
    metaloss = MetaLoss(task.loss_inputs_spec, hidden=(8, 8), activation="tanh", learned_lr=True)
    with torch.no_grad():  # a second unit far from 0, so that a wrong scale cannot hide behind s ≈ 1
        metaloss.net[-1].bias[1] = 0.8
    gen = generator(0)
    batch = task.sample_tasks(n_tasks, gen)
    theta = task.init_theta(n_tasks, gen)
    phi = {name: p.detach().clone() for name, p in metaloss.named_parameters()}
    return task, metaloss, phi, theta, batch


def by_hand(metaloss: MetaLoss, phi, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and step scale of the two-output tanh network, written out."""
    h = grouped_inputs(metaloss.inputs, (), inputs)
    for i in (0, 2):
        h = torch.tanh(F.linear(h, phi[f"net.{i}.weight"], phi[f"net.{i}.bias"]))
    raw = F.linear(h, phi["net.4.weight"], phi["net.4.bias"])
    return F.softplus(raw[..., 0]).mean(), 2 * torch.sigmoid(raw[..., 1].mean())


def reference_loss(metaloss, phi, task, theta, batch, steps: int, truncate: bool) -> torch.Tensor:
    losses = []
    for i in range(batch[0].shape[0]):
        one = type(batch)(*(t[i] for t in batch))
        th = {k: v[i].clone() for k, v in theta.items()}
        for _ in range(steps):
            at = {k: v.detach().requires_grad_(True) for k, v in th.items()} if truncate else th
            if not truncate:
                at = {k: v if v.requires_grad else v.requires_grad_(True) for k, v in at.items()}
            loss, scale = by_hand(metaloss, phi, task.loss_inputs(at, one))
            grads = torch.autograd.grad(loss, list(at.values()), create_graph=True)
            th = {k: th[k] - INNER_LR * scale * g for k, g in zip(th, grads, strict=True)}
        losses.append(task.task_loss(th, one))
    return torch.stack(losses).mean()


def reference_gradient(metaloss, phi, task, theta, batch, steps, truncate):
    leaf = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    loss = reference_loss(metaloss, leaf, task, theta, batch, steps, truncate)
    return dict(zip(leaf, torch.autograd.grad(loss, list(leaf.values())), strict=True)), float(loss)


def test_the_step_uses_the_scale_as_a_constant_in_theta(float64):
    task, metaloss, phi, theta, batch = setup(1)
    one_theta = {k: v[0] for k, v in theta.items()}
    one_batch = type(batch)(*(t[0] for t in batch))
    stepped = sgd_step(task, metaloss.inner_loss_with_phi(phi), one_theta, one_batch, INNER_LR)
    at = {k: v.clone().requires_grad_(True) for k, v in one_theta.items()}
    loss, scale = by_hand(metaloss, phi, task.loss_inputs(at, one_batch))
    grads = torch.autograd.grad(loss, list(at.values()))
    assert float(scale.detach()) == pytest.approx(2 * torch.sigmoid(torch.tensor(0.8)).item(), abs=0.2)
    for (name, g), value in zip(zip(at, grads, strict=True), stepped.values(), strict=True):
        torch.testing.assert_close(value, one_theta[name] - INNER_LR * scale.detach() * g, rtol=1e-12, atol=1e-14)
    # the user-facing module gives the same loss and scale
    module_loss, module_scale = metaloss.loss_and_step_scale(**task.loss_inputs(one_theta, one_batch))
    torch.testing.assert_close(module_loss, loss.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(module_scale, scale.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(metaloss(**task.loss_inputs(one_theta, one_batch)), loss.detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    ("n_tasks", "steps", "truncate"),
    [(1, 1, False), (1, 3, False), (2, 3, False), (2, 3, True)],
    ids=["one-task-K1", "one-task-K3", "vmap-K3", "truncated-K3"],
)
def test_meta_gradient_with_learned_lr_matches_the_reference_and_finite_differences(float64, n_tasks, steps, truncate):
    task, metaloss, phi, theta, batch = setup(n_tasks)
    inner = InnerConfig(lr=INNER_LR, steps=steps, truncate=truncate)
    gradient, seen = meta_gradient(metaloss, phi, task, theta, batch, inner, task_objective(task, TaskLossConfig()))
    reference, value = reference_gradient(metaloss, phi, task, theta, batch, steps, truncate)
    assert float(seen.task_loss.mean()) == pytest.approx(value, rel=1e-10)
    for k in reference:
        torch.testing.assert_close(gradient[k], reference[k], rtol=1e-8, atol=1e-12, msg=k)
    # the second output unit's weights get a gradient only through the scale
    assert float(gradient["net.4.weight"][1].abs().sum()) > 1e-8
    if truncate:
        return
    direction = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in phi.items()}
    eps = 1e-5

    def loss_at(sign: float) -> float:
        moved = {k: phi[k] + sign * eps * direction[k] for k in phi}
        return float(reference_loss(metaloss, moved, task, theta, batch, steps, False).detach())

    fd = (loss_at(1.0) - loss_at(-1.0)) / (2 * eps)
    analytic = float(sum((gradient[k] * direction[k]).sum() for k in phi))
    assert analytic == pytest.approx(fd, rel=1e-5, abs=1e-10)


def test_recipe_switch_round_trips_through_the_artifact_and_meta_test(monkeypatch, capsys, tmp_path, tiny_recipe):
    """meta_loss.learned_lr: true reaches the artifact (two output units, the switch in its architecture, the
    sentence `ml3 inspect` prints for it alone), and `ml3 meta-test` of the artifact steps with its learned scale."""
    tiny_recipe["meta_loss"]["learned_lr"] = True
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe)
    artifact = tmp_path / "a.safetensors"
    assert run_main(monkeypatch, capsys, "meta-train", recipe, "--out", artifact, "--quiet", cwd=tmp_path).code == 0
    module = artifacts.load_loss(artifact)
    assert module.learned_lr and module.net[-1].out_features == 2
    info = artifacts.read_info(artifact)
    assert info["architecture"]["learned_lr"] is True
    inspected = run_main(monkeypatch, capsys, "inspect", artifact, cwd=tmp_path)
    printed = " ".join(inspected.output.split())  # the console wraps long lines
    assert inspected.code == 0 and "also outputs the inner learning rate (learned_lr)" in printed
    result = run_main(
        monkeypatch, capsys, "meta-test", "--loss", artifact, "--task", "sine_shifted", "--tasks", "2", "--num-seeds", "1",
        "--steps", "3", "--json", tmp_path / "m.json", "--out-dir", tmp_path / "mt", "--quiet", cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    document = json.loads((tmp_path / "m.json").read_text())
    learned = document["losses"][0]
    assert learned["lr"] == tiny_recipe["meta_test"]["lr"]
    curves, scales = sgd_by_hand(document, lambda inputs: module.loss_and_step_scale(**inputs), learned["lr"])
    assert learned["per_seed"] == [pytest.approx(curve, rel=1e-6) for curve in curves]
    assert all(abs(s - 1) > 1e-3 for s in scales), scales  # the learned scale is not 1: stepping without it differs
    # a loss without the switch refuses to give a scale, and its artifact says learned_lr false
    plain = MetaLoss(module.inputs, (4,))
    with pytest.raises(ValueError, match="learned_lr"):
        plain.loss_and_step_scale(torch.zeros(3, 1), torch.zeros(3, 1))
    assert artifacts.architecture_of(plain)["learned_lr"] is False
    plain_path = artifacts.save_loss(tmp_path / "plain.safetensors", plain, {"task": "sine"})
    inspected = run_main(monkeypatch, capsys, "inspect", plain_path, cwd=tmp_path)
    assert inspected.code == 0 and "inner learning rate" not in " ".join(inspected.output.split())


def sgd_by_hand(document: dict, loss_and_scale, lr: float) -> tuple[list[list[float]], list[float]]:
    """The per-seed mean curves a meta-test ``document`` (its --json) should hold for a loss stepping θ − lr·s·∇_θ ℓ
    with ``(ℓ, s) = loss_and_scale(inputs)``, one task at a time with plain autograd; and every scale s used."""
    from ml3cli.runtime import stream_seed

    task, n, steps = make_task(document["task"], document["task_options"]), document["tasks"], document["steps"]
    by_seed, scales = [], []
    for seed in document["seeds"]:
        gen = generator(stream_seed("test", seed))
        batch, theta0 = task.sample_tasks(n, gen), task.init_theta(n, gen)
        curves = []
        for i in range(n):
            one = type(batch)(*(t[i] for t in batch))
            theta = {k: v[i].clone() for k, v in theta0.items()}
            curve = [float(task.task_loss(theta, one))]
            for _ in range(steps):
                at = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
                loss, scale = loss_and_scale(task.loss_inputs(at, one))
                grads = torch.autograd.grad(loss, list(at.values()))
                theta = {k: theta[k] - lr * float(scale) * g for k, g in zip(theta, grads, strict=True)}
                curve.append(float(task.task_loss(theta, one)))
                scales.append(float(scale))
            curves.append(curve)
        by_seed.append([sum(values) / n for values in zip(*curves, strict=True)])
    return by_seed, scales


def test_meta_test_steps_with_alpha_times_the_learned_scale(monkeypatch, capsys, tmp_path):
    """`ml3 meta-test` of a learned_lr artifact gives, step for step, the curves of plain SGD with the step
    α·s_φ(θ) (α the inner rate the artifact records, s its learned scale, here ≈ 1.4), written out here."""
    from ml3cli import save_loss

    task, metaloss, phi, _, _ = setup(1)
    test_options = {"points": 8, "query_points": 8, "hidden": [8, 8], "activation": "tanh"}
    recipe = {
        "task": "sine",
        "inner": {"lr": INNER_LR},
        "meta_test": {"task": "sine_shifted", "task_options": test_options},
    }
    info = {"task": "sine", "test_task": "sine_shifted", "recipe": recipe}
    artifact = save_loss(tmp_path / "scaled.safetensors", metaloss, info)
    result = run_main(
        monkeypatch, capsys, "meta-test", "--loss", artifact, "--task", "sine_shifted", "--tasks", "2",
        "--seeds", "3,5", "--steps", "4", "--json", tmp_path / "m.json", "--out-dir", tmp_path / "mt", "--quiet",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    document = json.loads((tmp_path / "m.json").read_text())
    learned = document["losses"][0]
    assert learned["name"] == "scaled" and learned["lr"] == INNER_LR and document["seeds"] == [3, 5]

    curves, scales = sgd_by_hand(document, lambda inputs: by_hand(metaloss, phi, inputs), INNER_LR)
    for seed, recorded, expected in zip(document["seeds"], learned["per_seed"], curves, strict=True):
        assert recorded == pytest.approx(expected, rel=1e-5), f"seed {seed}"
    assert min(scales) > 1.2, "a scale near 1 could not tell a step that ignores it"


def test_landscape_trains_its_centre_with_alpha_times_the_learned_scale(monkeypatch):
    """`ml3 landscape --center-steps N` with a learned_lr loss as the centre's loss: the plane is centred on θ after
    N steps θ ← θ − α·s_φ(θ)·∇_θ ℓ_φ(θ), written out here (s ≈ 1.4, so a step that ignores it is caught)."""
    from ml3cli import landscape
    from ml3cli.evaluate import NamedLoss

    task, metaloss, phi, _, _ = setup(1)
    centres = []
    direction = landscape.filter_normalized_direction

    def recording(theta, gen):
        centres.append({k: v.clone() for k, v in theta.items()})
        return direction(theta, gen)

    monkeypatch.setattr(landscape, "filter_normalized_direction", recording)
    scaled = NamedLoss("scaled", metaloss.as_loss_fn(), INNER_LR, "scaled.safetensors", metaloss)
    landscape.landscape_2d(task, [scaled], seed=0, span=0.5, points=3, center_steps=3, center_loss=scaled)

    gen = generator(0)
    batch = landscape.task_slice(task.sample_tasks(1, gen), 0)
    theta = landscape.theta_slice(task.init_theta(1, gen), 0)
    scales = []
    for _ in range(3):
        at = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        loss, scale = by_hand(metaloss, phi, task.loss_inputs(at, batch))
        gradient = torch.autograd.grad(loss, list(at.values()))
        theta = {k: v.detach() - INNER_LR * scale.detach() * g for (k, v), g in zip(at.items(), gradient, strict=True)}
        scales.append(float(scale))
    assert min(scales) > 1.2
    for k, expected in theta.items():
        torch.testing.assert_close(centres[0][k], expected, rtol=1e-5, atol=1e-6)
