"""Rows of a learned loss against PPO on a model-free RL task (paper, section 4.1.3): PPO tuned and run on the
row's test goals, and the numbers that compare the two by training samples: each one's final level and the samples
each needs to reach 80% of its own final gain.

Shared by :mod:`~ml3cli.experiments.mfrl` (the paper's rows) and :mod:`~ml3cli.experiments.beyond_reacher`.

**Verdict of a PPO row** (it replaces the record's learned-vs-likelihood verdict, which stays in
``extra.likelihood_verdict``): *reproduced* when the learned loss reaches 80% of its final gain in fewer training
samples than PPO (PPO not improving at all counts as slower) AND its final level is not worse than PPO's (the 95%
interval of learned − PPO over meta-train × test seed pairs reaches 0 or below, in the task loss −metric: lower is
better); *partly* when exactly one holds (e.g. a faster start that levels off below PPO); else *not reproduced*.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml3cli import files
from ml3cli.baselines.ppo import PPOConfig, train_ppo
from ml3cli.engine.online import Adaptation
from ml3cli.evaluate import LossCurves, draw_tasks, widen_until_interior
from ml3cli.experiments.protocol import Context, EvalSizes, Paired
from ml3cli.tasks import make_task
from ml3cli.tasks.mfrl import ModelFreeRL

#: the fraction of the final gain whose sample count is compared, and the tail of a run that is its final level
FRACTION, TAIL = 0.8, 0.1


@dataclass(frozen=True)
class RowPlan:
    """The sizes of one learned-loss-against-PPO row: the learned loss's evaluation, PPO's budget in updates
    (2,048 samples each) and the goals × seeds of PPO's learning-rate check on validation goals."""

    learned: EvalSizes
    ppo_updates: int
    ppo_check: tuple[int, int]  # validation goals, validation seeds
    ppo_widenings: int = 2  # times PPO's rate grid may widen by two rates while an edge wins
    test_options: dict[str, Any] = field(default_factory=dict)
    label: str = ""


# -- numbers of a learning curve ------------------------------------------------------------------------------------
def final_level(curve: np.ndarray) -> np.ndarray:
    """The mean of the last :data:`TAIL` of the points (at least one) on the last axis."""
    return curve[..., -max(1, round(curve.shape[-1] * TAIL)) :].mean(-1)


def samples_to_gain(curve: np.ndarray, samples: np.ndarray, fraction: float = FRACTION) -> float | None:
    """Training samples until ``curve`` (higher is better, one point per ``samples``) first reaches
    start + fraction · (final − start), final = :func:`final_level`; linear between the two measurements around the
    crossing. None when the curve does not improve (final ≤ start)."""
    start, final = float(curve[0]), float(final_level(curve))
    if not final > start:
        return None
    target = start + fraction * (final - start)
    k = int(np.nonzero(curve >= target)[0][0])
    if k == 0:
        return float(samples[0])
    low, high = float(curve[k - 1]), float(curve[k])
    return float(samples[k - 1] + (target - low) / (high - low) * (samples[k] - samples[k - 1]))


def ratio(ppo: float | None, learned: float | None) -> float | None:
    """PPO's samples over the learned loss's (None unless both are defined)."""
    return ppo / learned if ppo and learned else None


# -- PPO ------------------------------------------------------------------------------------------------------------
def ppo_performance(
    task: ModelFreeRL,
    goals: int,
    seeds: int,
    updates: int,
    config: PPOConfig,
    stream: str,
    cache: Path | None = None,
) -> tuple[np.ndarray, int]:
    """PPO's metric ``[seeds, updates + 1, goals]`` from the goals and θ₀ that :func:`ml3cli.evaluate.evaluate`
    draws for seeds 0 … seeds − 1 of ``stream`` (the learned loss's test goals for ``stream="test"``), and the
    samples per update.

    ``cache``: a folder where each seed's finished run is kept (:func:`ppo_run_key` names it), so that a long PPO
    budget can run in parts: a later call with the same task, goals, seed, stream, budget and settings reads the
    run back (and counts its environment samples) instead of training again."""
    runs = [ppo_run(task, goals, s, stream, updates, config, cache) for s in range(seeds)]
    return np.stack([performance for performance, _ in runs]), runs[0][1]


