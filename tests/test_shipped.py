"""The losses and recipes shipped with the package: every shipped loss loads, matches its index, and (for the fast
tasks) still beats its baseline on held-out tasks; the builder records what it built; recipes resolve by name.

A change to a task, the engine or the artifact format that breaks a shipped loss fails here.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import yaml
from helpers import REPO, run_main
from rich.console import Console

from ml3cli import load_loss, read_info, shipped
from ml3cli.errors import ML3Error
from ml3cli.evaluate import evaluate
from ml3cli.losses import make_test_task, recorded_test_settings, resolve_losses
from ml3cli.recipes import PACKAGED_RECIPES, find_recipe, load_recipe, packaged_recipes, summarize_recipe

INDEX = shipped.read_index()
NAMES = list(INDEX)

#: shipped losses whose held-out check takes a second or two (the MNIST one needs a minute: `pytest -m slow`)
FAST = {"sine", "sine_reference", "shaped_sine"}
#: the held-out check: a seed none of the recipes' meta-tests used, a few tasks per seed
HELD_OUT_SEED, HELD_OUT_TASKS, HELD_OUT_SEEDS = 1000, 4, 2


def test_the_package_ships_a_loss_of_every_experiment():
    """One per recipe the results page names, seed 0 of its full run (the Sawyer inverse-dynamics losses do not ship:
    they lose to torque MSE)."""
    assert set(NAMES) == {
        *("sine", "sine_reference", "shaped_sine", "mnist_binary", "inverse_dynamics_reacher"),
        *("mbrl_pointmass", "mbrl_reacher", "mfrl_reacher", "mfrl_ant_small"),
        *("mountain_car_shaped", "mountain_car", "reacher_demos"),
    }


def test_the_index_lists_exactly_the_files_in_the_folder():
    files = {p.name for p in shipped.SHIPPED_LOSSES.iterdir() if p.name != shipped.INDEX_NAME}
    assert files == {entry["file"] for entry in INDEX.values()}


@pytest.mark.parametrize("name", NAMES)
def test_each_shipped_loss_loads_and_matches_its_index(name):
    """The file's SHA-256 is the index's; it loads by name; the index's task, inputs, provenance and headline are
    the artifact's own; it is tens of kilobytes at most."""
    entry = INDEX[name]
    path = shipped.SHIPPED_LOSSES / entry["file"]
    assert shipped.file_sha256(path) == entry["sha256"]
    assert path.stat().st_size == entry["bytes"] < 128 * 1024  # tens of kilobytes at most (the demos loss: 74 KB)
    loss_fn = load_loss(name)
    info = loss_fn.info
    assert (info["task"], info["test_task"], info["seed"]) == (entry["task"], entry["test_task"], entry["seed"])
    assert entry["inputs"].startswith(", ".join(i.name for i in loss_fn.inputs))
    assert info["recipe"]["name"] == entry["recipe"]
    assert re.fullmatch(r"[0-9a-f]{40}", info["commit"] or ""), "built from a committed, clean tree"
    assert entry["commit"] == info["commit"]
    test = info["metrics"]["meta_test"]
    assert entry["headline"]["learned"] == test["final"]["learned"]
    assert entry["headline"]["baseline_value"] == test["final"][entry["headline"]["baseline"]]
    # it was built from the packaged recipe with the recorded overrides and seed, and the recipe has not changed
    # since (fields added to recipes later are left out of the comparison)
    packaged = load_recipe(packaged_recipes()[entry["recipe"]], entry["overrides"], seed=entry["seed"])
    assert differences(info["recipe"], packaged.model_dump(mode="json")) == [], f"rebuild: ml3 losses --build {name}"


