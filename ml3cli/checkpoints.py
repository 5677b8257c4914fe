"""Meta-training checkpoints: the full state of the outer loop, so that an interrupted run resumes bit for bit.

:class:`~ml3cli.engine.MetaTrainState` is a plain in-memory record (no file I/O) that the engine captures after an
outer step and restores before the next one. :func:`save_checkpoint` / :func:`load_checkpoint` turn it into a file.

Layout of a checkpoint (``ARTIFACT.checkpoint.safetensors``; never pickle):

* tensors: ``phi/<name>`` (M_φ's state_dict), ``optim/<index>/<key>`` (Adam's per-parameter state),
  ``generator`` (the torch.Generator's state, uint8), ``theta/<name>`` (θ of the current tasks),
  ``inner/<name>`` (the inner optimizer's state beside θ: ``velocity/<θ leaf>`` for momentum, ``m/…``, ``v/…`` and
  ``step`` for Adam, nothing for SGD), ``batch/<field>`` (the current task batch) and ``task/<name>`` (a stateful
  task's state);
* metadata ``format`` = ``ml3-checkpoint``, ``format_version``, ``sha256`` of the tensors and of the JSON document
  (:mod:`ml3cli.metadata`), and ``ml3`` = the JSON document: versions, outer step, ``age``, elapsed seconds,
  curves so far, Adam's param_groups and non-tensor state, the batch's field names, the effective recipe and the
  artifact the run will write.

Written atomically (temp file, fsync, rename) by :func:`ml3cli.files.write_bytes_atomic`, read with the same
bounded-memory checks as loss artifacts.
"""

from __future__ import annotations

import collections
import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from ml3cli import artifacts, files, metadata
from ml3cli.engine import MetaTrainState, build_metaloss, optimizer_for
from ml3cli.errors import ML3Error

FORMAT = "ml3-checkpoint"
FORMAT_VERSION = 2  # 2: the checksum covers the JSON document too (1: the tensors only)
#: recipe fields that may differ between a checkpoint and the run that resumes it (they change no numbers).
RESUMABLE_DIFFERENCES = frozenset({"artifact", "checkpoint_every"})
#: recipe fields added after checkpoints were first written, with the value that a checkpoint without them ran with
ADDED_FIELDS = {"inner": {"optimizer": "sgd", "momentum": 0.9, "betas": [0.9, 0.999], "eps": 1e-8}}


