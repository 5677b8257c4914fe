"""Helpers shared by the tests: tiny recipes and runners for the real ``ml3`` entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[1]
#: the packaged recipes (``recipes/NAME.yaml`` on the command line finds them from any folder)
RECIPES = REPO / "ml3cli" / "data" / "recipes"

#: The smallest recipe that exercises every part of meta-training and meta-test (a fraction of a second).
TINY_RECIPE: dict[str, Any] = {
    "name": "tiny",
    "task": "sine",
    "task_options": {"points": 16, "query_points": 16, "hidden": [8, 8]},
    "seed": 0,
    "device": "cpu",
    "threads": 1,
    "meta_loss": {"hidden": [8, 8], "activation": "relu", "bias": True, "output": "softplus"},
    "inner": {"lr": 1.0e-2, "steps": 1},
    "outer": {"lr": 1.0e-3, "steps": 30, "tasks": 2},
    "task_loss": {"weight": 1.0},
    "meta_test": {
        "task": "sine_shifted",
        "task_options": {"points": 16, "query_points": 16, "hidden": [8, 8]},
        "tasks": 3,
        "seeds": 2,
        "steps": 10,
        "lr": 1.0e-2,
    },
    "log_every": 10,
}


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as a YAML recipe at ``path``."""
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class Result:
    """Exit code and captured streams of one ``ml3`` invocation."""

    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(*args: str | Path, cwd: Path, timeout: float = 240) -> Result:
    """Run ``python -m ml3cli ARGS`` in a subprocess, as the ``ml3`` console script runs.

    ``cwd`` is required (a tmp folder) so that any default output path lands outside the repository.
    """
    env = dict(os.environ, COLUMNS="200", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "ml3cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str | Path, cwd: Path) -> Result:
    """Run ``ml3cli.cli.main()`` in this process with ``sys.argv`` = ``ml3 ARGS``, in the folder ``cwd``.

    Same code path as the console script without the cost of importing torch again.

    An exception other than ``SystemExit`` escapes (the test then fails with it, as a traceback would).
    """
    from ml3cli.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["ml3", *map(str, args)])
    capsys.readouterr()
    code: Any = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return Result(0 if code is None else int(code), out.out, out.err)


def sign(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """``meta`` with the checksum a file of its format version must carry for ``tensors`` and its document (what a
    forger who knows the format would write): the tensors only for version 1, the document too from version 2."""
    from ml3cli import artifacts, metadata

    declared = meta.get("format_version", "")
    version = int(declared) if declared.isascii() and declared.isdigit() and len(declared) < 10 else 2
    meta["sha256"] = metadata.expected_sha256(version, artifacts.tensors_sha256(tensors), meta.get("ml3", ""))
    return meta