def differences(recorded: object, current: object, where: str = "") -> list[str]:
    """The fields of ``recorded`` whose value in ``current`` differs (fields only in ``current`` are ignored)."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return [d for key, value in recorded.items() for d in differences(value, current.get(key), f"{where}.{key}")]
    return [] if recorded == current else [f"{where}: {recorded!r} → {current!r}"]


def held_out_finals(name: str) -> tuple[float, float, str]:
    """Mean final metric of the shipped loss and of its baseline at the same lr, on a held-out meta-test."""
    info = read_info(name)
    test = info["test_task"]
    recorded = recorded_test_settings([info], test)
    task = make_test_task(test, recorded, [])
    baseline = info["metrics"]["meta_test"]["baseline"]
    losses = [r.named for r in resolve_losses([name, baseline], task, recorded.lr, torch.device("cpu"))]
    assert losses[0].lr == losses[1].lr == INDEX[name]["headline"]["lr"]
    steps = info["recipe"]["meta_test"]["steps"]
    learned, base = evaluate(task, losses, HELD_OUT_TASKS, HELD_OUT_SEEDS, steps, HELD_OUT_SEED)
    return float(learned.at(steps).mean()), float(base.at(steps).mean()), baseline


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in FAST else [pytest.mark.slow]) for n in NAMES])
def test_shipped_loss_still_beats_its_baseline_on_held_out_tasks(name):
    learned, base, baseline = held_out_finals(name)
    assert learned < base, f"{name}: learned {learned:.4g} vs {baseline} {base:.4g} (same lr, held-out seed)"


def test_a_damaged_shipped_file_is_refused(tmp_path):
    folder = tmp_path / "losses"
    shutil.copytree(shipped.SHIPPED_LOSSES, folder)
    path = folder / INDEX["sine"]["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ML3Error, match="does not match the SHA-256"):
        shipped.shipped_path("sine", folder)
    path.unlink()
    with pytest.raises(ML3Error, match="is missing"):
        shipped.shipped_path("sine", folder)
    assert shipped.shipped_path("no_such_loss", folder) is None


def test_a_builtin_name_wins_over_a_shipped_loss_of_that_name(tmp_path, monkeypatch):
    """A shipped loss named `mse` (planted in a tmp folder) is not what `--loss mse` means on a task whose
    hand-written loss is mse; on a task without such a loss the shipped one is used."""
    from ml3cli.losses import LossSpec
    from ml3cli.tasks import make_task

    folder = tmp_path / "losses"
    folder.mkdir()
    shutil.copy(shipped.SHIPPED_LOSSES / "sine.safetensors", folder / "mse.safetensors")
    entry = dict(INDEX["sine"], name="mse", file="mse.safetensors")
    (folder / shipped.INDEX_NAME).write_text(shipped.index_document({"mse": entry}))
    monkeypatch.setattr(shipped, "SHIPPED_LOSSES", folder)
    monkeypatch.chdir(tmp_path)
    task = make_task("sine_shifted", {"points": 8, "query_points": 8})
    resolved = LossSpec("mse").resolve(task, None, torch.device("cpu"))
    assert resolved.builtin == "mse" and resolved.module is None
    assert LossSpec("mse").artifact_path("sine_shifted") is None
    assert LossSpec("mse").artifact_path(None) == folder / "mse.safetensors"  # no task: no built-in to win
    assert load_loss("mse").info["task"] == "sine"  # outside a task, the name is the shipped loss


def test_meta_train_records_the_commit_of_its_source(tmp_path):
    """The commit is the checkout's HEAD (`-dirty` with uncommitted changes to tracked files); outside a
    checkout, or in a folder inside another repository's tree, there is none."""
    import subprocess

    from ml3cli.commands.meta_train import source_commit

    assert source_commit(tmp_path) is None
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert source_commit(repo) == head
    assert source_commit(repo / "sub") is None
    (repo / "a.txt").write_text("2")
    assert source_commit(repo) == head + "-dirty"
    if (REPO / ".git").exists():  # this checkout (CI runs on a clone)
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", source_commit() or "")


def test_the_builder_records_what_it_built(tmp_path):
    """`ml3 losses --build NAME` (here into a tmp folder, tiny): the artifact lands in the folder, the index holds
    its SHA-256, recipe, overrides, seed, tasks, inputs and headline; a second loss keeps the first."""
    from ml3cli.commands.losses import build

    tiny = ["outer.steps=2", "meta_test.tasks=1", "meta_test.seeds=1", "meta_test.steps=3"]
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)  # noqa: SIM115
    folder = tmp_path / "losses"
    folder.mkdir()
    entry = build("sine_reference", console, folder, overrides=tiny)
    build("sine", console, folder, overrides=tiny)
    index = shipped.read_index(folder)
    assert list(index) == ["sine", "sine_reference"] and index["sine_reference"] == entry
    path = folder / "sine_reference.safetensors"
    assert entry["sha256"] == shipped.file_sha256(path) and shipped.shipped_path("sine_reference", folder) == path
    assert (entry["recipe"], entry["overrides"], entry["seed"]) == ("sine_reference", tiny, 0)
    assert (entry["task"], entry["test_task"], entry["inputs"]) == ("sine", "sine_shifted", "y_pred, y_true")
    assert entry["headline"]["steps"] == 3 and entry["headline"]["baseline"] == "mse"
    assert entry["command"] == "ml3 meta-train sine_reference --seed 0 " + " ".join(f"--set {t}" for t in tiny)
    assert "commit" in read_info(path) and sorted(p.name for p in folder.iterdir()) == [
        "index.json",
        "sine.safetensors",
        "sine_reference.safetensors",
    ]
    with pytest.raises(ML3Error, match="neither a shipped loss"):
        build("no_such_recipe", console, folder)


