"""Inverse dynamics with a physics prior: simulators, the generated Sawyer URDF, data, optimizee and task."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import REPO

from ml3cli.engine import meta_gradient, task_objective
from ml3cli.errors import ML3Error
from ml3cli.metaloss import MetaLoss
from ml3cli.recipes import InnerConfig, TaskLossConfig, load_recipe
from ml3cli.runtime import generator
from ml3cli.tasks import make_task
from ml3cli.tasks.inverse_dynamics import (
    DeepLagrangianModel,
    TrajectorySettings,
    load_or_generate,
    sinusoid_trajectories,
)

TINY = {"trajectories": 2, "held_out_trajectories": 1, "samples": 40, "points": 16, "query_points": 16, "hidden": [8]}


def one(batch, i: int = 0):
    return type(batch)(*(t[i] for t in batch))


# -- the Sawyer URDF against the original MuJoCo model --------------------------------------------------------
def test_sawyer_urdf_matches_mujoco_on_100_random_states():
    """The proof that the generated URDF is right: PyBullet's M(q) and inverse dynamics for sawyer.urdf equal
    MuJoCo's for the original MJCF (rigid: damping/armature zeroed, fingers welded, constraints off)."""
    from ml3cli.envs.sawyer import SawyerDynamics, SawyerMujocoDynamics

    bullet, mujoco_side = SawyerDynamics(), SawyerMujocoDynamics()
    assert mujoco_side.dof == bullet.dof == 7
    rng = np.random.default_rng(0)
    low, high = bullet.joint_limits.T
    worst_m = worst_u = 0.0
    for _ in range(100):
        q, qd, qdd = rng.uniform(low, high), rng.uniform(-2, 2, 7), rng.uniform(-5, 5, 7)
        m_pb, m_mj = bullet.mass_matrix(q), mujoco_side.mass_matrix(q)
        u_pb, u_mj = bullet.inverse_dynamics(q, qd, qdd), mujoco_side.inverse_dynamics(q, qd, qdd)
        worst_m = max(worst_m, np.linalg.norm(m_pb - m_mj) / np.linalg.norm(m_mj))
        worst_u = max(worst_u, np.linalg.norm(u_pb - u_mj) / np.linalg.norm(u_mj))
    assert worst_m < 1e-12 and worst_u < 1e-12, (worst_m, worst_u)  # measured 2.4e-15 and 4.8e-15: the same model
    # gravity is in both and matters: the arm's static torque at a bent pose is tens of N·m, but 0 about j0's axis
    z = np.zeros(7)
    static = bullet.inverse_dynamics([0.0, -0.5, 0, 1.0, 0, 0, 0], z, z)
    assert abs(static[1]) > 10 and abs(static[0]) < 1e-9
    # and the joint limits are those of the MJCF
    np.testing.assert_allclose(bullet.joint_limits, mujoco_side.model.jnt_range)


def test_shipped_urdf_is_the_converters_output_of_the_shipped_mjcf():
    from ml3cli.envs.mjcf_to_urdf import HEADER, model_to_urdf
    from ml3cli.envs.sawyer import URDF, sawyer_mujoco_spec

    generated, shipped = model_to_urdf(sawyer_mujoco_spec().compile(), header=HEADER), URDF.read_text()
    # MuJoCo's compiler rounds differently in the last bits on different CPUs (seen: 1e-13 relative in an
    # inertia): the text must match exactly between the numbers, and the numbers to 1e-9 relative.
    number = r"-?\d+\.?\d*(?:[eE][-+]?\d+)?"
    assert re.split(number, generated) == re.split(number, shipped)
    np.testing.assert_allclose(
        [float(v) for v in re.findall(number, generated)], [float(v) for v in re.findall(number, shipped)], rtol=1e-9
    )
    assert (URDF.parent / "NOTICE.txt").read_text().count("MIT") >= 2


