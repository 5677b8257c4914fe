"""``ml3 reproduce mfrl``: the numbers of a learning curve (samples to 80% of the gain, final level), the verdict
rule against PPO, and a --quick run end to end."""

from __future__ import annotations

import numpy as np
import pytest
from rich.console import Console

from ml3cli.commands.options import ReproduceOptions
from ml3cli.commands.reproduce import reproduce
from ml3cli.experiments import REPRODUCIBLE, experiment
from ml3cli.experiments.against_ppo import final_level, ppo_verdict, ratio, samples_to_gain
from ml3cli.experiments.protocol import VERDICTS, Paired, validate_results


def test_final_level_is_the_mean_of_the_last_tenth():
    curve = np.arange(20.0)
    assert final_level(curve) == pytest.approx(18.5)  # the last 2 of 20 points
    assert final_level(np.array([1.0, 5.0])) == 5.0  # at least one point
    np.testing.assert_allclose(final_level(np.stack([curve, 2 * curve])), [18.5, 37.0])


def test_samples_to_gain_interpolates_the_crossing_of_80_percent():
    samples = np.arange(11) * 100
    # start 0, final (last point) 10: 80% is 8, crossed between 700 (7) and 800 (9) → 750
    curve = np.array([0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 10.0])
    assert samples_to_gain(curve, samples) == pytest.approx(750.0)
    # a faster start reaches it sooner; a curve that never improves has no such point
    assert samples_to_gain(np.array([0, 9, 10, 10, 10, 10, 10, 10, 10, 10, 10.0]), samples) == pytest.approx(
        100 * 8 / 9
    )
    assert samples_to_gain(np.array([0, -1, -2, -1, -1, -1, -1, -1, -1, -1, -1.0]), samples) is None
    assert ratio(3000.0, 1000.0) == 3.0 and ratio(None, 1000.0) is None


def test_the_verdict_needs_a_faster_start_and_a_final_level_not_worse():
    level = Paired(0.5, -0.2, 1.2, 3, 9)  # learned − PPO as a loss: the interval reaches below 0
    worse = Paired(2.0, 1.0, 3.0, 0, 9)  # the whole interval above 0: the learned loss ends worse
    assert ppo_verdict(True, True, 1000.0, 3000.0, level)["verdict"] == "reproduced"
    assert ppo_verdict(True, False, 1000.0, 3000.0, worse)["verdict"] == "partly"
    assert "faster start" in ppo_verdict(True, False, 1000.0, 3000.0, worse)["why"]
    assert ppo_verdict(False, True, 5000.0, 3000.0, level)["verdict"] == "partly"
    assert ppo_verdict(False, False, None, 3000.0, worse)["verdict"] == "not reproduced"
    assert "never" in ppo_verdict(True, True, 1000.0, None, level)["why"]


def test_ppo_rate_widens_its_grid_until_the_choice_is_interior(monkeypatch):
    """Final levels that grow up to 10× CleanRL's rate and fall after it: the three-rate check (its top edge
    winning) widens upwards until the best rate has a worse one on either side; a diverged rate never wins."""
    from ml3cli.experiments import against_ppo, mfrl

    def fake(task, goals, seeds, updates, config, stream, cache=None):
        if config.lr > 5e-3:
            return np.full((seeds, updates + 1, goals), np.nan), 2048  # diverged
        level = -abs(np.log10(config.lr / 3e-3))  # best at 3e-3
        return np.full((seeds, updates + 1, goals), level), 2048

    monkeypatch.setattr(against_ppo, "ppo_performance", fake)
    lr, levels = against_ppo.ppo_rate(None, mfrl.FULL[mfrl.REACHER])
    assert lr == pytest.approx(3e-3) and min(levels) < lr < max(levels)
    assert len(levels) == 5 and levels[max(levels)] < levels[lr]
    no_widening = against_ppo.ppo_rate(None, mfrl.QUICK[mfrl.REACHER])
    assert no_widening[0] == pytest.approx(3e-4 * 10**0.5) and len(no_widening[1]) == 3  # the edge: not widened


