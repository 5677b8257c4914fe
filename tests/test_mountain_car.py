"""The differentiable mountain car, the mountain-car task (paper 4.2.3) and the control-limited iLQR baseline."""

from __future__ import annotations

import math

import pytest
import torch

from ml3cli.control.ilqr import ILQR, box_qp
from ml3cli.envs.mountain_car import GOAL, INTERMEDIATE_GOAL, START, MountainCar
from ml3cli.errors import ML3Error
from ml3cli.runtime import generator
from ml3cli.tasks import TASKS, make_task


# -- the car --------------------------------------------------------------------------------------------------
def reference_step(x: float, v: float, a: float, bounds: bool = True) -> tuple[float, float]:
    """The reference equations, written out in plain floats."""
    a = min(0.25, max(-0.25, a))
    v = v + (-9.8 * 0.2 * math.cos(3 * x) + a / 0.2 - 0.3 * v) * 0.1
    x = x + v * 0.1
    if bounds:
        v = min(1.5, max(-1.5, v))
        x = min(0.5, max(-1.2, x))
        if x == -1.2 and v < 0:
            v = 0.0
    return x, v


@pytest.mark.parametrize(
    "x, v, a",
    [(-0.55, 0.0, 0.0), (-0.55, 0.0, 0.25), (0.1, -0.7, -0.1), (-1.0, 0.4, 0.9), (0.3, 1.2, -3.0), (-0.3, 0.05, 0.2)],
)
def test_step_matches_the_equations(x, v, a):
    car = MountainCar(bounds=False)
    got = car.step(torch.tensor([x, v], dtype=torch.float64), torch.tensor([a], dtype=torch.float64))
    assert got.tolist() == pytest.approx(reference_step(x, v, a, bounds=False), abs=1e-12)


@pytest.mark.parametrize("x, v, a", [(0.45, 1.4, 0.25), (-1.15, -1.4, -0.25), (-0.2, 1.45, 0.25), (0.48, 1.0, 0.1)])
def test_walls_and_speed_limit(x, v, a):
    got = MountainCar().step(torch.tensor([x, v], dtype=torch.float64), torch.tensor([a], dtype=torch.float64))
    assert got.tolist() == pytest.approx(reference_step(x, v, a), abs=1e-12)


def test_step_batches_and_rollout_shapes():
    car = MountainCar()
    states = torch.tensor([[-0.55, 0.0], [0.1, 0.3], [-0.9, -0.2]])
    actions = torch.tensor([[0.1], [-0.2], [0.3]])
    batched = car.step(states, actions)
    for i in range(3):
        torch.testing.assert_close(batched[i], car.step(states[i], actions[i]))
    visited, taken = car.rollout(lambda s: 0.25 * torch.tanh(3 * s[..., 1:]), torch.tensor(START), 35)
    assert visited.shape == (36, 2) and taken.shape == (35, 1)
    torch.testing.assert_close(visited, car.open_loop(torch.tensor(START), taken))


@pytest.mark.parametrize("bounds", [False, True])
def test_gradients_match_finite_differences(bounds):
    """d s_T / d (s_0, a_{0:T}) of a 10-step rollout inside the bounds, in float64."""
    car = MountainCar(bounds=bounds)
    start = torch.tensor([-0.5, 0.1], dtype=torch.float64)
    actions = torch.linspace(-0.2, 0.2, 10, dtype=torch.float64).unsqueeze(-1)
    assert torch.autograd.gradcheck(
        lambda s, a: car.open_loop(s, a)[-1], (start.requires_grad_(), actions.requires_grad_())
    )


def test_active_bounds_have_zero_gradient_not_straight_through():
    car = MountainCar()
    action = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)  # beyond the clamp
    state = torch.tensor([-0.3, 0.2], dtype=torch.float64)
    (grad,) = torch.autograd.grad(car.step(state, action).sum(), action)
    assert float(grad) == 0.0
    at_wall = torch.tensor([0.49, 1.4], dtype=torch.float64, requires_grad=True)  # x' = 0.5 after clamping
    out = car.step(at_wall, torch.tensor([0.25], dtype=torch.float64))
    assert float(out[0].detach()) == 0.5
    (grad,) = torch.autograd.grad(out[0], at_wall)
    assert grad.abs().max() == 0.0