# -- the record as tensors + JSON ----------------------------------------------------------------------------
def state_to_tensors(state: MetaTrainState) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The record as flat safetensors-ready tensors and a JSON-ready document."""
    tensors: dict[str, Tensor] = {f"phi/{k}": v for k, v in state.phi.items()}
    tensors["generator"] = state.generator
    optim_state: dict[str, dict[str, Any]] = {}
    for index, entry in state.optimizer["state"].items():
        scalars = {}
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{index}/{key}"] = value
            else:
                scalars[key] = value
        optim_state[str(index)] = scalars
    if state.theta is not None:
        tensors.update({f"theta/{k}": v for k, v in state.theta.items()})
    if state.batch is not None:
        tensors.update({f"batch/{k}": v for k, v in zip(state.batch._fields, state.batch, strict=True)})
    tensors.update({f"task/{k}": v for k, v in state.task_state.items()})
    tensors.update({f"inner/{k}": v for k, v in state.inner_state.items()})
    document = {
        "step": state.step,
        "age": state.age,
        "seconds": state.seconds,
        "curves": state.curves,
        "optimizer": {"param_groups": state.optimizer["param_groups"], "state": optim_state},
        "optimizer_tensors": {
            str(i): sorted(k for k, v in e.items() if isinstance(v, Tensor))
            for i, e in state.optimizer["state"].items()
        },
        "theta": None if state.theta is None else list(state.theta),
        "batch": None
        if state.batch is None
        else {"type": type(state.batch).__name__, "fields": list(state.batch._fields)},
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return tensors, document


def state_from_tensors(
    tensors: dict[str, Tensor],
    document: dict[str, Any],
    batch_type: type | None,
    device: torch.device | str = "cpu",
) -> MetaTrainState:
    """Rebuild the record; ``batch_type`` is the task's batch NamedTuple. Raises KeyError/TypeError/ValueError
    on a malformed document (the loader turns them into one ML3Error)."""
    device = torch.device(device)

    def take(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    step, age, seconds = document["step"], document["age"], document["seconds"]
    if not (_is_int(step) and step >= 0 and _is_int(age) and age >= 0):
        raise ValueError("step and age must be non-negative integers")
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds)):
        raise ValueError("seconds must be a finite number")
    curves = document["curves"]
    if not (isinstance(curves, list) and all(isinstance(row, dict) for row in curves)):
        raise ValueError("curves must be a list of rows")
    generator = tensors["generator"]
    if generator.dtype != torch.uint8 or generator.ndim != 1:
        raise ValueError("the generator state must be a 1-D uint8 tensor")
    optim_doc = document["optimizer"]
    groups = optim_doc["param_groups"]
    if not (isinstance(groups, list) and all(isinstance(g, dict) for g in groups)):
        raise ValueError("optimizer.param_groups must be a list of mappings")
    state: dict[int, dict[str, Any]] = {}
    for index, scalars in optim_doc["state"].items():
        if not isinstance(scalars, dict):
            raise ValueError("optimizer.state entries must be mappings")
        entry = dict(scalars)
        for key in document["optimizer_tensors"][index]:
            entry[key] = tensors[f"optim/{index}/{key}"]
        state[int(index)] = entry
    theta = None
    if document["theta"] is not None:
        theta = {name: tensors[f"theta/{name}"].to(device) for name in document["theta"]}
    batch = None
    if document["batch"] is not None:
        fields = list(document["batch"]["fields"])
        if batch_type is None:  # reading without a task (e.g. to see the step): a generic NamedTuple
            batch_type = collections.namedtuple("Batch", fields)  # ValueError on odd names
        if list(getattr(batch_type, "_fields", ())) != fields:
            have = list(getattr(batch_type, "_fields", ()))
            raise ValueError(f"the task batch has fields {fields} but this task's batches have {have}")
        batch = batch_type(*(tensors[f"batch/{name}"].to(device) for name in fields))
    return MetaTrainState(
        step=step,
        phi=take("phi/"),
        optimizer={"state": state, "param_groups": groups},
        generator=generator,
        theta=theta,
        batch=batch,
        age=age,
        curves=curves,
        seconds=float(seconds),
        task_state={k: v.to(device) for k, v in take("task/").items()},
        inner_state={k: v.to(device) for k, v in take("inner/").items()},
    )


def _check_adam_settings(state: MetaTrainState, fresh: torch.optim.Adam, outer: Any, fail: Any) -> None:
    """Refuse Adam settings (param_groups) other than those this recipe's run has: the learning rate, betas, eps
    and every other setting of a fresh Adam at ``outer.lr``. Under the cosine schedule the rate itself is set from
    the step on resume; its start (``initial_lr``) must be ``outer.lr``."""
    saved, want = state.optimizer["param_groups"], fresh.state_dict()["param_groups"]
    if len(saved) != len(want):
        fail(f"{len(saved)} Adam parameter groups instead of {len(want)}")
    for got, expected in zip(saved, want, strict=True):
        expected = json.loads(json.dumps(expected))  # as the checkpoint stores it (tuples become lists)
        got = dict(got)
        if outer.lr_schedule == "cosine":
            expected["initial_lr"] = outer.lr
            got.pop("lr", None), expected.pop("lr")
        for key in sorted(set(got) | set(expected)):
            # compared as JSON text: True is not 1 and 1.0 is not 1, here or anywhere inside a list
            if key not in got or key not in expected or json.dumps(got[key]) != json.dumps(expected[key]):
                fail(f"Adam's {key} is {got.get(key, '<absent>')!r:.60} but this recipe's is {expected.get(key)!r:.60}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def batch_type_of(task: Any) -> type:
    """The NamedTuple type of ``task``'s batches (one throwaway draw from a private generator)."""
    return type(task.sample_tasks(1, torch.Generator().manual_seed(0)))