def ppo_run(
    task: ModelFreeRL,
    goals: int,
    seed: int,
    stream: str,
    updates: int,
    config: PPOConfig,
    cache: Path | None = None,
) -> tuple[np.ndarray, int]:
    """One seed of :func:`ppo_performance`: the metric ``[updates + 1, goals]`` and the samples per update, read
    back from ``cache`` when that run was kept there (its environment samples are counted all the same)."""
    key = ppo_run_key(task, goals, seed, stream, updates, config)
    path = ppo_run_path(cache, key) if cache is not None else None
    kept = read_ppo_run(path, key) if path is not None else None
    if kept is not None:
        performance, per_update, samples = kept
        task.environment_samples += samples
        return performance, per_update
    before = task.environment_samples
    gen, batch, theta = draw_tasks(task, goals, stream, seed)
    result = train_ppo(task, theta, batch, updates, gen, config)
    if path is not None:
        keep_ppo_run(path, key, result.performance, result.samples_per_update, task.environment_samples - before)
    return result.performance, result.samples_per_update


def ppo_run_key(
    task: ModelFreeRL, goals: int, seed: int, stream: str, updates: int, config: PPOConfig
) -> dict[str, Any]:
    """Everything one PPO run's result depends on (the code aside, as for a reused artifact)."""
    return {
        "task": task.name,
        "options": task.options.model_dump(mode="json"),
        "goals": goals,
        "seed": seed,
        "stream": stream,
        "updates": updates,
        "config": json.loads(json.dumps(asdict(config))),
    }


def ppo_run_path(cache: Path, key: dict[str, Any]) -> Path:
    """Where the run of ``key`` is kept in ``cache`` (a digest of the key names the file; the key is inside)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache / f"ppo-{digest}.json"


def read_ppo_run(path: Path, key: dict[str, Any]) -> tuple[np.ndarray, int, int] | None:
    """The run of ``key`` kept at ``path`` (performance, samples per update, environment samples), or None."""
    if not path.is_file():
        return None
    kept = json.loads(path.read_text(encoding="utf-8"))
    if kept["key"] != key:
        return None
    return np.asarray(kept["performance"], dtype=kept["dtype"]), kept["samples_per_update"], kept["environment_samples"]


def keep_ppo_run(path: Path, key: dict[str, Any], performance: np.ndarray, per_update: int, samples: int) -> None:
    """Write one finished run with its key (atomically: an interrupt leaves no half-written run)."""
    document = {
        "key": key,
        "performance": performance.tolist(),
        "dtype": str(performance.dtype),
        "samples_per_update": per_update,
        "environment_samples": samples,
    }
    files.write_text_atomic(path, json.dumps(document))


def ppo_rate(
    task: ModelFreeRL, plan: RowPlan, center: float = PPOConfig.lr, cache: Path | None = None
) -> tuple[float, dict[float, float]]:
    """PPO's rate: the best final level on validation goals (the same budget as the test run) among ``center`` and
    one half-decade above and below, the grid widened by :func:`~ml3cli.evaluate.widen_until_interior` while an
    edge wins (``plan.ppo_widenings`` times at most). Returns the rate and each rate's final level."""
    goals, seeds = plan.ppo_check
    levels: dict[float, float] = {}

    def score(lrs: list[float]) -> dict[float, float]:
        for lr in lrs:
            perf, _ = ppo_performance(task, goals, seeds, plan.ppo_updates, PPOConfig(lr=lr), "validation", cache)
            level = float(final_level(perf.mean((0, 2))))
            levels[lr] = level if math.isfinite(level) else -math.inf
        return {lr: -levels[lr] for lr in lrs}  # as a loss: lower is better, a diverged rate +inf

    lr, _ = widen_until_interior(score, center, span=0.5, step=0.5, max_widenings=plan.ppo_widenings)
    return lr, dict(sorted(levels.items()))


