"""The paired confidence intervals of `ml3 compare`: Student-t quantiles from scipy, equal to the printed table
they replace, and scipy kept out of `import ml3cli`."""

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
