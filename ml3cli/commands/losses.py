"""``ml3 losses``: the learned losses shipped with the package; ``ml3 losses --build NAME`` meta-trains one again.

Listing reads only ``ml3cli/data/losses/index.json`` (no torch). Building is for maintainers: it meta-trains the
loss from its packaged recipe at the settings the index records (a new NAME: the packaged recipe NAME at its
defaults), exactly as ``ml3 meta-train RECIPE --seed S --out …`` would, copies the artifact into the package and
records its provenance, headline metric and SHA-256 in the index. Commit both files afterwards.
"""

from __future__ import annotations

import math
import shlex
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ml3cli import artifacts, files, shipped
from ml3cli.errors import ML3Error
from ml3cli.recipes import load_recipe, packaged_recipes, recipe_to_dict, summarize_recipe
from ml3cli.shipped import INDEX_NAME, file_sha256, headline, index_document, read_index, tasks_label


def run(console: Console, folder: Path | None = None) -> dict[str, dict[str, Any]]:
    """One row per shipped loss: name, meta-train → meta-test task, loss inputs, what it was meta-trained for,
    its headline metric at the recipe's meta-test."""
    entries = read_index(folder)
    table = Table(title=f"shipped losses ({len(entries)})", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("task → meta-test", no_wrap=True)
    table.add_column("inputs")
    table.add_column("meta-trained for")
    table.add_column("headline (learned vs baseline, same lr)")
    for name, entry in entries.items():
        table.add_row(name, tasks_label(entry), entry["inputs"], entry["meta_trained_for"], headline(entry))
    console.print(table)
    console.print(
        'use one by name: `ml3 meta-test --loss sine --task sine_shifted`, `load_loss("sine")` in Python; '
        "`ml3 inspect NAME` shows its recipe; rebuild with `ml3 losses --build NAME`",
        soft_wrap=True,
    )
    return entries


def build(
    name: str,
    console: Console,
    folder: Path | None = None,
    overrides: Sequence[str] | None = None,
    source: Path | None = None,
) -> dict[str, Any]:
    """Meta-train the shipped loss ``name`` and record it in ``folder``'s index; return its index entry.

    The recipe, seed and ``--set`` overrides are the index's for a known ``name``; a new ``name`` must be a packaged
    recipe, used at its defaults (``overrides`` replaces the recorded ones, e.g. to build a tiny one in a test).
    With ``source``, that artifact is shipped instead of meta-training again, if it records exactly the recipe
    (and seed) that meta-training would use: a full ``ml3 reproduce`` run's seed-0 artifact, for instance.
    """
    folder = folder or shipped.SHIPPED_LOSSES
    entries = read_index(folder)
    known = entries.get(name)
    recipe_name = known["recipe"] if known else name
    seed = known["seed"] if known else None
    overrides = list(overrides if overrides is not None else (known or {}).get("overrides", []))
    packaged = packaged_recipes()
    if recipe_name not in packaged:
        raise ML3Error(
            f"--build {name!r}: neither a shipped loss ({', '.join(entries) or 'none yet'}) nor a packaged recipe "
            "(`ml3 recipes` lists them)"
        )
    recipe = load_recipe(packaged[recipe_name], overrides, seed=seed)
    target = folder / f"{name}.safetensors"
    command = ["ml3", "meta-train", recipe_name, "--seed", str(recipe.seed)]
    command += [word for item in overrides for word in ("--set", item)]
    console.print(f"building shipped loss {name!r}: {shlex.join(command)} (then copied to {target})")

    if source is not None:
        return ship_existing(name, source, recipe, recipe_name, overrides, command, target, folder, entries, console)

    from ml3cli.commands.meta_train import run_meta_train  # the heavy imports only when building

    with tempfile.TemporaryDirectory(prefix="ml3-shipped-") as tmp:
        started = time.perf_counter()
        written = run_meta_train(recipe, Path(tmp) / f"{name}.safetensors", console, quiet=True)
        wall = time.perf_counter() - started
        files.write_bytes_atomic(target, written.read_bytes())
    info = artifacts.read_info(target)
    entry = index_entry(name, recipe_name, overrides, info, target, wall, command)
    entries[name] = entry
    files.write_text_atomic(folder / INDEX_NAME, index_document(entries))
    console.print(
        f"shipped {name}: {entry['bytes']:,} bytes, sha256 {entry['sha256'][:12]}…, meta-train "
        f"{entry['meta_train_seconds']:.1f} s ({wall:.1f} s with the meta-test); {headline(entry)}"
    )
    console.print(f"wrote {target} and {folder / INDEX_NAME}: commit both")
    return entry


def ship_existing(
    name: str,
    source: Path,
    recipe: Any,
    recipe_name: str,
    overrides: Sequence[str],
    command: Sequence[str],
    target: Path,
    folder: Path,
    entries: dict[str, dict[str, Any]],
    console: Console,
) -> dict[str, Any]:
    """Ship ``source`` as ``name`` after checking that it was meta-trained by ``recipe`` (output path aside)."""
    if not source.is_file():
        raise ML3Error(f"--from {source}: no such file")
    info = artifacts.read_info(source)  # checks the format and φ's checksum
    recorded, expected = dict(info["recipe"]), recipe_to_dict(recipe)
    recorded.pop("artifact", None)
    expected.pop("artifact", None)
    if recorded != expected:
        differ = sorted(k for k in expected.keys() | recorded.keys() if recorded.get(k) != expected.get(k))
        raise ML3Error(
            f"--from {source}: meta-trained by another recipe than {shlex.join(command)} "
            f"(differs in: {', '.join(differ)}); ship an artifact of that exact recipe and seed"
        )
    files.write_bytes_atomic(target, source.read_bytes())
    entry = index_entry(name, recipe_name, overrides, artifacts.read_info(target), target, math.nan, command)
    entry["wall_seconds"] = None  # not measured here: the artifact came from another run
    entries[name] = entry
    files.write_text_atomic(folder / INDEX_NAME, index_document(entries))
    console.print(
        f"shipped {name} from {source}: {entry['bytes']:,} bytes, sha256 {entry['sha256'][:12]}…; {headline(entry)}"
    )
    console.print(f"wrote {target} and {folder / INDEX_NAME}: commit both")
    return entry


def index_entry(
    name: str,
    recipe_name: str,
    overrides: Sequence[str],
    info: dict[str, Any],
    path: Path,
    wall_seconds: float,
    command: Sequence[str],
) -> dict[str, Any]:
    """The index's record of one shipped loss, from the artifact's metadata."""
    recipe = info["recipe"]
    inner = recipe["inner"]
    horizon = inner.get("reset_every") or inner["steps"]
    test = info["metrics"]["meta_test"]
    inputs = info["architecture"]["inputs"]
    groups = inputs[0].get("groups") or []
    inputs_text = ", ".join(i["name"] for i in inputs) + (f" (per {', '.join(groups)})" if groups else "")
    return {
        "name": name,
        "file": path.name,
        "sha256": file_sha256(path),
        "bytes": path.stat().st_size,
        "recipe": recipe_name,
        "overrides": list(overrides),
        "seed": info["seed"],
        "commit": info.get("commit"),
        "created": info["created"],
        "command": shlex.join(command),
        "task": info["task"],
        "test_task": info["test_task"],
        "inputs": inputs_text,
        "about": summarize_recipe(packaged_recipes()[recipe_name]).description,
        "meta_trained_for": f"plain SGD at lr {inner['lr']:g}, "
        + ("one step" if horizon == 1 else f"the first {horizon} steps")
        + f" from a fresh θ on {info['task']}",
        "meta_train_seconds": info["metrics"]["meta_train_seconds"],
        "wall_seconds": round(wall_seconds, 1),
        "headline": {
            "task": test["task"],
            "metric": test["metric"],
            "steps": test["steps"],
            "tasks": test["tasks"],
            "seeds": test["seeds"],
            "lr": recipe["meta_test"].get("lr") or inner["lr"],
            "learned": test["final"]["learned"],
            "baseline": test["baseline"],
            "baseline_value": test["final"][test["baseline"]],
        },
    }
