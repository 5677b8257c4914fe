"""The paired confidence intervals of `ml3 compare` and `ml3 reproduce`: Student-t quantiles from scipy, equal to
the printed table they replace, scipy kept out of `import ml3cli`, and the intervals and the steps to a threshold
against numbers worked out by hand."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from ml3cli.evaluate import LossCurves, paired_difference, t_quantile_975

#: the hand-written table of t_{0.975, df}, df = 1 … 30, that the intervals used before scipy.
OLD_TABLE = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
             2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
             2.045, 2.042]  # fmt: skip


def test_quantiles_agree_with_the_old_table():
    """Rounded to the table's three decimals, scipy's quantile is the table's entry for every df it covered."""
    assert [round(t_quantile_975(df), 3) for df in range(1, 31)] == OLD_TABLE


def test_quantiles_beyond_the_table_approach_the_normal():
    """Above df = 30 the quantile keeps falling towards the normal 1.95996… (the table used 1.96 flat)."""
    values = [t_quantile_975(df) for df in (31, 60, 10**6)]
    assert values == sorted(values, reverse=True)
    assert 2.03 < values[0] < 2.042 and abs(values[-1] - 1.959964) < 1e-5
    with pytest.raises(ValueError, match="at least 1 degree of freedom"):
        t_quantile_975(0)


def curves(label: str, finals: list[float]) -> LossCurves:
    """Curves whose per-seed mean at step 1 is ``finals`` (one task, two steps)."""
    values = np.array([[[1.0, v]] for v in finals])  # [seeds, tasks, steps + 1]
    return LossCurves(label, 1e-3, "builtin", values)


@pytest.mark.parametrize("seeds", [2, 5, 10, 30])
def test_interval_matches_the_table_at_printed_precision(seeds):
    """The interval of a paired difference is the table's to the three decimals the reports print."""
    rng = np.random.default_rng(seeds)
    reference = rng.uniform(0.1, 1.0, seeds)
    other = reference + rng.normal(0.05, 0.02, seeds)
    d = paired_difference(curves("a", list(reference)), curves("b", list(other)), 1)
    diff = other - reference
    half = OLD_TABLE[seeds - 2] * diff.std(ddof=1) / math.sqrt(seeds)
    assert d.seeds == seeds and d.mean == pytest.approx(diff.mean())
    assert round(d.low, 3) == round(diff.mean() - half, 3)
    assert round(d.high, 3) == round(diff.mean() + half, 3)
    assert d.low == pytest.approx(diff.mean() - half, rel=1e-3)


def test_one_seed_has_no_interval():
    d = paired_difference(curves("a", [0.5]), curves("b", [0.7]), 1)
    assert d.mean == pytest.approx(0.2) and math.isnan(d.low) and math.isnan(d.high)


def test_import_ml3cli_does_not_load_scipy():
    """scipy is imported only where an interval is computed; loading a loss does not pay for it."""
    code = "import sys, ml3cli; ml3cli.load_loss; print('scipy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


# -- the intervals and thresholds, against numbers worked out by hand ------------------------------------------
#: t_{0.975, df} to 16 digits (R's qt(0.975, df)), written out so that a quantile one degree of freedom off fails
T975 = {4: 2.7764451051977987, 5: 2.5705818356363146}


def test_paired_difference_by_hand():
    """5 seeds, other − reference = 0, 1, 2, 3, 4: mean 2, sample variance (4+1+0+1+4)/4 = 2.5, half-width
    t_{0.975, 4}·√(2.5/5); the reference is better (lower) on the 4 seeds where the difference is positive."""
    d = paired_difference(curves("ref", [1.0] * 5), curves("other", [1.0, 2.0, 3.0, 4.0, 5.0]), 1)
    half = T975[4] * math.sqrt(2.5 / 5)
    assert (d.reference, d.other, d.seeds, d.reference_wins) == ("ref", "other", 5, 4)
    assert d.mean == pytest.approx(2.0, rel=1e-12)
    assert d.low == pytest.approx(2.0 - half, rel=1e-12) and d.high == pytest.approx(2.0 + half, rel=1e-12)


def test_paired_of_by_hand():
    """learned[m, s] − baseline[s] over 2 meta-train × 3 test seeds = 0 … 5 (n = 6 pairs, df = 5): mean 2.5,
    sample variance (6.25+2.25+0.25+0.25+2.25+6.25)/5 = 3.5, half-width t_{0.975, 5}·√(3.5/6). A baseline per
    meta-train seed (2-D) is paired element by element."""
    from ml3cli.experiments.protocol import Paired

    learned = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    half = T975[5] * math.sqrt(3.5 / 6)
    for baseline in (np.array([1.0, 1.0, 1.0]), np.ones((2, 3))):
        p = Paired.of(learned, baseline)
        assert (p.pairs, p.learned_better_on) == (6, 0)
        assert p.mean == pytest.approx(2.5, rel=1e-12)
        assert p.low == pytest.approx(2.5 - half, rel=1e-12) and p.high == pytest.approx(2.5 + half, rel=1e-12)
    # learned − baseline = −1, −2, −3, −4, −5, +1: the learned loss is better (lower) on 5 pairs, mean −14/6
    p = Paired.of(np.full((2, 3), 4.0), np.array([[5.0, 6.0, 7.0], [8.0, 9.0, 3.0]]))
    assert (p.learned_better_on, p.mean) == (5, pytest.approx(-14 / 6, rel=1e-12))
    one = Paired.of(np.array([[1.0]]), np.array([3.0]))
    assert one.mean == -2.0 and math.isnan(one.low) and math.isnan(one.high)


def test_steps_to_threshold_by_hand():
    """Per seed, the first step whose mean over the test tasks is at or below the threshold (None: never)."""
    values = np.array(
        [
            [[4.0, 3.0, 2.0, 1.0], [2.0, 1.0, 0.0, 1.0]],  # seed 0, mean over tasks: 3, 2, 1, 1
            [[4.0, 4.0, 4.0, 2.0], [4.0, 2.0, 1.5, 1.0]],  # seed 1: 4, 3, 2.75, 1.5
        ]
    )
    c = LossCurves("x", 1e-3, "builtin", values)
    assert c.steps_to(1.0) == [2, None]  # at the threshold counts as reaching it
    assert c.steps_to(1.5) == [2, 3]
    assert c.steps_to(3.0) == [0, 1]
    assert c.steps_to(0.5) == [None, None]


def test_metric_at_reads_the_step_asked_for_of_the_task_metric_or_a_report_metric():
    """Per seed, the mean over the test tasks at one step, of the task metric or of a report metric."""
    from ml3cli.evaluate import metric_at

    values = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4)  # [seeds, tasks, steps + 1]
    c = LossCurves("x", 1e-3, "builtin", values, {"accuracy": 100 + values**2})
    assert metric_at(c, 1).tolist() == [5.0, 17.0]  # seed 0: tasks at step 1 are 1, 5, 9
    assert metric_at(c, 2, "accuracy").tolist() == pytest.approx(
        [100 + (4 + 36 + 100) / 3, 100 + (196 + 324 + 484) / 3]
    )
