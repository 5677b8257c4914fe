"""Shipped losses: small learned-loss artifacts that come with the package, usable by name before any meta-training.

``ml3cli/data/losses/`` holds one ``NAME.safetensors`` per shipped loss and ``index.json``, which records for each
its provenance (recipe, overrides, seed, the git commit it was meta-trained at, the command that rebuilds it), what
it is for (tasks, loss inputs, the SGD learning rate and steps) and its headline metric (learned vs the baseline at
the recipe's meta-test), with the SHA-256 of the file. ``ml3 losses`` lists them; ``--loss sine`` and
``load_loss("sine")`` use them; ``ml3 losses --build NAME`` meta-trains one again (or adds a packaged recipe's).

Torch-free: the index is plain JSON, so that listing the losses is instant.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ml3cli.errors import ML3Error

#: the folder of the shipped losses and their index
SHIPPED_LOSSES = Path(__file__).resolve().parent / "data" / "losses"
INDEX_NAME = "index.json"
INDEX_FORMAT = "ml3-shipped-losses"


def file_sha256(path: Path) -> str:
    """SHA-256 of the file's bytes (what the index records; the artifact's own checksum covers only φ)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_index(folder: Path | None = None) -> dict[str, dict[str, Any]]:
    """Name → index entry of every shipped loss in ``folder`` (default :data:`SHIPPED_LOSSES`), in name order
    (empty when there is no index)."""
    path = (folder or SHIPPED_LOSSES) / INDEX_NAME
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != INDEX_FORMAT:
            raise ValueError(f"format is {document.get('format')!r}, expected {INDEX_FORMAT!r}")
        entries = {str(entry["name"]): entry for entry in document["losses"]}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ML3Error(f"{path}: not a valid index of shipped losses ({err})") from None
    return dict(sorted(entries.items()))


def index_document(entries: dict[str, dict[str, Any]]) -> str:
    """The text of ``index.json`` for ``entries`` (sorted by name, stable key order, one trailing newline)."""
    losses = [entries[name] for name in sorted(entries)]
    return json.dumps({"format": INDEX_FORMAT, "losses": losses}, indent=2, ensure_ascii=False) + "\n"


def shipped_names(folder: Path | None = None) -> list[str]:
    """The names of the shipped losses, in order."""
    return list(read_index(folder))


def shipped_path(name: str, folder: Path | None = None) -> Path | None:
    """The file of the shipped loss ``name`` after checking it against the index's SHA-256; None when no shipped
    loss has that name. A file that is missing or differs from the index is an ML3Error (a damaged install)."""
    entry = read_index(folder).get(name)
    if entry is None:
        return None
    path = (folder or SHIPPED_LOSSES) / entry["file"]
    fix = f"reinstall ml3cli, or rebuild it with `ml3 losses --build {name}`"
    if not path.is_file():
        raise ML3Error(f"shipped loss {name!r}: {path} is missing; {fix}")
    if file_sha256(path) != entry["sha256"]:
        raise ML3Error(f"shipped loss {name!r}: {path} does not match the SHA-256 in {INDEX_NAME}; {fix}")
    return path


def tasks_label(entry: dict[str, Any]) -> str:
    """The entry's meta-train task, and its meta-test task where that differs (``sine → sine_shifted``)."""
    return entry["task"] if entry["task"] == entry["test_task"] else f"{entry['task']} → {entry['test_task']}"


def headline(entry: dict[str, Any]) -> str:
    """One line for the entry's headline metric, e.g. ``mse after 100 steps on sine_shifted: 1.46 vs mse 3.34``."""
    h = entry.get("headline") or {}
    if not h:
        return "—"
    return (
        f"{h['metric']} after {h['steps']} steps on {h['task']}: {_fmt(h['learned'])} "
        f"vs {h['baseline']} {_fmt(h['baseline_value'])}"
    )


def _fmt(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