# -- files ----------------------------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, state: MetaTrainState, recipe: dict[str, Any], artifact: str | Path) -> Path:
    """Write ``state`` with the effective ``recipe`` at ``path``, atomically."""
    import ml3cli

    tensors, document = state_to_tensors(state)
    document = {
        "ml3_version": ml3cli.__version__,
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe,
        "artifact": str(artifact),
        **document,
    }
    try:
        text = json.dumps(document, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise ML3Error(f"cannot write checkpoint {path}: state is not serialisable ({err})") from None
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "sha256": metadata.document_sha256(artifacts.tensors_sha256(tensors), text),
        "ml3": text,
    }
    return files.write_bytes_atomic(path, st_save(tensors, metadata=header))


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the state, the recipe it was written with (as a dict) and its metadata."""

    path: Path
    state: MetaTrainState
    recipe: dict[str, Any]
    info: dict[str, Any]


def read_checkpoint_info(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The checkpoint's tensors and JSON document after the format, version and checksum checks."""
    path = Path(path)
    if not path.is_file():
        raise ML3Error(f"checkpoint not found: {path}")
    data, header = artifacts._read_checked(path)
    meta = header.get("__metadata__") or {}
    version = metadata.check_format(path, meta, FORMAT, FORMAT_VERSION, "ml3 meta-training checkpoint")
    document = metadata.parse_document(path, meta.get("ml3"), "checkpoint")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as err:
        raise ML3Error(f"{path}: corrupt tensor data ({err})") from None
    if meta.get("sha256") != metadata.expected_sha256(version, artifacts.tensors_sha256(tensors), meta["ml3"]):
        what = "tensors were" if version < metadata.WHOLE_FILE_CHECKSUM else "tensors or metadata were"
        raise ML3Error(f"{path}: checksum mismatch: the checkpoint's {what} modified or corrupted")
    metadata.validated(metadata.CheckpointRecord, document, path, "checkpoint metadata")
    return tensors, document


def load_checkpoint(path: str | Path, batch_type: type | None, device: torch.device | str = "cpu") -> Checkpoint:
    """Read and check a checkpoint; any damage is one ML3Error naming the file."""
    path = Path(path)
    tensors, document = read_checkpoint_info(path)
    try:
        recipe = document["recipe"]
        if not isinstance(recipe, dict):
            raise ValueError("the recipe is not a mapping")
        state = state_from_tensors(tensors, document, batch_type, device)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise ML3Error(f"{path}: checkpoint metadata is missing or malformed ({err!s:.200})") from None
    return Checkpoint(path, state, recipe, document)