def against_ppo(
    context: Context,
    recipe: str,
    record: dict[str, Any],
    curves: dict[str, LossCurves],
    plan: RowPlan,
    adaptation: Adaptation | None = None,
) -> dict[str, Any]:
    """Run PPO on the row's test goals and return the ``extra.ppo`` numbers; sets the row's verdict by this
    module's rule (the record's own verdict moves to ``extra.likelihood_verdict``). ``adaptation``: the learned
    losses adapted online as they trained, each update on a validation rollout of its own, whose samples count as
    training samples."""
    options = {**context.recipe(recipe).meta_test.task_options, **plan.test_options}
    task = make_task(record["task"], options)
    lr, scores = ppo_rate(task, plan, cache=context.work_dir)
    config = PPOConfig(lr=lr)
    ppo, per_update = ppo_performance(
        task, record["tasks"], record["test_seeds"], plan.ppo_updates, config, "test", context.work_dir
    )
    context.count_samples(task.environment_samples)

    learned_per_update = task.options.episodes * task.options.horizon
    updates = np.arange(record["steps"] + 1)
    learned_samples = updates * learned_per_update
    if adaptation is not None:  # after k updates, k // every φ updates have each rolled out once more
        learned_samples = (
            learned_samples + updates // adaptation.every * task.options.task_loss_episodes * task.options.horizon
        )
    ppo_samples = np.arange(plan.ppo_updates + 1) * per_update
    # the learned losses at their tuned rates: performance [meta seed, test seed, update] (mean over goals)
    learned = np.stack([-curves[f"learned{m}@tuned"].per_seed for m in record["meta_seeds"]])
    ppo_per_seed = ppo.mean(-1)  # [test seed, update]
    learned_80 = samples_to_gain(learned.mean((0, 1)), learned_samples)
    ppo_80 = samples_to_gain(ppo_per_seed.mean(0), ppo_samples)
    # final levels paired over (meta seed, test seed), as a loss (−metric: lower is better)
    final = Paired.of(-final_level(learned), -final_level(ppo_per_seed))
    faster = learned_80 is not None and (ppo_80 is None or learned_80 < ppo_80)
    not_worse = not final.low > 0
    record["extra"]["likelihood_verdict"] = record["verdict"]
    record["verdict"] = ppo_verdict(faster, not_worse, learned_80, ppo_80, final)
    marks = sorted({0, 1, 2, 5, 10, 20, 30, 40, 50, plan.ppo_updates} & set(range(plan.ppo_updates + 1)))
    return {
        "config": asdict(config) | {"value_hidden": list(config.value_hidden)},
        "lr_check": {
            "scores": {repr(k): v for k, v in scores.items()},
            "chosen": lr,
            "interior": lr not in (min(scores), max(scores)),
            "goals": plan.ppo_check[0],
            "seeds": plan.ppo_check[1],
            "stream": "validation",
        },  # fmt: skip
        "updates": plan.ppo_updates,
        "samples_per_update": {"learned": learned_per_update, "ppo": per_update},
        "budget_samples": {"learned": int(learned_samples[-1]), "ppo": int(ppo_samples[-1])},
        "start": float(ppo_per_seed[:, 0].mean()),
        "final_level": {
            "learned": float(final_level(learned).mean()),
            "learned_per_meta_seed": [float(v) for v in final_level(learned).mean(1)],
            "ppo": float(final_level(ppo_per_seed).mean()),
            "ppo_per_test_seed": [float(v) for v in final_level(ppo_per_seed)],
            "learned_minus_ppo_loss": asdict(final),  # −metric: below 0 is the learned loss better
        },
        "samples_to_80pct": {
            "learned": learned_80,
            "ppo": ppo_80,
            "ratio_ppo_over_learned": ratio(ppo_80, learned_80),
            "learned_per_meta_seed": [samples_to_gain(curve, learned_samples) for curve in learned.mean(1)],
        },
        "curve": {  # the metric against training samples, mean over goals and seeds
            "learned": {str(int(x)): float(v) for x, v in zip(learned_samples, learned.mean((0, 1)), strict=True)},
            "ppo": {str(int(ppo_samples[u])): float(ppo_per_seed[:, u].mean()) for u in marks},
        },
        "ppo_curve_full": ppo_per_seed.mean(0).tolist(),
    }


def ppo_verdict(
    faster: bool, not_worse: bool, learned_80: float | None, ppo_80: float | None, final: Paired
) -> dict[str, str]:
    """This experiment's rule (module docstring): sample efficiency to 80% of the gain and the final level."""
    speed = f"80% of the final gain after {_samples(learned_80)} samples vs PPO's {_samples(ppo_80)}"
    level = f"final level learned − PPO (as a loss) {final.mean:.3g} [{final.low:.3g}, {final.high:.3g}]"
    if faster and not_worse:
        return {"verdict": "reproduced", "why": f"faster than PPO ({speed}) and not worse at the end ({level})"}
    if faster:
        return {"verdict": "partly", "why": f"faster start than PPO ({speed}) but a worse final level ({level})"}
    if not_worse:
        return {"verdict": "partly", "why": f"final level not worse than PPO's ({level}) but not faster ({speed})"}
    return {"verdict": "not reproduced", "why": f"neither faster than PPO ({speed}) nor as good at the end ({level})"}


def _samples(value: float | None) -> str:
    return "never (no gain)" if value is None else f"{value:,.0f}"