def test_finished_ppo_runs_are_kept_and_read_back(tmp_path, monkeypatch):
    """With a cache folder, each seed's PPO run is written once; a second call (the same budget and settings) reads
    every run back, bit for bit, with its environment samples, and trains nothing; another rate trains again. An
    interrupted call resumes after the seeds it finished."""
    from ml3cli.baselines.ppo import PPOConfig
    from ml3cli.experiments import against_ppo
    from ml3cli.tasks import make_task

    trained = []
    real = against_ppo.train_ppo
    monkeypatch.setattr(against_ppo, "train_ppo", lambda *args: trained.append(1) or real(*args))

    def task():
        return make_task("reacher_goal_mf", {"hidden": [8], "episodes": 2, "task_loss_episodes": 2, "horizon": 10})

    config = PPOConfig(steps_per_update=20, num_minibatches=2, update_epochs=1)
    fresh = task()
    first, per_update = against_ppo.ppo_performance(fresh, 2, 2, 2, config, "test", tmp_path)
    assert len(trained) == 2 and len(list(tmp_path.glob("ppo-*.json"))) == 2
    again = task()
    second, per_update_again = against_ppo.ppo_performance(again, 2, 2, 2, config, "test", tmp_path)
    assert len(trained) == 2 and per_update_again == per_update
    np.testing.assert_array_equal(first, second)
    assert first.dtype == second.dtype and again.environment_samples == fresh.environment_samples > 0
    against_ppo.ppo_performance(
        task(), 2, 2, 2, PPOConfig(lr=1e-3, steps_per_update=20, num_minibatches=2), "test", tmp_path
    )
    assert len(trained) == 4
    # a run stopped after its first seed: the next one trains the second seed only
    sorted(tmp_path.glob("ppo-*.json"))[0].unlink()
    against_ppo.ppo_performance(task(), 2, 2, 2, config, "test", tmp_path)
    assert len(trained) == 5


@pytest.mark.slow
def test_quick_reproduction_of_mfrl(tmp_path, monkeypatch):
    """The whole experiment at its --quick sizes: the results validate, the verdicts are the rule's, PPO's numbers
    are in extra, the figures exist and the environment samples of both phases are counted."""
    assert "mfrl" in REPRODUCIBLE
    monkeypatch.chdir(tmp_path)
    options = ReproduceOptions(quick=True, meta_seeds=2, jobs=2, out_dir=tmp_path / "out")
    document = reproduce(experiment("mfrl"), options, Console(quiet=True))
    validate_results(document, "mfrl")
    assert document["verdict"] in VERDICTS
    assert (tmp_path / "out" / "figure.png").is_file() and (tmp_path / "out" / "samples.png").is_file()
    samples = document["environment_samples"]
    assert samples["meta_train"] > 0 and samples["meta_test"] > 0
    reacher, ant, *transfer = document["comparisons"]
    assert [len(t["extra"]["hidden"]) for t in transfer] == [1, 3, 4]
    for row in (reacher, ant):
        ppo = row["extra"]["ppo"]
        assert row["verdict"]["verdict"] in VERDICTS and "likelihood_verdict" in row["extra"]
        assert ppo["samples_per_update"]["ppo"] >= 2048 and ppo["config"]["normalize_obs"]
        assert len(ppo["lr_check"]["scores"]) == 3
        assert set(ppo["samples_to_80pct"]) >= {"learned", "ppo", "ratio_ppo_over_learned"}


@pytest.mark.slow
def test_quick_reproduction_of_beyond_reacher(tmp_path, monkeypatch):
    """The reward-input losses against PPO at --quick sizes, frozen and adapting online: both rows carry PPO's
    numbers; the adapting row's learned losses adapted, and its sample axis counts each φ update's rollout."""
    from ml3cli.experiments.beyond_reacher import ADAPTATION

    monkeypatch.chdir(tmp_path)
    options = ReproduceOptions(quick=True, meta_seeds=2, jobs=2, out_dir=tmp_path / "out")
    document = reproduce(experiment("beyond_reacher"), options, Console(quiet=True))
    validate_results(document, "beyond_reacher")
    frozen, adapting = document["comparisons"]
    assert "adaptation" not in frozen["extra"] and adapting["extra"]["adaptation"] == ADAPTATION.record()
    assert all("likelihood_verdict" in row["extra"] for row in (frozen, adapting))
    per_update = frozen["extra"]["ppo"]["samples_per_update"]["learned"]
    steps = frozen["steps"]
    assert frozen["extra"]["ppo"]["budget_samples"]["learned"] == steps * per_update
    assert steps // ADAPTATION.every >= 1  # φ did adapt
    rollout = 4 * 50  # the recipe's task_loss_episodes × horizon: one validation rollout per φ update
    assert (
        adapting["extra"]["ppo"]["budget_samples"]["learned"]
        == steps * per_update + steps // ADAPTATION.every * rollout
    )