# -- the task -------------------------------------------------------------------------------------------------
def test_task_contract_and_terms():
    assert "mountain_car" in TASKS
    task = make_task("mountain_car")
    assert task.input_names() == ("state", "action", "final_distance")
    assert task.extra_term_names == ("intermediate_goal", "goal_tracking")
    batch = task.sample_tasks(3, generator(0))
    theta = task.init_theta(3, generator(0))
    assert batch.start.shape == (3, 2) and torch.equal(batch.start[1], torch.tensor(START))
    one_batch = type(batch)(*(t[0] for t in batch))
    one = {k: v[0] for k, v in theta.items()}
    inputs = task.loss_inputs(one, one_batch)
    assert inputs["state"].shape == (35, 2) and inputs["action"].shape == (35, 1)
    states, actions = task.rollout(one, one_batch)
    distance = float(torch.linalg.vector_norm(states[-1] - torch.tensor(GOAL)))
    assert float(task.task_loss(one, one_batch)) == pytest.approx(distance, rel=1e-6)
    assert torch.allclose(inputs["final_distance"], torch.full((35, 1), distance))
    assert actions.abs().max() <= 0.25
    inter = torch.linalg.vector_norm(states[1:16] - torch.tensor(INTERMEDIATE_GOAL), dim=-1).mean()
    assert float(task.extra_term("intermediate_goal", one, one_batch)) == pytest.approx(float(inter), rel=1e-6)
    report = task.report_metrics(one, one_batch)
    assert float(report["x_T"]) == pytest.approx(float(states[-1, 0]))
    noisy = make_task("mountain_car", {"start_noise": 0.05}).sample_tasks(4, generator(1)).start
    assert (noisy - torch.tensor(START)).abs().max() <= 0.05 and noisy.std(0).min() > 0


def test_bad_options_name_the_field():
    with pytest.raises(ML3Error, match="intermediate_steps"):
        make_task("mountain_car", {"horizon": 10, "intermediate_steps": 15})
    with pytest.raises(ML3Error, match="activation"):
        make_task("mountain_car", {"activation": "nope"})


# -- iLQR -----------------------------------------------------------------------------------------------------
def _lq_problem(seed: int = 0, n: int = 3, m: int = 2, T: int = 15):
    gen = torch.Generator().manual_seed(seed)
    A = torch.eye(n, dtype=torch.float64) + 0.1 * torch.randn(n, n, generator=gen, dtype=torch.float64)
    B = 0.5 * torch.randn(n, m, generator=gen, dtype=torch.float64)
    Q = torch.diag(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)[:n])
    R = 0.1 * torch.eye(m, dtype=torch.float64)
    Qf = 10 * torch.eye(n, dtype=torch.float64)
    x0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)[:n]
    return A, B, Q, R, Qf, x0, T


def _lq_batch(A, B, Q, R, Qf, x0, T):
    """The LQ problem as one QP over the stacked controls U: J = ½UᵀHU + gᵀU + const."""
    n, m = B.shape
    G = torch.zeros(T + 1, n, T, m, dtype=torch.float64)
    for t in range(1, T + 1):
        for s in range(t):
            G[t, :, s, :] = torch.linalg.matrix_power(A, t - 1 - s) @ B
    G = G.reshape((T + 1) * n, T * m)
    X0 = torch.cat([torch.linalg.matrix_power(A, t) @ x0 for t in range(T + 1)])
    W = torch.block_diag(*([Q] * T + [Qf]))
    H = G.T @ W @ G + torch.block_diag(*([R] * T))
    return H, G.T @ W @ X0


def test_ilqr_solves_lq_problem_to_the_analytic_solution():
    A, B, Q, R, Qf, x0, T = _lq_problem()
    H, g = _lq_batch(A, B, Q, R, Qf, x0, T)
    analytic = -torch.linalg.solve(H, g).reshape(T, -1)
    solver = ILQR(lambda x, u: A @ x + B @ u, lambda x, u, t: 0.5 * x @ Q @ x + 0.5 * u @ R @ u,
                  lambda x: 0.5 * x @ Qf @ x, T, mu_init=0.0)  # fmt: skip
    one = solver.solve(x0, torch.zeros(T, B.shape[1]), iterations=1)  # exact after ONE iteration
    torch.testing.assert_close(one.controls, analytic, atol=1e-9, rtol=0)
    full = solver.solve(x0, torch.randn(T, B.shape[1], dtype=torch.float64), iterations=20)
    assert full.converged
    torch.testing.assert_close(full.controls, analytic, atol=1e-9, rtol=0)


