"""The batched MuJoCo stepping (ml3cli.envs.mujoco_batch) and the stacked policy (ml3cli.rl.stacked_policy) give
the same trajectories, bit for bit, as the gymnasium environments' own ``step`` and ``vmap`` over the policy.

Exact equality is asserted, not closeness: the fast path makes the same MuJoCo calls on the same data and the
same numpy and torch arithmetic, so any difference at all is a change of what the tasks compute."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, vmap

from ml3cli.rl import EnvPool, GaussianPolicy, stacked_policy
from ml3cli.runtime import generator
from ml3cli.tasks import make_task

pytest.importorskip("gymnasium")

STEPS = 300


def batched_envs(name: str):
    """(the environment class, its batch class, goals to try) of each environment with a batch class."""
    if name == "ant_goal":
        from ml3cli.envs.ant_goal import AntGoalBatch, AntGoalEnv

        return AntGoalEnv, AntGoalBatch, [(2.0, 0.0), (0.0, -2.0), (-1.2, 1.6)]
    from ml3cli.envs.reacher_goal_mf import ReacherGoalMFBatch, ReacherGoalMFEnv

    return ReacherGoalMFEnv, ReacherGoalMFBatch, [(0.1, -0.05), (-0.15, 0.1), (0.02, 0.19)]


@pytest.mark.parametrize("name", ["ant_goal", "reacher_goal_mf"])
@pytest.mark.parametrize("threads", [1, 2])
def test_batch_steps_as_gymnasium_steps_each_environment(name, threads):
    """Random actions (half of them outside the action space, so clipping matters) for STEPS steps on three
    seeds × goals; one environment stops being stepped half-way (a diverged episode): observations, rewards,
    distances and the full MuJoCo state equal gymnasium's ``step`` exactly at every step."""
    from concurrent.futures import ThreadPoolExecutor

    env_class, batch_class, goals = batched_envs(name)
    reference = [env_class() for _ in goals]
    fast = [env_class() for _ in goals]
    for seed, (ref, env, goal) in enumerate(zip(reference, fast, goals, strict=True)):
        np.testing.assert_array_equal(
            ref.reset(seed=seed, options={"goal": goal})[0], env.reset(seed=seed, options={"goal": goal})[0]
        )
    with ThreadPoolExecutor(threads) as executor:
        batch = batch_class(fast, threads, executor)
        rng = np.random.default_rng(0)
        space = reference[0].action_space
        active = np.ones(len(goals), dtype=bool)
        for t in range(STEPS):
            if t == STEPS // 2:
                active[1] = False
            applied = np.clip(rng.uniform(-2.0, 2.0, (len(goals), space.shape[0])), space.low, space.high)
            step = batch.step(applied, active)
            for j, ref in enumerate(reference):
                if not active[j]:
                    continue
                obs, reward, _, _, info = ref.step(applied[j])
                np.testing.assert_array_equal(step.obs[j], obs, err_msg=f"observation, step {t}, env {j}")
                assert step.reward[j] == reward, (t, j)
                assert step.distance[j] == info["distance"], (t, j)
        for ref, env in zip(reference, fast, strict=True):
            np.testing.assert_array_equal(env.data.qpos, ref.data.qpos)
            np.testing.assert_array_equal(env.data.qvel, ref.data.qvel)
            np.testing.assert_array_equal(env.data.qacc_warmstart, ref.data.qacc_warmstart)
        assert batch.envs[1].data.time < batch.envs[0].data.time  # the inactive one was left alone


def gymnasium_rollout(task, theta, goals, episodes, gen):
    """Today's reference: every environment through its gymnasium ``step``, the policy through ``vmap``."""
    batched = vmap(task.policy)
    pool = EnvPool(task.spec, batched=False)
    return pool.rollout(lambda obs: batched(theta, obs), goals, episodes, task.options.horizon, gen)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("reacher_goal_mf", {"horizon": 50, "hidden": [64, 64]}),
        ("ant_goal", {"horizon": 60, "hidden": [64, 64], "init_log_std": -0.5}),
        ("ant_goal", {"horizon": 30, "hidden": [16]}),
    ],
)
def test_task_rollouts_equal_the_gymnasium_rollouts(name, options):
    """The task's rollout (batched stepping, stacked policy) against gymnasium's step and ``vmap``: equal tensors,
    on several seeds, with one task's θ diverging (NaN) so that the not-stepped episodes are covered too."""
    task = make_task(name, options)
    for seed in range(3):
        gen = generator(seed)
        goals, theta = task.sample_goals(3, gen), task.init_theta(3, gen)
        if seed == 2:  # task 1 diverges: its episodes stop being stepped at once
            bias = [key for key in theta if key.endswith("bias")][-1]
            theta[bias] = theta[bias].clone()
            theta[bias][1, 0] = math.nan
        state = gen.get_state()
        expected = gymnasium_rollout(task, theta, goals, 2, gen)
        gen.set_state(state)
        got = task.rollout(theta, goals, 2, gen)
        for field in expected._fields:
            torch.testing.assert_close(
                getattr(got, field), getattr(expected, field), rtol=0, atol=0, equal_nan=True, msg=field
            )
        if seed == 2:
            assert torch.isnan(got.distance[1]).all() and not torch.isnan(got.distance[0]).any()


def test_the_thread_count_does_not_change_the_rollout():
    task = make_task("ant_goal", {"horizon": 40})
    gen = generator(0)
    goals, theta = task.sample_goals(2, gen), task.init_theta(2, gen)
    policy = stacked_policy(task.optimizee, theta)
    rollouts = [EnvPool(task.spec, threads=t).rollout(policy, goals, 3, 40, generator(1)) for t in (1, 2, 3)]
    for other in rollouts[1:]:
        for field in other._fields:
            assert torch.equal(getattr(other, field), getattr(rollouts[0], field)), field
    threaded = make_task("ant_goal", {"horizon": 40, "sim_threads": 2})  # the task's own option
    assert threaded.pool.threaded and not task.pool.threaded
    again = threaded.rollout(theta, goals, 3, generator(1))
    assert all(torch.equal(getattr(again, field), getattr(rollouts[0], field)) for field in again._fields)


@pytest.mark.parametrize("hidden", [[], [8], [64, 64], [32, 16, 8]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stacked_policy_equals_vmap_over_the_module(hidden, dtype):
    policy = GaussianPolicy(31, 8, hidden, init_log_std=-0.3).to(dtype)
    gen = generator(0)
    theta = {
        name: p.detach() + 0.1 * torch.randn((4, *p.shape), generator=gen, dtype=dtype)
        for name, p in policy.named_parameters()
    }
    obs = 3 * torch.randn(4, 5, 31, generator=gen, dtype=dtype)
    expected = vmap(lambda th, s: functional_call(policy, th, (s,)))(theta, obs)
    got = stacked_policy(policy, theta)(obs)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
