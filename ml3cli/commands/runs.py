"""Where a command's results go, and the settings that produced them, as Hydra keeps them.

Without ``--out-dir`` every run of ``meta-test``, ``compare`` and ``landscape`` gets a folder of its own,
``runs/<command>/<task>/<YYYY-MM-DD_HH-MM-SS>/``, so that no run replaces another's results. An ``--out-dir`` (or a
``--json`` file) that already holds results is refused unless ``--overwrite`` is given. Beside the results,
``settings.json`` records the command line, every option's value as used (defaults and what an artifact recorded
filled in) and the versions of ml3, torch, numpy and Python.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from ml3cli import files
from ml3cli.errors import ML3Error

SETTINGS = "settings.json"
#: the value of ``--json`` that writes the JSON to standard output
STDOUT = "-"


def writes_json_to_stdout(path: str | Path | None) -> bool:
    """Whether ``--json`` asks for the JSON on standard output (``--json -``)."""
    return path is not None and str(path) == STDOUT


def check_out_dir(
    out_dir: Path | None, produces: Sequence[str], overwrite: bool, json_path: Path | None = None
) -> None:
    """Refuse, before any work, to replace results: an ``--out-dir`` that holds any of ``produces`` (or
    ``settings.json``), or an existing ``--json`` file, unless ``overwrite``."""
    if overwrite:
        return
    taken = [out_dir / name for name in (*produces, SETTINGS) if out_dir is not None and (out_dir / name).exists()]
    if json_path is not None and not writes_json_to_stdout(json_path) and Path(json_path).exists():
        taken.append(Path(json_path))
    if taken:
        where = f"--out-dir {out_dir} already holds" if out_dir is not None and taken[0].parent == out_dir else "found"
        raise ML3Error(
            f"{where} {', '.join(str(p) for p in taken)} from an earlier run: add --overwrite to replace "
            "them, or choose another --out-dir / --json (without --out-dir every run gets its own folder under runs/)"
        )


@contextlib.contextmanager
def exclusive_outputs(out_dir: Path | None, json_path: Path | None = None) -> Iterator[None]:
    """Hold the ``--out-dir`` folder and the ``--json`` file for this run, so that two runs never write the same
    results: a second one is refused, naming the first (:func:`ml3cli.files.exclusive_output`). A folder of
    ``runs/`` needs no lock: :func:`new_run_dir` gives every run its own."""
    with contextlib.ExitStack() as held:
        if out_dir is not None:
            held.enter_context(files.exclusive_output(Path(out_dir).resolve(), "--out-dir"))
        if json_path is not None and not writes_json_to_stdout(json_path):
            held.enter_context(files.exclusive_output(Path(json_path).resolve(), "--json"))
        yield


def new_run_dir(command: str, task: str, root: Path = Path("runs")) -> Path:
    """A fresh folder ``runs/<command>/<task>/<timestamp>/`` (``…-1``, ``…-2`` when that second is taken),
    created now so that two runs never share it."""
    base = root / command / task / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    folder, n = base, 0
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=False)
            return folder
        except FileExistsError:
            n += 1
            folder = base.with_name(f"{base.name}-{n}")


def versions() -> dict[str, str]:
    """The versions a result depends on (torch's without importing it when no command has)."""
    from importlib import metadata

    import ml3cli

    found = {"ml3": ml3cli.__version__, "python": platform.python_version()}
    for name in ("torch", "numpy"):
        module = sys.modules.get(name)
        try:
            found[name] = module.__version__ if module is not None else metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    found["platform"] = platform.platform()
    return found


def write_settings(folder: Path, command: str, settings: dict[str, Any]) -> Path:
    """``folder/settings.json``: the command line, ``settings`` (every option as used) and :func:`versions`."""
    document = {
        "command": command,
        "argv": ["ml3", *sys.argv[1:]],
        "cwd": str(Path.cwd()),
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "settings": settings,
        "versions": versions(),
    }
    return files.write_json_atomic(folder / SETTINGS, json.loads(json.dumps(document, default=str)))


def write_json(path: Path | None, document: Any) -> Path | None:
    """``--json PATH``: ``document`` to the file, or to standard output for ``--json -``; None: nothing asked."""
    if path is None:
        return None
    if writes_json_to_stdout(path):
        sys.stdout.write(json.dumps(document, indent=2, allow_nan=True) + "\n")
        sys.stdout.flush()
        return None
    return files.write_json_atomic(Path(path), document)


def benchmark_record(name: str) -> dict[str, Any]:
    """What every ``benchmarks/NAME.py --out`` result carries beside its numbers (``ml3 report`` prints it under the
    table): the benchmark, the source commit, the versions, the cores and the load at the end of the run."""
    import os

    from ml3cli.commands.meta_train import source_commit
    from ml3cli.runtime import usable_cores

    return {
        "benchmark": name,
        "commit": source_commit(),
        "versions": versions(),
        "cpus": usable_cores(),
        "machine": platform.machine(),
        "load_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