def recipe_difference(saved: Any, current: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    """The first field (dotted path) where two recipe dicts differ, ignoring :data:`RESUMABLE_DIFFERENCES`."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in list(saved) + [k for k in current if k not in saved]:
            dotted = f"{prefix}{key}"
            if not prefix and key in RESUMABLE_DIFFERENCES:
                continue
            if key not in saved or key not in current:
                return dotted, saved.get(key, "<absent>"), current.get(key, "<absent>")
            found = recipe_difference(saved[key], current[key], dotted + ".")
            if found:
                return found
        return None
    if saved != current or type(saved) is not type(current):
        if isinstance(saved, (int, float)) and isinstance(current, (int, float)) and saved == current:
            return None
        return prefix.rstrip("."), saved, current
    return None


def with_added_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's recipe with the :data:`ADDED_FIELDS` it predates, at the values it ran with."""
    saved = dict(saved)
    for section, defaults in ADDED_FIELDS.items():
        if isinstance(saved.get(section), dict):
            saved[section] = saved[section] | {k: v for k, v in defaults.items() if k not in saved[section]}
    return saved


def check_resumable(checkpoint: Checkpoint, recipe: dict[str, Any], outer_steps: int) -> None:
    """Refuse a checkpoint written with another recipe (other than output paths) or past the run's end."""
    found = recipe_difference(with_added_fields(checkpoint.recipe), recipe)
    if found:
        where, saved, current = found
        raise ML3Error(
            f"{checkpoint.path}: cannot resume: field `{where}` is {saved!r} in the checkpoint but {current!r} in "
            "this recipe; resume with the same recipe and --set/--seed options, or start afresh without --resume"
        )
    if checkpoint.state.step > outer_steps:
        raise ML3Error(f"{checkpoint.path}: checkpoint is at outer step {checkpoint.state.step}, past outer.steps")


def validate_state(checkpoint: Checkpoint, recipe: Any, task: Any) -> None:
    """Refuse a state that does not fit the recipe's model and task (names, shapes, dtypes), before any step.

    The reference shapes come from a fresh M_φ, Adam, θ₀ and task batch drawn from a private generator.
    """
    from ml3cli.runtime import generator

    state, path = checkpoint.state, checkpoint.path

    def fail(what: str) -> None:
        raise ML3Error(f"{path}: checkpoint does not fit this recipe's model or task ({what})")

    def same_layout(got: dict[str, Tensor] | None, want: dict[str, Tensor], what: str) -> None:
        if got is None or set(got) != set(want):
            fail(f"{what}: names {sorted(got or {})[:4]} instead of {sorted(want)[:4]}")
        for name, ref in want.items():
            if got[name].shape != ref.shape or got[name].dtype != ref.dtype:
                fail(
                    f"{what} {name!r}: {got[name].dtype}{list(got[name].shape)} instead of {ref.dtype}{list(ref.shape)}"
                )

    scratch = generator(0)
    metaloss = build_metaloss(recipe, task, scratch)
    same_layout(state.phi, metaloss.state_dict(), "φ")
    optimizer = torch.optim.Adam(metaloss.parameters(), lr=recipe.outer.lr)
    _check_adam_settings(state, optimizer, recipe.outer, fail)
    params = list(metaloss.parameters())
    for index, entry in state.optimizer["state"].items():
        if not 0 <= index < len(params):
            fail(f"Adam state for parameter {index}")
        for key, value in entry.items():
            if key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") and (
                not isinstance(value, Tensor)
                or value.shape != params[index].shape
                or value.dtype != params[index].dtype
            ):
                fail(f"Adam {key} of parameter {index}")
            if key == "step" and not (
                isinstance(value, Tensor)
                and value.ndim == 0
                and value.dtype in (torch.float32, torch.float64)
                and float(value) == state.step  # one Adam step per outer step
            ):
                fail(f"Adam step of parameter {index}: {value!s:.40} instead of the outer step {state.step}")
            if key in ("exp_avg", "exp_avg_sq") and not bool(torch.isfinite(value).all()):
                fail(f"Adam {key} of parameter {index} is not finite")
            if key == "exp_avg_sq" and bool((value < 0).any()):
                fail(f"Adam {key} of parameter {index} is negative")
    try:
        optimizer.load_state_dict(state.optimizer)
        scratch.set_state(state.generator)
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        fail(f"{err!s:.200}")
    try:
        task.load_state_tensors(state.task_state)
    except (ValueError, RuntimeError, KeyError, TypeError) as err:
        fail(f"task state: {err!s:.200}")
    if state.step == 0:
        return
    if state.theta is None or state.batch is None:
        fail("θ or the task batch is missing after the first step")
    theta = task.init_theta(recipe.outer.tasks, scratch)
    same_layout(state.theta, theta, "θ")
    inner_optimizer = optimizer_for(recipe.inner)
    same_layout(state.inner_state, inner_optimizer.init(theta), f"the {recipe.inner.optimizer} optimizer's state")
    reference = task.sample_tasks(recipe.outer.tasks, scratch)
    same_layout(dict(zip(state.batch._fields, state.batch, strict=True)), reference._asdict(), "task batch")
    if not 0 < state.age <= recipe.inner.reset_period:
        fail(f"age {state.age} outside 1 … {recipe.inner.reset_period}")
    floats = [value for value in state.inner_state.values() if value.is_floating_point()]
    if not all(bool(torch.isfinite(value).all()) for value in floats):
        fail(f"the {recipe.inner.optimizer} optimizer's state is not finite")
    problem = inner_optimizer.check_state(state.inner_state, state.age)
    if problem:
        fail(problem)
