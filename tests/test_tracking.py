"""Experiment tracking: `ml3 meta-train --log-dir` writes the curves as TensorBoard scalars with the CSV's names."""

from __future__ import annotations

import csv
import sys

import pytest
from helpers import TINY_RECIPE, run_main, write_recipe

pytest.importorskip("tensorboard")  # in the [test] extra, so CI runs these


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series TensorBoard finds in ``folder``: name → [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_log_dir_writes_the_csv_curves_as_tensorboard_scalars(tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE)
    out, logs = tmp_path / "tiny.safetensors", tmp_path / "tb"
    result = run_main(monkeypatch, capsys, "meta-train", recipe, "--out", out, "--log-dir", logs, "-q", cwd=tmp_path)
    assert result.code == 0, result.output
    with out.with_suffix(".curves.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    found = scalars(logs)
    assert set(found) == set(rows[0]) - {"step"}  # the same metric names as the CSV
    for name, series in found.items():
        assert [step for step, _ in series] == [int(row["step"]) for row in rows]
        assert [value for _, value in series] == pytest.approx([float(row[name]) for row in rows], rel=1e-6)


def test_a_missing_tensorboard_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    recipe = write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE)
    args = ("meta-train", recipe, "--out", tmp_path / "t.safetensors", "--log-dir", tmp_path / "tb", "-q")
    result = run_main(monkeypatch, capsys, *args, cwd=tmp_path)
    assert result.code == 2 and "pip install 'ml3cli[tensorboard]'" in result.stderr, result.output