def test_an_existing_artifact_ships_only_if_it_was_meta_trained_by_the_same_recipe(tmp_path):
    """`ml3 losses --build NAME --from ARTIFACT` copies the artifact bit for bit when its recipe and seed are those the
    build would use (a reproduce run's seed 0), and refuses one meta-trained with other settings, naming them."""
    from ml3cli.commands.losses import build

    tiny = ["outer.steps=2", "meta_test.tasks=1", "meta_test.seeds=1", "meta_test.steps=3"]
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)  # noqa: SIM115
    made = tmp_path / "made"
    made.mkdir()
    build("sine_reference", console, made, overrides=tiny)
    artifact = made / "sine_reference.safetensors"
    folder = tmp_path / "losses"
    folder.mkdir()
    entry = build("sine_reference", console, folder, overrides=tiny, source=artifact)
    assert (folder / "sine_reference.safetensors").read_bytes() == artifact.read_bytes()
    assert entry["sha256"] == shipped.file_sha256(artifact) and entry["seed"] == 0
    with pytest.raises(ML3Error, match=r"another recipe.*outer"):
        build("sine_reference", console, folder, overrides=[*tiny[:0], "outer.steps=3", *tiny[1:]], source=artifact)
    with pytest.raises(ML3Error, match="no such file"):
        build("sine_reference", console, folder, overrides=tiny, source=tmp_path / "missing.safetensors")


# -- recipes by name ------------------------------------------------------------------------------------------
def test_every_recipe_is_packaged_under_its_own_name():
    """No recipe is left in the top-level recipes/ folder (it would not be installed), and each packaged file's
    stem is its `name` (so `ml3 meta-train NAME` writes artifacts/NAME.safetensors)."""
    assert not list((REPO / "recipes").glob("*.y*ml"))
    recipes = packaged_recipes()
    assert {"sine", "sine_reference", "shaped_sine", "mnist_binary"} <= set(recipes)
    for name, path in recipes.items():
        assert path.parent == PACKAGED_RECIPES
        assert yaml.safe_load(path.read_text())["name"] == name
        assert summarize_recipe(path).description  # a header comment to describe it


def test_a_recipe_argument_is_a_file_a_name_or_recipes_NAME_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sine = PACKAGED_RECIPES / "sine.yaml"
    assert find_recipe("sine") == sine
    assert find_recipe("recipes/sine.yaml") == sine  # the README's spelling, from any folder
    assert find_recipe(tmp_path / "elsewhere" / "recipes" / "sine.yaml") == sine
    own = tmp_path / "recipes" / "sine.yaml"  # an edited copy wins over the packaged recipe
    own.parent.mkdir()
    own.write_text(sine.read_text())
    assert find_recipe("recipes/sine.yaml").resolve() == own
    (tmp_path / "sine").write_text("name: x\n")  # so does a file named like a recipe
    assert find_recipe("sine").resolve() == tmp_path / "sine"
    with pytest.raises(ML3Error, match=r"unknown recipe 'sin'.*did you mean 'sine'\?.*sine_reference"):
        find_recipe("sin")
    with pytest.raises(
        ML3Error, match=r"recipe file not found: other/sine_refrence.yaml; did you mean 'sine_reference'"
    ):
        find_recipe("other/sine_refrence.yaml")


def test_ml3_recipes_lists_the_packaged_recipes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "250")
    result = run_main(monkeypatch, capsys, "recipes", cwd=tmp_path)
    assert result.code == 0, result.output
    for name in packaged_recipes():
        assert name in result.stdout
    assert "Sine regression as in the paper" in result.stdout and "sine → sine_shifted" in result.stdout
    assert "6,000" in result.stdout  # shaped_sine's outer steps


def test_ml3_losses_lists_the_shipped_losses(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "300")
    result = run_main(monkeypatch, capsys, "losses", cwd=tmp_path)
    assert result.code == 0, result.output
    for name, entry in INDEX.items():
        line = next(line for line in result.stdout.splitlines() if line.strip("│ ").startswith(name + " "))
        assert entry["inputs"] in line and entry["meta_trained_for"] in line and shipped.headline(entry) in line
    assert json.loads((shipped.SHIPPED_LOSSES / shipped.INDEX_NAME).read_text())["format"] == shipped.INDEX_FORMAT
