"""ReacherGoal's joint-space shaping terms: q* from the goal, wrapped θ₁ errors, gradients through P."""

from __future__ import annotations

import math

import torch
from torch.func import vmap

from ml3cli.envs import reacher as rc
from ml3cli.runtime import generator
from ml3cli.tasks import make_task

TINY_MODEL = {"random_rollouts": 16, "fit_steps": 50, "model_hidden": [16, 16]}


def test_joint_target_puts_the_fingertip_on_the_goal_with_the_elbow_on_the_starts_side():
    task = make_task("reacher_goal", {"system": "real", "goal_angle": [0.0, 360.0]})
    goal = task.sample_goals(16, generator(0))
    for sign in (1.0, -1.0):
        start = torch.tensor([0.3, sign * 0.5, 0.0, 0.0]).expand(16, 4)
        q = vmap(task.joint_target)(goal, start)
        assert torch.allclose(rc.fingertip(q), goal, atol=1e-6)
        assert bool((torch.sign(q[:, 1]) == sign).all())


def test_joint_error_is_zero_at_the_target_and_wraps_theta1():
    task = make_task("reacher_goal", {"system": "real"})
    batch = task.sample_tasks(1, generator(1))
    one = type(batch)(*(t[0] for t in batch))
    q = task.joint_target(one.goal, one.start)
    states = torch.stack(
        [
            torch.cat([q, torch.zeros(2)]),
            torch.cat([q + torch.tensor([2 * math.pi, 0.0]), torch.zeros(2)]),
            torch.cat([q + torch.tensor([0.0, 0.3]), torch.zeros(2)]),
        ]
    )
    error = task.joint_error(states, one)
    assert torch.allclose(error, torch.tensor([0.0, 0.0, 0.3]), atol=1e-5)


def test_joint_terms_are_differentiable_through_the_model():
    task = make_task("reacher_goal", {"system": "model", **TINY_MODEL, "horizon": 10})
    task.ensure_model()
    batch = task.sample_tasks(1, generator(2))
    one = type(batch)(*(t[0] for t in batch))
    theta = {k: v[0].requires_grad_() for k, v in task.init_theta(1, generator(3)).items()}
    assert "joint_distance" in task.extra_term_names and "joint_path_distance" in task.extra_term_names
    for name in ("joint_distance", "joint_path_distance"):
        value = task.extra_term(name, theta, one)
        grads = torch.autograd.grad(value, list(theta.values()))
        assert value > 0 and sum(float(g.abs().sum()) for g in grads) > 0