def test_ilqr_respects_control_limits_and_reaches_the_constrained_optimum():
    A, B, Q, R, Qf, x0, T = _lq_problem()
    H, g = _lq_batch(A, B, Q, R, Qf, x0, T)
    limit = 0.3
    solver = ILQR(lambda x, u: A @ x + B @ u, lambda x, u, t: 0.5 * x @ Q @ x + 0.5 * u @ R @ u,
                  lambda x: 0.5 * x @ Qf @ x, T, lower=torch.full((2,), -limit, dtype=torch.float64), upper=torch.full((2,), limit, dtype=torch.float64))  # fmt: skip
    result = solver.solve(x0, torch.zeros(T, 2), iterations=100)
    u = result.controls.reshape(-1)
    assert result.converged and u.abs().max() <= limit + 1e-12
    assert (u.abs() >= limit - 1e-9).any()  # the limits are active in this problem
    # KKT of the convex box-constrained QP: zero gradient inside, pointing outwards at an active bound
    grad = H @ u + g
    inside, upper, lower = u.abs() < limit - 1e-9, u >= limit - 1e-9, u <= -limit + 1e-9
    assert grad[inside].abs().max() < 1e-6
    assert (grad[upper] <= 1e-6).all() and (grad[lower] >= -1e-6).all()
    unconstrained = -torch.linalg.solve(H, g).clamp(-limit, limit)  # clipping the LQR solution is worse
    cost = lambda v: float(0.5 * v @ H @ v + g @ v)  # noqa: E731
    assert cost(u) < cost(unconstrained) - 1e-6
    assert result.costs == sorted(result.costs, reverse=True)  # every accepted iteration lowers the cost


def test_box_qp_matches_brute_force():
    H = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    g = torch.tensor([-3.0, 1.0], dtype=torch.float64)
    lower, upper = torch.tensor([-1.0, -0.2], dtype=torch.float64), torch.tensor([1.0, 0.2], dtype=torch.float64)
    result = box_qp(H, g, lower, upper)
    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 401), torch.linspace(-0.2, 0.2, 401), indexing="ij"), -1)
    grid = grid.reshape(-1, 2).double()
    values = 0.5 * ((grid @ H) * grid).sum(-1) + grid @ g
    best = grid[values.argmin()]
    torch.testing.assert_close(result.x, best, atol=5e-3, rtol=0)
    assert result.free.tolist() == [False, True] or result.free.tolist() == [False, False]


def test_ilqr_mountain_car_plain_cost_runs_and_improves():
    """The baseline of figure 6b: iLQR on ½‖s_T − goal‖² with the action limits; it lowers the cost every
    iteration and never leaves the limits (whether it reaches the goal is reported, not asserted)."""
    car = MountainCar()
    goal = torch.tensor(GOAL, dtype=torch.float64)
    solver = ILQR(car.step, lambda x, u, t: x.new_zeros(()), lambda x: 0.5 * ((x - goal) ** 2).sum(), 35,
                  lower=torch.tensor([-0.25]), upper=torch.tensor([0.25]))  # fmt: skip
    result = solver.solve(torch.tensor(START), torch.zeros(35, 1), iterations=10)
    assert result.iterations >= 1 and result.costs[-1] < result.costs[0]
    assert result.controls.abs().max() <= 0.25
    torch.testing.assert_close(result.states, car.open_loop(torch.tensor(START, dtype=torch.float64), result.controls))


