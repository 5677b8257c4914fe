"""Recipes: bad files and bad overrides are refused before any work with a one-line message that names the file
and the field, and the CLI turns them into exit code 2 without a traceback; `--set` really changes the run.

Most CLI cases call ``ml3cli.cli.main()`` in-process (the console script's own code path, see
``helpers.run_main``); a few go through a real subprocess to cover the installed entry point end to end.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import TINY_RECIPE, run_cli, run_main, write_recipe

from ml3cli.artifacts import read_info
from ml3cli.errors import ML3Error
from ml3cli.recipes import apply_overrides, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]


def with_change(dotted: str, value: Any) -> dict[str, Any]:
    """TINY_RECIPE with ``dotted`` set to ``value`` (as if edited by hand in the YAML file)."""
    return apply_overrides(TINY_RECIPE, [f"{dotted}={yaml.safe_dump(value, default_flow_style=True).strip()}"])


def without(key: str) -> dict[str, Any]:
    data = dict(TINY_RECIPE)
    del data[key]
    return data


# (test id, recipe contents, --set overrides, words that the message must contain besides the file name)
BAD_RECIPES = [
    ("unknown key", with_change("outer.lrr", 0.1), [], ["unknown field", "`outer.lrr`"]),
    ("wrong type", with_change("outer.steps", "abc"), [], ["`outer.steps`", "integer", "'abc'"]),
    ("negative lr", with_change("inner.lr", -1), [], ["`inner.lr`", "greater than 0"]),
    ("zero steps", with_change("outer.steps", 0), [], ["`outer.steps`"]),
    ("unknown activation", with_change("meta_loss.activation", "swish"), [], ["`meta_loss.activation`"]),
    ("missing section", without("meta_test"), [], ["missing required field", "`meta_test`"]),
    ("unknown task", with_change("task", "nope"), [], ["field `task`", "unknown task 'nope'", "sine"]),
    ("unknown meta-test task", with_change("meta_test.task", "nope"), [], ["field `meta_test.task`", "'nope'"]),
    ("unknown task option", with_change("task_options.foo", 1), [], ["`task_options.foo`"]),
    (
        "bad meta-test task option",
        with_change("meta_test.task_options.points", -3),
        [],
        ["`meta_test.task_options.points`"],
    ),
    ("unknown baseline", with_change("meta_test.baseline", "hinge"), [], ["`meta_test.baseline`", "hinge"]),
    ("unknown extra term", with_change("task_loss.extra", {"bogus": 1.0}), [], ["`task_loss.extra`", "bogus"]),
    (
        "reset_every not a multiple",
        apply_overrides(TINY_RECIPE, ["inner.steps=2", "inner.reset_every=3"]),
        [],
        ["`inner`", "multiple"],
    ),
    ("set negative lr", TINY_RECIPE, ["outer.lr=-1"], ["`outer.lr`", "greater than 0"]),
    ("set unknown key", TINY_RECIPE, ["outer.lrr=1"], ["`outer.lrr`"]),
    ("set wrong type", TINY_RECIPE, ["outer.steps=abc"], ["`outer.steps`"]),
]
BAD_SETS = [
    ("no equals sign", ["outer.lr"], ["--set 'outer.lr'", "KEY=VALUE"]),
    ("empty key", ["=3"], ["KEY=VALUE"]),
    ("into a scalar", ["name.x=1"], ["`name` is not a section"]),
]


def check_message(message: str, words: list[str], path: Path | None) -> None:
    assert "\n" not in message.strip(), message
    assert "Traceback" not in message
    if path is not None:
        assert str(path) in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def check_cli_error(result, words: list[str], path: Path | None) -> None:
    assert result.code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("error:"), result.stderr
    check_message(result.stderr, words, path)


@pytest.mark.parametrize(("data", "sets", "words"), [c[1:] for c in BAD_RECIPES], ids=[c[0] for c in BAD_RECIPES])
def test_bad_recipe_is_refused_by_the_library(tmp_path, data, sets, words):
    """load_recipe raises ML3Error whose one-line message names the file and the offending field."""
    path = write_recipe(tmp_path / "bad.yaml", data)
    with pytest.raises(ML3Error) as info:
        load_recipe(path, sets)
    check_message(str(info.value), words, path)


@pytest.mark.parametrize(("data", "sets", "words"), [c[1:] for c in BAD_RECIPES], ids=[c[0] for c in BAD_RECIPES])
def test_bad_recipe_exits_2_in_the_cli(tmp_path, monkeypatch, capsys, data, sets, words):
    """`ml3 meta-train bad.yaml` exits 2 with one line on stderr naming the file and field; nothing is written."""
    path = write_recipe(tmp_path / "bad.yaml", data)
    args = ["meta-train", path, "--out", tmp_path / "out.safetensors", "--quiet"]
    for item in sets:
        args += ["--set", item]
    result = run_main(monkeypatch, capsys, *args, cwd=tmp_path)
    check_cli_error(result, words, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


@pytest.mark.parametrize(("sets", "words"), [c[1:] for c in BAD_SETS], ids=[c[0] for c in BAD_SETS])
def test_bad_set_syntax_exits_2(tmp_path, monkeypatch, capsys, sets, words):
    """A malformed `--set` is explained (expected KEY=VALUE, or which part is not a section)."""
    path = write_recipe(tmp_path / "ok.yaml", TINY_RECIPE)
    args = ["meta-train", path, "--out", tmp_path / "out.safetensors", "--quiet"]
    for item in sets:
        args += ["--set", item]
    check_cli_error(run_main(monkeypatch, capsys, *args, cwd=tmp_path), words, None)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("name: [unclosed\n", ["not valid YAML", "line"]),
        ("- just\n- a list\n", ["expected a mapping"]),
        ("", ["expected a mapping"]),
    ],
    ids=["invalid yaml", "top-level list", "empty file"],
)
def test_unparseable_recipe_exits_2(tmp_path, monkeypatch, capsys, content, words):
    path = tmp_path / "broken.yaml"
    path.write_text(content, encoding="utf-8")
    check_cli_error(run_main(monkeypatch, capsys, "meta-train", path, "--quiet", cwd=tmp_path), words, path)


def test_binary_recipe_exits_2(tmp_path, monkeypatch, capsys):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00\x81garbage")
    result = run_main(monkeypatch, capsys, "meta-train", path, "--quiet", cwd=tmp_path)
    check_cli_error(result, ["not a text file"], path)


def test_missing_recipe_file_exits_2_through_the_console_script(tmp_path):
    """The real entry point in a subprocess: a missing recipe file is one line and exit code 2."""
    path = tmp_path / "absent.yaml"
    check_cli_error(run_cli("meta-train", path, "--quiet", cwd=tmp_path), ["recipe file not found"], path)


def test_unknown_key_exits_2_through_the_console_script(tmp_path):
    """The real entry point in a subprocess: an unknown key is one line naming file and field, exit code 2."""
    path = write_recipe(tmp_path / "bad.yaml", with_change("outer.lrr", 0.1))
    result = run_cli("meta-train", path, "--quiet", "--out", tmp_path / "o.safetensors", cwd=tmp_path)
    check_cli_error(result, ["unknown field `outer.lrr`"], path)


# -- overrides that work --------------------------------------------------------------------------------------
def test_set_parses_values_as_yaml(tmp_path):
    """--set values are read as YAML: numbers, lists and booleans arrive typed, and --seed wins over the file."""
    path = write_recipe(tmp_path / "r.yaml", TINY_RECIPE)
    recipe = load_recipe(
        path, ["outer.lr=3e-4", "meta_loss.hidden=[5, 6]", "meta_loss.bias=false", "inner.steps=2"], seed=7
    )
    assert recipe.outer.lr == pytest.approx(3e-4)
    assert recipe.meta_loss.hidden == [5, 6]
    assert recipe.meta_loss.bias is False
    assert recipe.inner.steps == 2
    assert recipe.seed == 7
    assert load_recipe(path).outer.lr == TINY_RECIPE["outer"]["lr"]  # the file itself is unchanged


def test_set_changes_the_recipe_stored_in_the_artifact(tmp_path, monkeypatch, capsys):
    """`ml3 meta-train --set outer.lr=3e-4 --set meta_loss.hidden=[5,5] --seed 4` stores the effective
    recipe (and an architecture that follows it) in the artifact."""
    path = write_recipe(tmp_path / "r.yaml", dict(TINY_RECIPE, outer={"lr": 1e-3, "steps": 3, "tasks": 2}))
    out = tmp_path / "x.safetensors"
    result = run_main(
        monkeypatch, capsys, "meta-train", path, "--out", out, "--quiet",
        "--set", "outer.lr=3e-4", "--set", "meta_loss.hidden=[5,5]", "--seed", "4", cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    info = read_info(out)
    assert info["recipe"]["outer"]["lr"] == pytest.approx(3e-4)
    assert info["recipe"]["meta_loss"]["hidden"] == [5, 5]
    assert info["architecture"]["hidden"] == [5, 5]
    assert info["recipe"]["seed"] == 4 and info["seed"] == 4
    assert recipe_from_dict(info["recipe"]).outer.lr == pytest.approx(3e-4)  # the stored recipe is loadable


@pytest.mark.parametrize("name", ["sine.yaml", "sine_reference.yaml"])
def test_shipped_recipes_are_valid(name):
    """The recipes in recipes/ load and validate."""
    recipe = load_recipe(REPO / "recipes" / name)
    assert recipe.task == "sine" and recipe.meta_test.task == "sine_shifted"


#: phrases of docs/cli.md's table of recipes → the recipe value each states (parsed from the phrase's number)
RECIPE_FACTS: list[tuple[str, Any]] = [
    (r"α = η = ([\d.e-]+)", lambda r, x: r.inner.lr == r.outer.lr == float(x)),
    (r"(\d+) tasks per meta-update", lambda r, x: r.outer.tasks == int(x)),
    (r"(\d+) (?:differentiable )?inner steps per meta-update", lambda r, x: r.inner.steps == int(x)),
    (r"all (\d+) inner steps", lambda r, x: r.inner.steps == r.meta_test.steps == int(x)),
    (r"(?:θ reset|reset) every (\d+)", lambda r, x: r.inner.reset_every == int(x)),
    (r"([\d,]+) outer steps", lambda r, x: r.outer.steps == int(x.replace(",", ""))),
    (r"both networks 2×(\d+)", lambda r, x: r.task_options["hidden"] == r.meta_loss.hidden == [int(x)] * 2),
    (r"meta-loss (\d+)-(\d+)", lambda r, a, b: r.meta_loss.hidden == [int(a), int(b)]),
    (r"optimizee 1→(\d+)→(\d+)→1", lambda r, a, b: r.task_options["hidden"] == [int(a), int(b)]),
    (r"(one) inner step\b", lambda r, _: r.inner.steps == 1),
    (r"x ∈ \[−(\d+), (\d+)\]", lambda r, a, b: r.meta_test.task_options["x_range"] == [-float(a), float(b)]),
    (r"SGD at MSE's tuned rate ([\d.]+)", lambda r, x: r.inner.optimizer != "sgd" or r.inner.lr == float(x)),
    (r"Adam at ([\d.e-]+)", lambda r, x: r.inner.optimizer != "adam" or r.inner.lr == float(x)),
    (r"β = (\d+), γ = (\d+) on the `(\w+)` extra term",
     lambda r, beta, gamma, term: (r.task_loss.weight, r.task_loss.extra) == (float(beta), {term: float(gamma)})),
]  # fmt: skip


def test_the_settings_in_the_table_of_recipes_are_the_recipes_own():
    """Every number docs/cli.md's table of recipes states (outer steps, tasks per meta-update, rates, widths, …)
    is the packaged recipe's, for every recipe the row names."""
    rows = [line for line in (REPO / "docs" / "cli.md").read_text().splitlines() if line.startswith("| `recipes/")]
    checked = 0
    for row in rows:
        names, what = row.split("|")[1], row.split("|")[2]
        recipes = [load_recipe(REPO / "ml3cli" / "data" / "recipes" / f"{name}.yaml")
                   for name in re.findall(r"`recipes/(\w+)\.yaml`", names)]  # fmt: skip
        for pattern, holds in RECIPE_FACTS:
            for found in re.finditer(pattern, what):
                for recipe in recipes:
                    assert holds(recipe, *found.groups()), f"{recipe.name}: {found.group(0)!r} in docs/cli.md"
                    checked += 1
    assert checked >= 15, checked
