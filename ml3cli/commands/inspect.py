"""``ml3 inspect ARTIFACT``: what an artifact is (task, inputs, architecture, recipe, metrics), after the same
checks a load does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from ml3cli import artifacts
from ml3cli.commands.output import fmt


def run(path: str | Path, console: Console, as_json: bool = False) -> dict[str, Any]:
    """Print the artifact's metadata (as JSON with ``as_json``) and return it."""
    module = artifacts.load_loss(path)
    info = module.info
    if as_json:
        console.print_json(json.dumps(info))
        return info
    arch = info["architecture"]
    inputs = ", ".join(f"{i['name']}[{i['size']}]" for i in arch["inputs"])
    n_params = sum(p.numel() for p in module.parameters())
    console.print(f"[bold]{path}[/]  (ml3 {info['ml3_version']}, torch {info['torch_version']}, {info['created']})")
    commit = f"   commit: {info['commit']}" if info.get("commit") else ""
    console.print(f"task: {info['task']}   meta-test task: {info['test_task']}   seed: {info['seed']}{commit}")
    console.print(f"inputs: ({inputs}) → M_φ per row, summed over class axes, mean over samples")
    console.print(
        f"meta-loss: MLP {arch['hidden']} {arch['activation']}, bias={arch['bias']}, output {arch['output']}; "
        f"{n_params} parameters" + ("; also outputs the inner learning rate (learned_lr)" if arch["learned_lr"] else "")
    )
    metrics = info.get("metrics", {})
    if "meta_test" in metrics:
        mt = metrics["meta_test"]
        finals = ", ".join(f"{k} {fmt(v)}" for k, v in mt["final"].items())
        console.print(f"meta-test {mt['task']} after {mt['steps']} steps ({mt['metric']}): {finals}")
    if "meta_train" in metrics:
        finals = ", ".join(f"{k} {fmt(v)}" for k, v in metrics["meta_train"].items())
        console.print(f"meta-train: {finals}")
    if info["recipe"]:
        console.print("recipe:")
        console.print(yaml.safe_dump(info["recipe"], sort_keys=False).rstrip(), markup=False, highlight=False)
    return info