# -- recipes and the engine -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mountain_car_shaped", "mountain_car"])
def test_recipes_load_and_give_a_nonzero_meta_gradient(name):
    from helpers import REPO

    from ml3cli.engine import build_metaloss, meta_gradient, task_objective
    from ml3cli.recipes import load_recipe

    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml", overrides=["meta_loss.hidden=[16,16]", "outer.tasks=2"])
    task = make_task(recipe.task, recipe.task_options)
    gen = generator(0)
    metaloss = build_metaloss(recipe, task, gen)
    phi = {k: v.detach() for k, v in metaloss.named_parameters()}
    batch, theta = task.sample_tasks(2, gen), task.init_theta(2, gen)
    gradient, seen = meta_gradient(
        metaloss, phi, task, theta, batch, recipe.inner, task_objective(task, recipe.task_loss)
    )
    assert all(torch.isfinite(g).all() for g in gradient.values())
    assert sum(float(g.abs().sum()) for g in gradient.values()) > 0
    assert seen.task_loss.shape == (2,)


def test_state_scale_is_an_input_scale_of_the_policy():
    """π_θ with state_scale (1, 10) and θ = (a, b) acts as the unscaled policy with θ = (a, 10·b)."""
    scaled = make_task("mountain_car", {"state_scale": [1.0, 10.0]})
    plain = make_task("mountain_car")
    states = torch.tensor([[-0.55, 0.0], [-0.9, -0.3], [0.2, 0.8]])
    theta = {"net.0.weight": torch.tensor([[1.5, 2.0]])}
    theta_plain = {"net.0.weight": torch.tensor([[1.5, 20.0]])}
    torch.testing.assert_close(scaled.predict(theta, states), plain.predict(theta_plain, states))
    assert not torch.allclose(plain.predict(theta, states), plain.predict(theta_plain, states))
    with pytest.raises(ML3Error, match="state_scale"):
        make_task("mountain_car", {"state_scale": [1.0, 0.0]})


def test_policy_loss_gradient_treats_the_rollout_as_data():
    """With ``loss_gradient: policy`` the loss inputs have the same values, but ∇_θ of a function of them is
    Σ_t ∂/∂a_t · ∂π_θ(s_t)/∂θ with the visited states held fixed; with ``dynamics`` it also runs through the car."""
    through_car = make_task("mountain_car", {"state_scale": [1.0, 10.0]})
    policy_only = make_task("mountain_car", {"state_scale": [1.0, 10.0], "loss_gradient": "policy"})
    batch = through_car.sample_tasks(1, generator(0))
    one = type(batch)(*(t[0] for t in batch))
    theta = {"net.0.weight": torch.tensor([[0.4, 0.9]])}

    def loss(task, th):  # an arbitrary smooth function of all three inputs
        inputs = task.loss_inputs(th, one)
        return (inputs["action"] ** 2).sum() + (inputs["state"] ** 2).sum() + inputs["final_distance"].sum()

    for name, value in through_car.loss_inputs(theta, one).items():
        torch.testing.assert_close(policy_only.loss_inputs(theta, one)[name], value)
    states, _ = through_car.rollout(theta, one)
    states = states[:-1].detach()
    expected = torch.func.grad(lambda th: (through_car.predict(th, states) ** 2).sum())(theta)
    got = torch.func.grad(lambda th: loss(policy_only, th))(theta)
    torch.testing.assert_close(got, expected)
    full = torch.func.grad(lambda th: loss(through_car, th))(theta)
    assert (full["net.0.weight"] - got["net.0.weight"]).abs().max() > 1e-3
    with pytest.raises(ML3Error, match="loss_gradient"):
        make_task("mountain_car", {"loss_gradient": "everything"})


def _meta_objective_after_step(name: str, eta: float) -> tuple[float, float]:
    """L_T of the recipe ``name`` (tiny M_φ, 2 tasks) at φ and at φ − η·∇_φ L_T, on the same batch and θ₀."""
    from helpers import REPO

    from ml3cli.engine import build_metaloss, meta_gradient, task_objective
    from ml3cli.recipes import load_recipe

    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml", overrides=["meta_loss.hidden=[16,16]", "outer.tasks=2"])
    task = make_task(recipe.task, recipe.task_options)
    gen = generator(0)
    metaloss = build_metaloss(recipe, task, gen)
    batch, theta = task.sample_tasks(2, gen), task.init_theta(2, gen)
    objective = task_objective(task, recipe.task_loss)
    phi = {k: v.detach() for k, v in metaloss.named_parameters()}
    gradient, seen = meta_gradient(metaloss, phi, task, theta, batch, recipe.inner, objective, diagnostics=False)
    stepped = {k: phi[k] - eta * gradient[k] for k in phi}
    _, after = meta_gradient(metaloss, stepped, task, theta, batch, recipe.inner, objective, diagnostics=False)
    return float(seen.task_loss.mean()), float(after.task_loss.mean())