@pytest.mark.parametrize(
    "quat", [(1, 0, 0, 0), (0.707107, 0, -0.707107, 0), (0.5, 0.5, 0.5, 0.5), (0.0616248, 0.06163, -0.704416, 0.704416)]
)
def test_rpy_reproduces_the_rotation_even_at_gimbal_lock(quat):
    import mujoco

    from ml3cli.envs.mjcf_to_urdf import quat_to_rpy

    roll, pitch, yaw = quat_to_rpy(quat)

    def rot(axis: int, a: float) -> np.ndarray:
        c, s = np.cos(a), np.sin(a)
        i, j = [(1, 2), (2, 0), (0, 1)][axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = c
        r[i, j], r[j, i] = -s, s
        return r

    expected = np.zeros(9)
    mujoco.mju_quat2Mat(expected, np.asarray(quat, float) / np.linalg.norm(quat))
    np.testing.assert_allclose(rot(2, yaw) @ rot(1, pitch) @ rot(0, roll), expected.reshape(3, 3), atol=1e-12)


def test_pybullet_never_receives_numpy_arrays():
    """PyBullet segfaults on numpy arrays in these calls; the wrapper converts. In a subprocess, so a regression
    shows as a crash of the child, not of the test run."""
    code = textwrap.dedent(
        """
        import numpy as np
        from ml3cli.envs.sawyer import SawyerDynamics
        d = SawyerDynamics()
        q = np.linspace(-0.5, 0.5, 7)
        m = d.mass_matrix(q)
        u = d.inverse_dynamics(q, np.ones(7), np.float32(2) * np.ones(7, dtype=np.float32))
        assert m.shape == (7, 7) and u.shape == (7,)
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


# -- the reacher ----------------------------------------------------------------------------------------------
def test_reacher_ground_truth_is_consistent():
    from ml3cli.envs.reacher_dynamics import ReacherDynamics

    arm = ReacherDynamics()
    q, qd, qdd = np.array([0.3, 1.0]), np.array([1.0, -2.0]), np.array([3.0, 0.5])
    m = arm.mass_matrix(q)
    assert m.shape == (2, 2) and np.allclose(m, m.T) and np.all(np.linalg.eigvalsh(m) > 0)
    assert np.allclose(np.diag(m), 1.0, atol=5e-3)  # armature 1.0 dominates the light links
    assert not np.allclose(m, arm.mass_matrix(np.array([0.3, 2.5])))  # but M depends on q
    force = arm.inverse_dynamics(q, qd, np.zeros(2))
    np.testing.assert_allclose(arm.inverse_dynamics(q, qd, qdd), m @ qdd + force, rtol=1e-10)
    np.testing.assert_allclose(force, qd, atol=2e-3)  # damping 1.0 · q̇ plus small Coriolis terms
    assert arm.joint_limits.shape == (2, 2) and arm.joint_limits[1, 1] == 3.0


# -- data -----------------------------------------------------------------------------------------------------
class SeenDraws:
    """A numpy generator that keeps every array its ``uniform`` returns."""

    def __init__(self, rng: np.random.Generator):
        self.rng, self.draws = rng, []

    def uniform(self, *args, **kwargs):
        self.draws.append(self.rng.uniform(*args, **kwargs))
        return self.draws[-1]


def test_trajectories_stay_within_limits_and_have_exact_derivatives():
    limits = np.array([[-1.0, 2.0], [-3.0, -2.5]])
    q, qd, qdd = sinusoid_trajectories(limits, 50, 400, 20.0, 3, (0.5, 2.0), 0.8, np.random.default_rng(1))
    assert q.shape == qd.shape == qdd.shape == (50, 400, 2)
    mid, half = limits.mean(1), 0.8 * (limits[:, 1] - limits[:, 0]) / 2
    assert np.all(np.abs(q - mid) <= half + 1e-12)
    assert np.all(np.abs(q - mid).max(axis=(0, 1)) > 0.5 * half)  # and they use the range
    # finite differences on a dense grid of one trajectory agree with the analytic derivatives; the sample times
    # are drawn inside (not returned), so the generator is wrapped to see them
    rng = SeenDraws(np.random.default_rng(2))
    q2, qd2, qdd2 = sinusoid_trajectories(limits, 1, 20000, 20.0, 3, (0.5, 2.0), 0.8, rng)
    t = np.sort(rng.draws[-1], axis=1)[0]  # the last draw: the times, sorted as the function sorts them
    assert t.shape == (20000,) and t[-1] - t[0] > 19.9
    for value, slope in ((q2[0], qd2[0]), (qd2[0], qdd2[0])):
        fd = np.gradient(value, t, axis=0)[1:-1]  # second-order central differences on the uneven grid
        scale = np.abs(slope).max()
        assert np.abs(fd - slope[1:-1]).max() < 1e-4 * scale, np.abs(fd - slope[1:-1]).max() / scale  # measured 1.3e-5


def test_generation_is_deterministic_per_seed_and_splits_differ(tmp_path):
    def settings(**changes):
        base = dict(
            robot="reacher", split="meta_train", data_seed=0, trajectories=2, held_out_trajectories=1, samples=30,
            duration=10.0, harmonics=2, omega_range=(0.5, 2.0), limit_margin=0.8,
        )  # fmt: skip
        return TrajectorySettings(**{**base, **changes})

    a = load_or_generate(settings(), None)
    b = load_or_generate(settings(), None)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for other in (settings(data_seed=1), settings(split="meta_test")):
        assert not np.allclose(load_or_generate(other, None)["q"], a["q"])
    low, high = a["limits"].T
    assert np.all(a["q"] >= low) and np.all(a["q"] <= high)
    # u = M q̈ + F: the torques are the simulator's inverse dynamics of the trajectory
    from ml3cli.envs.reacher_dynamics import ReacherDynamics

    arm = ReacherDynamics()
    i, s = 1, 7
    np.testing.assert_allclose(a["u"][i, s], arm.inverse_dynamics(a["q"][i, s], a["qd"][i, s], a["qdd"][i, s]))
    np.testing.assert_allclose(a["M"][i, s], arm.mass_matrix(a["q"][i, s]))


def test_cache_is_used_and_a_corrupt_file_is_regenerated(tmp_path, monkeypatch):
    import ml3cli.tasks.inverse_dynamics as mod

    settings = TrajectorySettings("sawyer", "meta_test", 3, 2, 1, 20, 10.0, 2, (0.5, 2.0), 0.8)
    first = load_or_generate(settings, tmp_path)
    files = list(tmp_path.glob("sawyer_meta_test_*.npz"))
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(mod, "generate", lambda s: calls.append(s) or first)
    again = load_or_generate(settings, tmp_path)
    assert not calls and all(np.array_equal(first[k], again[k]) for k in first)
    files[0].write_bytes(b"not an npz")
    load_or_generate(settings, tmp_path)
    assert calls == [settings]


# -- optimizee and task ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dof", [2, 7])
def test_deep_lagrangian_inertia_is_symmetric_positive_definite(dof):
    torch.manual_seed(dof)
    # float64 so that the check sees the construction, not float32 rounding of L Lᵀ at large weights
    model = DeepLagrangianModel(dof, [16, 16], epsilon=1e-3).double()
    for p in model.parameters():  # large random weights: SPD must hold for any θ, not just at init
        p.data.normal_(0, 2.0)
    q, qd, qdd = (torch.randn(500, dof, dtype=torch.float64) * s for s in (3, 1, 1))
    u_hat, inertia = model(q, qd, qdd)
    assert u_hat.shape == (500, dof) and inertia.shape == (500, dof, dof)
    torch.testing.assert_close(inertia, inertia.transpose(-1, -2))
    assert torch.linalg.eigvalsh(inertia).min() > 0.5e-3
    force = model(q, qd, torch.zeros_like(qdd))[0]
    torch.testing.assert_close(u_hat, (inertia @ qdd.unsqueeze(-1)).squeeze(-1) + force)


@pytest.mark.parametrize("name,dof", [("inverse_dynamics_reacher", 2), ("inverse_dynamics_sawyer", 7)])
def test_task_shapes_terms_and_metrics(name, dof, tmp_path):
    task = make_task(name, {**TINY, "cache_dir": str(tmp_path)})
    gen = generator(0)
    batch, theta = task.sample_tasks(3, gen), task.init_theta(3, gen)
    assert batch.q.shape == (3, 16, dof) and batch.inertia_query.shape == (3, 16, dof, dof)
    b0, t0 = one(batch), {k: v[0] for k, v in theta.items()}
    inputs = task.loss_inputs(t0, b0)
    assert inputs["u_pred"].shape == inputs["u_true"].shape == (16, dof, 1)
    mse = task.builtin_losses["torque_mse"](**inputs)
    assert float(mse) == pytest.approx(float(((inputs["u_pred"] - inputs["u_true"]) ** 2).sum((1, 2)).mean()))
    prior = task.extra_term("inertia_prior", t0, b0)
    error = task.report_metrics(t0, b0)["inertia_error"]
    assert float(prior) > 0 and float(error) ** 2 <= float(prior) + 1e-6  # mean of norms ≤ root of mean of squares
    # the training samples and the held-out samples come from different trajectories
    train = {tuple(r) for r in task.train_pool["q"].tolist()}
    assert not any(tuple(r) in train for r in task.held_out_pool["q"].tolist())
    # meta-train and meta-test trajectories differ
    test_task = make_task(name, {**TINY, "cache_dir": str(tmp_path), "split": "meta_test"})
    assert not torch.allclose(test_task.train_pool["q"], task.train_pool["q"])


def test_the_prior_term_gives_a_meta_gradient_and_one_loss_serves_both_robots(tmp_path):
    reacher = make_task("inverse_dynamics_reacher", {**TINY, "cache_dir": str(tmp_path)})
    sawyer = make_task("inverse_dynamics_sawyer", {**TINY, "cache_dir": str(tmp_path)})
    assert reacher.loss_inputs_spec == sawyer.loss_inputs_spec
    torch.manual_seed(0)
    metaloss = MetaLoss(reacher.loss_inputs_spec, (8, 8), "elu")
    phi = {k: v.detach() for k, v in metaloss.named_parameters()}
    gen = generator(0)
    for task in (reacher, sawyer):
        batch, theta = task.sample_tasks(2, gen), task.init_theta(2, gen)
        only_prior = task_objective(task, TaskLossConfig(weight=0.0, extra={"inertia_prior": 1.0}))
        grad, seen = meta_gradient(metaloss, phi, task, theta, batch, InnerConfig(lr=1e-4, steps=2), only_prior)
        assert torch.isfinite(seen.task_loss).all()
        assert sum(float(g.abs().sum()) for g in grad.values()) > 0


def test_options_are_validated(tmp_path):
    with pytest.raises(ML3Error, match="task_options.omega_range"):
        make_task("inverse_dynamics_reacher", {"omega_range": [2.0, 1.0]})
    with pytest.raises(ML3Error, match="task_options.points"):
        make_task("inverse_dynamics_reacher", {**TINY, "points": 10_000, "cache_dir": str(tmp_path)})


@pytest.mark.parametrize(
    "recipe",
    [
        "inverse_dynamics_reacher.yaml",
        "inverse_dynamics_reacher_noprior.yaml",
        "inverse_dynamics_sawyer.yaml",
        "inverse_dynamics_sawyer_noprior.yaml",
    ],
)
def test_recipes_load(recipe):
    loaded = load_recipe(REPO / "recipes" / recipe)
    assert loaded.meta_test.task == loaded.task and loaded.meta_test.task_options["split"] == "meta_test"
    assert loaded.task_options.get("split", "meta_train") == "meta_train"
    assert ("noprior" in recipe) == (not loaded.task_loss.extra)


def test_meta_train_then_transfer_the_reacher_loss_to_the_sawyer(monkeypatch, capsys, tmp_path):
    """End to end through the CLI: a tiny reacher recipe (with and without the prior, the documented ``--set``),
    then ``ml3 compare`` of the reacher's loss on the 7-joint Sawyer, with the inertia error reported."""
    import yaml
    from helpers import RECIPES, run_main, write_recipe

    data = yaml.safe_load((RECIPES / "inverse_dynamics_reacher.yaml").read_text())
    data["task_options"].update(TINY)
    data["meta_test"]["task_options"].update(TINY)
    data["meta_test"].update(tasks=1, seeds=1, steps=5)
    data.update(log_every=1, checkpoint_every=0)
    data["outer"].update(steps=2, tasks=2)
    data["inner"].update(steps=2)
    recipe = write_recipe(tmp_path / "r.yaml", data)
    for extra, out in (([], "prior.safetensors"), (["--set", "task_loss.extra={}"], "noprior.safetensors")):
        result = run_main(
            monkeypatch, capsys, "meta-train", recipe, "--out", tmp_path / out, "--quiet", *extra, cwd=tmp_path
        )
        assert result.code == 0, result.output
    from ml3cli.artifacts import read_info

    assert read_info(tmp_path / "prior.safetensors")["recipe"]["task_loss"]["extra"] == {"inertia_prior": 1.0}
    assert read_info(tmp_path / "noprior.safetensors")["recipe"]["task_loss"]["extra"] == {}
    result = run_main(
        monkeypatch, capsys, "compare", "--task", "inverse_dynamics_sawyer", "--loss", tmp_path / "prior.safetensors",
        "--loss", "torque_mse", "--tasks", "1", "--num-seeds", "1", "--steps", "3", "--lr", "1e-4",
        "--out-dir", tmp_path / "cmp", cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    assert "inertia_error" in result.output


# -- ml3 reproduce inverse_dynamics ----------------------------------------------------------------------------
#: the four recipes shrunk to seconds: tiny data sets and networks, 2 outer steps, 5 SGD steps at meta-test
TINY_REPRODUCE = (
    "outer.steps=2", "inner.steps=2", "meta_loss.hidden=[8]",
    *(f"{where}.{k}={v}" for where in ("task_options", "meta_test.task_options")
      for k, v in {**TINY, "hidden": "[8]"}.items()),
    "meta_test.steps=5",
)  # fmt: skip


@pytest.mark.slow
def test_reproduce_inverse_dynamics_writes_the_three_comparisons_per_robot(tmp_path, monkeypatch):
    """Per robot: prior vs torque MSE, no prior vs torque MSE (a control), prior vs no prior paired seed with
    seed; the experiment's verdict from the non-controls only; the data sets counted as environment samples."""
    import dataclasses
    import json

    from rich.console import Console

    from ml3cli.commands.options import ReproduceOptions
    from ml3cli.commands.reproduce import reproduce
    from ml3cli.experiments import experiment
    from ml3cli.experiments.protocol import overall_verdict, validate_results

    monkeypatch.chdir(tmp_path)
    exp = dataclasses.replace(experiment("inverse_dynamics"), quick=TINY_REPRODUCE, quick_eval={"tasks": 2, "seeds": 2})
    options = ReproduceOptions(quick=True, meta_seeds=2, jobs=2, out_dir=tmp_path / "out")
    reproduce(exp, options, Console(quiet=True))
    document = validate_results(json.loads((tmp_path / "out" / "results.json").read_text()), "results.json")
    comparisons = document["comparisons"]
    assert [c["control"] for c in comparisons] == [False, True, False] * 2
    assert [c["recipe"] for c in comparisons] == [
        "inverse_dynamics_reacher", "inverse_dynamics_reacher_noprior", "inverse_dynamics_reacher",
        "inverse_dynamics_sawyer", "inverse_dynamics_sawyer_noprior", "inverse_dynamics_sawyer",
    ]  # fmt: skip
    assert document["verdict"] == overall_verdict([c for c in comparisons if not c["control"]])
    for robot in (comparisons[:3], comparisons[3:]):
        with_prior, without, learned_vs_learned = robot
        assert learned_vs_learned["baseline"] == without["recipe"]
        # the loss without the prior is the baseline, at the same rates and with the same numbers
        assert learned_vs_learned["final"]["baseline_tuned"] == without["final"]["learned_tuned"]
        assert learned_vs_learned["lr"]["baseline_tuned"] == without["lr"]["learned_tuned"]
        assert with_prior["final"]["learned_tuned"] == learned_vs_learned["final"]["learned_tuned"]
        assert with_prior["final"]["baseline_fixed"] == without["final"]["baseline_fixed"]  # MSE once per robot
        assert learned_vs_learned["tuned"]["pairs"] == 4  # 2 meta-train seeds × 2 test seeds
        # rates chosen on validation trajectories, interior or at the end of the widening
        assert with_prior["lr"]["validation"]["data_seed"] != 0
        assert set(with_prior["extra"]["inertia_error"]) >= {"baseline@tuned", "learned0@tuned"}
    # 4 recipes × 2 seeds meta-trained on 3 trajectories × 40 samples; meta-test: test and validation per robot
    assert document["environment_samples"] == {"meta_train": 8 * 120, "meta_test": 2 * 2 * 120}
    assert (tmp_path / "out" / "figure.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_reproduce_beyond_sawyer_adapts_the_learned_losses_and_not_torque_mse(tmp_path, monkeypatch):
    """beyond_sawyer: the three comparisons frozen, then the same three with the learned losses adapting online
    (recorded as such); torque MSE trains alike in both, the learned losses do not (φ moved), and both recipes
    normalise the torques."""
    import dataclasses
    import json

    import numpy as np
    from rich.console import Console

    from ml3cli.commands.options import ReproduceOptions
    from ml3cli.commands.reproduce import reproduce
    from ml3cli.experiments import experiment
    from ml3cli.experiments.beyond_sawyer import ADAPTATION, RECIPES
    from ml3cli.experiments.protocol import validate_results
    from ml3cli.recipes import load_recipe

    for recipe in map(load_recipe, RECIPES):
        assert recipe.task_options["normalize_torques"] and recipe.meta_test.task_options["normalize_torques"]
    monkeypatch.chdir(tmp_path)
    quick = (*TINY_REPRODUCE, "meta_test.steps=20")  # two updates of φ at every=10
    exp = dataclasses.replace(experiment("beyond_sawyer"), quick=quick, quick_eval={"tasks": 2, "seeds": 2})
    reproduce(exp, ReproduceOptions(quick=True, meta_seeds=1, jobs=2, out_dir=tmp_path / "out"), Console(quiet=True))
    document = validate_results(json.loads((tmp_path / "out" / "results.json").read_text()), "results.json")
    frozen, adapting = document["comparisons"][:3], document["comparisons"][3:]
    assert [c["recipe"] for c in frozen] == [c["recipe"] for c in adapting] == [RECIPES[0], RECIPES[1], RECIPES[0]]
    for c in frozen:
        assert "adaptation" not in c["extra"]
    for c in adapting:
        assert c["extra"]["adaptation"] == ADAPTATION.record() and c["label"].startswith("Sawyer, normalised + online")
    with_prior, adapted = frozen[0], adapting[0]
    assert with_prior["final"]["baseline_fixed"] == adapted["final"]["baseline_fixed"]  # torque MSE never adapts
    assert not np.allclose(with_prior["final"]["learned_fixed"], adapted["final"]["learned_fixed"])
