"""``ml3 inspect ARTIFACT``: what an artifact is (task, inputs, architecture, recipe, metrics), after the checks a
load does that need no tensors (sizes, format, metadata, checksum); it reads the file without torch, so it answers
at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from ml3cli import artifacts
from ml3cli.commands.output import fmt
from ml3cli.commands.runs import write_json


def run(path: str | Path, console: Console, json_path: str | Path | None = None) -> dict[str, Any]:
    """Print the artifact's metadata and return it; with ``json_path`` write it as JSON there instead (``-``:
    standard output)."""
    verified, n_params = artifacts.verified_info(path)
    info = {k: v for k, v in verified.items() if not k.startswith("_")}
    if json_path is not None:
        written = write_json(Path(json_path), info)
        if written is not None:
            console.print(f"wrote {written}")
        return info
    arch = info["architecture"]
    inputs = ", ".join(f"{i['name']}[{i['size']}]" for i in arch["inputs"])
    console.print(f"[bold]{path}[/]  (ml3 {info['ml3_version']}, torch {info['torch_version']}, {info['created']})")
    commit = f"   commit: {info['commit']}" if info.get("commit") else ""
    console.print(f"task: {info['task']}   meta-test task: {info['test_task']}   seed: {info['seed']}{commit}")
    console.print(f"inputs: ({inputs}) → M_φ per row, summed over class axes, mean over samples")
    console.print(
        f"meta-loss: MLP {arch['hidden']} {arch['activation']}, bias={arch['bias']}, output {arch['output']}; "
        f"{n_params} parameters" + ("; also outputs the inner learning rate (learned_lr)" if arch["learned_lr"] else "")
    )
    console.print(f"checksum: verified; it covers the {artifacts.file_integrity(verified)}")
    metrics = info.get("metrics", {})
    mt = metrics.get("meta_test")
    if isinstance(mt, dict):  # an artifact saved from user code may record only part of it, or none
        finals = ", ".join(f"{k} {fmt(v)}" for k, v in mt.get("final", {}).items())
        console.print(
            f"meta-test {mt.get('task', info['test_task'])} after {mt.get('steps', '?')} steps "
            f"({mt.get('metric', 'metric')}): {finals}"
        )
        ratio = mt.get("step_size_ratio")
        if isinstance(ratio, dict) and all(isinstance(ratio.get(k), (int, float)) for k in ("mean", "low", "high")):
            console.print(
                f"its steps along the meta-test: {fmt(ratio['mean'])}× {mt.get('baseline', 'the baseline')}'s at "
                f"the same rate (10–90%: {fmt(ratio['low'])}–{fmt(ratio['high'])}); a win at one shared rate is "
                "partly this step size"
            )
    if "meta_train" in metrics:
        finals = ", ".join(f"{k} {fmt(v)}" for k, v in metrics["meta_train"].items())
        console.print(f"meta-train: {finals}")
    if info["recipe"]:
        console.print("recipe:")
        console.print(yaml.safe_dump(info["recipe"], sort_keys=False).rstrip(), markup=False, highlight=False)
    return info