def test_shaped_meta_gradient_is_a_descent_direction():
    """A small step of φ against the meta-gradient of the shaped recipe (K = 5 steps at lr 100, L_T over every θ_k)
    lowers the shaped task loss: the K-step second-order meta-gradient points the right way."""
    before, after = _meta_objective_after_step("mountain_car_shaped", 1e-4)
    assert after < before - 1e-5, (before, after)


@pytest.mark.slow
def test_a_small_shaped_run_ends_closer_to_the_goal_than_the_unshaped_run():
    """The issue's "tiny" comparison at seed 0: both recipes with M_φ 32-32, 4 tasks, 300 outer steps (about
    70 + 30 CPU-seconds), 10 updates of a fresh policy on evaluation seeds 0 … 4. Measured: final distance 0.131
    (shaped, x_T = 0.500 on every seed) vs 0.759 (unshaped). Smaller runs do not separate them yet (16-16, 8 tasks:
    1.29 vs 1.07 after 100 outer steps, 1.31 vs 0.84 after 300), which is why this check is marked slow."""
    from helpers import REPO

    from ml3cli.engine import meta_train
    from ml3cli.evaluate import NamedLoss, evaluate
    from ml3cli.recipes import load_recipe

    distance, x_final = {}, {}
    for name in ("mountain_car_shaped", "mountain_car"):
        overrides = ["meta_loss.hidden=[32,32]", "outer.tasks=4", "outer.steps=300"]
        recipe = load_recipe(REPO / "recipes" / f"{name}.yaml", overrides=overrides)
        metaloss = meta_train(recipe, make_task(recipe.task, recipe.task_options)).metaloss.requires_grad_(False)
        test_task = make_task(recipe.meta_test.task, recipe.meta_test.task_options)
        (curves,) = evaluate(test_task, [NamedLoss(name, metaloss.as_loss_fn(), recipe.inner.lr)], 1, 5, 10)
        distance[name] = float(curves.at(10).mean())
        x_final[name] = float(curves.extras["x_T"][:, 0, 10].mean())
    assert distance["mountain_car_shaped"] < 0.5 * distance["mountain_car"], distance
    assert x_final["mountain_car_shaped"] > x_final["mountain_car"], x_final


@pytest.mark.slow
def test_shaped_recipe_ends_closer_to_the_goal_than_the_unshaped_recipe():
    """Both recipes in full at seed 0 (1,500 outer steps each: about 7 + 7 CPU-minutes), then 10 updates of a fresh
    policy per evaluation seed 0 … 4 with each learned loss: the shaped loss ends nearer the goal on average, and
    keeps x_T ≥ 0.45 after each of updates 2 … 10 on every seed (measured: 5 of 5 over updates 2 … 50, 19 of 20 on
    seeds 100 … 119)."""
    from helpers import REPO

    from ml3cli.engine import meta_train
    from ml3cli.evaluate import NamedLoss, evaluate
    from ml3cli.recipes import load_recipe

    distances, kept = {}, {}
    for name in ("mountain_car_shaped", "mountain_car"):
        recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
        task = make_task(recipe.task, recipe.task_options)
        metaloss = meta_train(recipe, task).metaloss.requires_grad_(False)
        test_task = make_task(recipe.meta_test.task, recipe.meta_test.task_options)
        loss = NamedLoss(name, metaloss.as_loss_fn(), recipe.inner.lr)
        (curves,) = evaluate(test_task, [loss], tasks=1, seeds=5, steps=10)
        distances[name] = float(curves.at(10).mean())
        kept[name] = int((curves.extras["x_T"][:, 0, 2:] >= 0.45).all(axis=1).sum())
    assert distances["mountain_car_shaped"] < distances["mountain_car"], distances
    assert kept["mountain_car_shaped"] == 5, kept
