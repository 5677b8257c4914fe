"""Learned-loss artifacts: safetensors files with φ's tensors and JSON metadata (written through :mod:`ml3cli.files`).

Layout of an artifact (``*.safetensors``):

* tensors: M_φ's ``state_dict`` (float32 unless trained otherwise);
* metadata ``format`` = ``ml3-loss``, ``format_version``, ``sha256`` (of the tensors' names, dtypes, shapes and
  bytes and of the JSON document: :mod:`ml3cli.metadata`) and ``ml3`` = a JSON document: versions, task, loss
  inputs, architecture, effective recipe, seed, metrics.

Files are written atomically (temp file in the same folder, fsync, rename) and read without pickle; the reader
checks sizes before it allocates, the format version, the checksum, the document's schema
(:class:`~ml3cli.metadata.ArtifactRecord`) and that the tensors are the declared architecture's, all before it
builds M_φ.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml3cli import metadata, shipped
from ml3cli.errors import ML3Error
from ml3cli.files import write_bytes_atomic
from ml3cli.loss_inputs import LossInput, parameter_shapes
from ml3cli.metadata import check_format  # noqa: F401  (re-exported: the checkpoint reader uses it from here)

if TYPE_CHECKING:  # torch is imported where tensors are made, so that reading metadata (ml3 inspect) needs none
    import torch

    from ml3cli.metaloss import MetaLoss

FORMAT = "ml3-loss"
FORMAT_VERSION = 2  # 2: the checksum covers the metadata document too (1: the tensors only)
MAX_ARTIFACT_BYTES = 256 * 2**20  # a meta-loss is a few kB; anything this large is not one of ours
MAX_HEADER_BYTES = 16 * 2**20


# -- checksums ------------------------------------------------------------------------------------------------
def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (the artifact's checksum)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return digest.hexdigest()


# -- save -----------------------------------------------------------------------------------------------------
def architecture_of(metaloss: MetaLoss) -> dict[str, Any]:
    """What rebuilds M_φ from its tensors: inputs, hidden sizes, activation, bias, output, learned_lr."""
    return {
        "inputs": [
            {"name": i.name, "size": i.size, "description": i.description, "groups": list(i.groups)}
            for i in metaloss.inputs
        ],
        "hidden": list(metaloss.hidden),
        "activation": metaloss.activation,
        "bias": metaloss.bias,
        "output": metaloss.output,
        "learned_lr": metaloss.learned_lr,
    }


def save_loss(path: str | Path, metaloss: MetaLoss, info: dict[str, Any]) -> Path:
    """Write M_φ and ``info`` (task, recipe, seed, metrics …) as an artifact at ``path``, atomically."""
    import torch
    from safetensors.torch import save

    import ml3cli

    tensors = {name: t.detach().cpu().contiguous() for name, t in metaloss.state_dict().items()}
    document = {
        "ml3_version": ml3cli.__version__,
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "architecture": architecture_of(metaloss),
        **info,
    }
    try:
        text = json.dumps(document, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise ML3Error(f"cannot write artifact {path}: its metadata is not JSON ({err})") from None
    # what a reader would refuse is not written
    parsed = metadata.parse_document(Path(path), text, "artifact")
    metadata.validated(metadata.ArtifactRecord, parsed, Path(path), "the artifact metadata to write")
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "sha256": metadata.document_sha256(tensors_sha256(tensors), text),
        "ml3": text,
    }
    return write_bytes_atomic(path, save(tensors, metadata=header))


def upgrade_format(path: str | Path) -> Path:
    """Rewrite an artifact of an older format version in the current one, atomically: the same tensors and the
    same metadata document, now covered by the checksum. The file is checked as any load checks it first."""
    from safetensors.torch import load, save

    path = Path(path)
    data, header, info = _checked(path)
    tensors = load(data)
    fields = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "sha256": metadata.document_sha256(tensors_sha256(tensors), info["_document"]),
        "ml3": info["_document"],
    }
    return write_bytes_atomic(path, save(tensors, metadata=fields))


# -- load -----------------------------------------------------------------------------------------------------
def _read_checked(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The file's bytes and its parsed header, after the size checks that keep memory bounded."""
    if not path.is_file():
        raise ML3Error(f"artifact not found: {path}")
    size = path.stat().st_size
    if size > MAX_ARTIFACT_BYTES:
        raise ML3Error(f"{path}: {size} bytes is too large for an ml3 loss artifact")
    data = path.read_bytes()
    if len(data) < 8:
        raise ML3Error(f"{path}: not a safetensors file (too short: {len(data)} bytes); truncated?")
    (header_len,) = struct.unpack("<Q", data[:8])
    if data[8:9] != b"{":  # a safetensors header is JSON right after the length: this is some other file
        raise ML3Error(f"{path}: not an ml3 loss artifact (not a safetensors file{_kind_of(data)})")
    if header_len > min(MAX_HEADER_BYTES, len(data) - 8):
        raise ML3Error(f"{path}: corrupt or truncated safetensors header (declares {header_len} bytes)")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ML3Error(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ML3Error(f"{path}: corrupt safetensors header")
    body = len(data) - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ML3Error(f"{path}: corrupt entry for tensor {name!r}")
        if not 0 <= offsets[0] <= offsets[1] <= body:
            raise ML3Error(f"{path}: tensor {name!r} lies outside the file; truncated?")
    return data, header


#: leading bytes of files people mistake for artifacts
_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"PK\x03\x04": "a zip archive, e.g. a torch.save file",
    b"\x80": "a pickle",
    b"%PDF": "a PDF",
    b"\x1f\x8b": "a gzip file",
    b"\x7fELF": "an executable",
}


def _kind_of(data: bytes) -> str:
    """``: it looks like a PNG image`` (or like text), for the message that refuses a file; empty if unknown."""
    kind = next((what for magic, what in _MAGIC.items() if data.startswith(magic)), None)
    if kind is None:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(data[:4096])  # a character cut at the end is fine
            kind = "text"
        except UnicodeDecodeError:
            return ""
    return f"; it looks like {kind}"


def read_info(path: str | Path) -> dict[str, Any]:
    """The artifact's metadata document (the ``ml3`` JSON), after the checks that need no tensors (format, version,
    schema, layout, checksum); ``path`` may also name a shipped loss (as for :func:`load_loss`)."""
    path = _file_or_shipped(path)
    data, header, info = _checked(path)
    return info


#: safetensors dtype codes → torch's names for them (:func:`tensors_sha256` hashes torch's name)
TORCH_DTYPE_NAMES = {
    "F64": "torch.float64", "F32": "torch.float32", "F16": "torch.float16", "BF16": "torch.bfloat16",
    "I64": "torch.int64", "I32": "torch.int32", "I16": "torch.int16", "I8": "torch.int8", "U8": "torch.uint8",
    "BOOL": "torch.bool",
}  # fmt: skip


def file_sha256(path: Path, data: bytes, header: dict[str, Any]) -> str:
    """:func:`tensors_sha256` computed from the file's bytes, without loading a tensor (or torch)."""
    body = data[8 + struct.unpack("<Q", data[:8])[0] :]
    digest = hashlib.sha256()
    for name in sorted(k for k in header if k != "__metadata__"):
        entry = header[name]
        dtype = TORCH_DTYPE_NAMES.get(entry.get("dtype"))
        shape = entry.get("shape")
        if dtype is None or not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise ML3Error(f"{path}: corrupt entry for tensor {name!r} (dtype {entry.get('dtype')!r}, shape {shape!r})")
        start, end = entry["data_offsets"]
        digest.update(f"{name}|{dtype}|{tuple(shape)}|".encode())
        digest.update(body[start:end])
    return digest.hexdigest()


def verified_info(path: str | Path) -> tuple[dict[str, Any], int]:
    """The artifact's metadata (with the private keys of :func:`read_info`: ``_version`` …) and its number of
    parameters, after the checks of a load that need no tensors (what ``ml3 inspect`` shows, without torch)."""
    path = _file_or_shipped(path)
    data, header, info = _checked(path)
    count = sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
    return info, count


def _checked(path: Path) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """The file's bytes, its safetensors header and its validated metadata document (with the loss inputs and the
    format version under private keys), after every check that needs no tensor: sizes, format, version, the
    checksum (of the tensors' bytes and, from format 2 on, the document), the schema, and that the tensors are
    the declared architecture's (so that nothing is built from a declaration the file does not hold)."""
    data, header = _read_checked(path)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        meta = {}
    if meta.get("format") == "ml3-checkpoint":
        raise ML3Error(
            f"{path}: a meta-training checkpoint, not a loss artifact; continue it with "
            f"`ml3 meta-train RECIPE --resume {path}`"
        )
    version = metadata.check_format(path, meta, FORMAT, FORMAT_VERSION, "ml3 loss artifact")
    info = metadata.parse_document(path, meta.get("ml3"), "artifact")
    if meta.get("sha256") != metadata.expected_sha256(version, file_sha256(path, data, header), meta["ml3"]):
        what = "the tensors were" if version < metadata.WHOLE_FILE_CHECKSUM else "its tensors or metadata were"
        raise ML3Error(f"{path}: checksum mismatch: {what} modified or corrupted")
    record = metadata.validated(metadata.ArtifactRecord, info, path, "artifact metadata")
    # Artifacts written by save_loss() from user code may carry less than `ml3 meta-train` records.
    for key, default in (("task", None), ("test_task", None), ("seed", None), ("recipe", {}), ("metrics", {})):
        info.setdefault(key, default)
    arch = info["architecture"]
    arch.setdefault("learned_lr", False)  # artifacts from before the switch existed
    inputs = tuple(LossInput(i.name, i.size, i.description, tuple(i.groups or ())) for i in record.architecture.inputs)
    if len({i.groups for i in inputs}) > 1:
        raise ML3Error(f"{path}: artifact metadata is malformed: the inputs declare different group axes")
    _check_layout(path, header, record.architecture)
    info["_inputs"] = inputs
    # Artifacts from before group axes were declared say nothing about them (see _legacy_groups).
    info["_declares_groups"] = all(i.groups is not None for i in record.architecture.inputs)
    info["_version"] = version
    info["_document"] = meta["ml3"]
    return data, header, info


#: the dtypes φ may be stored in (a float16 or bfloat16 φ is widened to float32 when loaded)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def _check_layout(path: Path, header: dict[str, Any], arch: metadata.ArchitectureRecord) -> None:
    """Refuse tensors that are not the parameters of the declared architecture: their names and shapes (from the
    safetensors header, so a file that declares a huge network is refused before any layer is allocated) and a
    floating-point dtype."""
    width = sum(i.size for i in arch.inputs)
    expected = parameter_shapes(width, tuple(arch.hidden), arch.bias, arch.learned_lr)
    stored = {name: entry for name, entry in header.items() if name != "__metadata__"}
    problems = sorted(
        name
        for name in set(expected) | set(stored)
        if name not in stored
        or name not in expected
        or not isinstance(stored[name], dict)
        or stored[name].get("shape") != list(expected[name])
        or stored[name].get("dtype") not in FLOAT_DTYPES
    )
    if problems:
        raise ML3Error(
            f"{path}: tensors do not match the declared architecture ({', '.join(problems[:3])}: expected "
            f"floating-point tensors of shapes {[list(expected[n]) for n in problems[:3] if n in expected]})"
        )


def file_integrity(info: dict[str, Any]) -> str:
    """What the checksum of the artifact ``info`` was read from covers (:func:`ml3cli.metadata.integrity`)."""
    return metadata.integrity(info["_version"])


def _legacy_groups(
    inputs: tuple[LossInput, ...], expect_inputs: Sequence[LossInput | str] | None, task: Any
) -> tuple[LossInput, ...]:
    """The inputs of an artifact written before group axes were recorded, given the group axes of the inputs it
    is expected to serve, else of the task it was learned on, where those match it by name and size."""
    specs: list[Sequence[LossInput | str]] = [expect_inputs] if expect_inputs is not None else []
    if isinstance(task, str):
        from ml3cli.tasks import TASKS  # only for such old files: the registry imports the simulators

        if task in TASKS:
            specs.append(TASKS[task].loss_inputs_spec)
    for spec in specs:
        if len(spec) == len(inputs) and all(
            isinstance(e, LossInput) and (e.name, e.size) == (i.name, i.size) for i, e in zip(inputs, spec, strict=True)
        ):
            return tuple(
                replace(i, groups=e.groups) for i, e in zip(inputs, spec, strict=True) if isinstance(e, LossInput)
            )
    return inputs


def _matches(inputs: tuple[LossInput, ...], expect_inputs: Sequence[LossInput | str]) -> bool:
    """Whether ``inputs`` are ``expect_inputs`` in order: a name compares names; a LossInput also size and groups."""
    if len(inputs) != len(expect_inputs):
        return False
    return all(
        i.name == e if isinstance(e, str) else (i.name, i.size, i.groups) == (e.name, e.size, e.groups)
        for i, e in zip(inputs, expect_inputs, strict=True)
    )


def _file_or_shipped(path: str | Path) -> Path:
    """``path`` itself when it exists, else the file of the shipped loss of that name (checked against the index);
    a bare name that is neither is refused with the shipped names."""
    path = Path(path)
    if path.exists():
        return path
    found = shipped.shipped_path(str(path))
    if found is not None:
        return found
    if not path.suffix and len(path.parts) == 1:
        names = ", ".join(shipped.shipped_names()) or "none"
        raise ML3Error(f"artifact not found: {path} (no such file, and not a shipped loss: {names})")
    return path


def load_loss(path: str | Path, expect_inputs: Sequence[LossInput | str] | None = None) -> MetaLoss:
    """Load a learned loss as an ordinary ``torch.nn.Module`` (a :class:`~ml3cli.metaloss.MetaLoss`, in eval
    mode, φ frozen, in the dtype it was stored in, on the CPU).

    Args:
        path: an artifact written by ``ml3 meta-train`` (or :func:`save_loss`), or the name of a loss shipped with
            the package (``"sine"``; ``ml3 losses`` lists them), used when no file of that name exists.
        expect_inputs: the loss inputs the caller will pass, in order: input names (``("y_pred", "y_true")``,
            compared by name and order) or :class:`~ml3cli.metaloss.LossInput` objects (also compared by size and
            group axes, e.g. a task's ``loss_inputs_spec``); a mismatch is refused with an ML3Error naming both.

    Returns:
        A :class:`~ml3cli.metaloss.MetaLoss` whose docstring is the contract: call ``loss_fn(*inputs)`` with the
        inputs in ``loss_fn.inputs`` order (or by name), ``[batch, size]`` each (``[batch, C, size]`` for inputs
        with a class axis); it returns ``mean_i Σ_c M_φ(x_{i,c})``, computed in φ's dtype and returned in the
        inputs' dtype, on φ's device (``loss_fn.to(device)``). ``loss_fn.info`` holds the artifact's metadata
        and ``loss_fn.meta_trained_lr`` the SGD learning rate it was meta-trained for: train with
        ``torch.optim.SGD`` at that rate (with Adam a loss meta-trained for SGD can lose to MSE).

    Example::

        loss_fn = load_loss("artifacts/sine.safetensors", expect_inputs=("y_pred", "y_true"))  # or load_loss("sine")
        optimizer = torch.optim.SGD(model.parameters(), lr=loss_fn.meta_trained_lr)
        loss = loss_fn(model(x), y); loss.backward(); optimizer.step()
    """
    import safetensors.torch
    import torch

    from ml3cli.metaloss import MetaLoss

    path = _file_or_shipped(path)
    data, header, info = _checked(path)
    inputs = info["_inputs"]
    if expect_inputs is not None:
        if isinstance(expect_inputs, (str, LossInput)) or not all(
            isinstance(e, (str, LossInput)) for e in expect_inputs
        ):
            raise ML3Error(
                f"expect_inputs must be a sequence of input names or LossInput objects, got {expect_inputs!r}"
            )
        expect_inputs = tuple(expect_inputs)
    if not info["_declares_groups"]:
        inputs = _legacy_groups(inputs, expect_inputs, info.get("task"))
    if expect_inputs is not None and not _matches(inputs, expect_inputs):
        got = ", ".join(i.label for i in inputs)
        want = ", ".join(e if isinstance(e, str) else e.label for e in expect_inputs)
        raise ML3Error(
            f"{path}: this loss was learned for task {info.get('task')!r} with inputs ({got}); "
            f"the task here needs inputs ({want})"
        )
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, RuntimeError) as err:
        raise ML3Error(f"{path}: corrupt tensor data ({err})") from None
    if tensors_sha256(tensors) != file_sha256(path, data, header):  # what was read is what was checked
        raise ML3Error(f"{path}: corrupt tensor data (the tensors read differ from the file's bytes)")
    arch = info["architecture"]  # its tensors' names and shapes were checked against it (_check_layout)
    metaloss = MetaLoss(inputs, arch["hidden"], arch["activation"], arch["bias"], arch["output"], arch["learned_lr"])
    dtypes = {t.dtype for t in tensors.values()}
    # keep φ's stored precision (float32 or float64) so that a round trip is bit-exact; a half-precision φ (or
    # a mixture) is widened to float32, which represents it exactly and which every CPU operation supports
    stored = dtypes.pop() if len(dtypes) == 1 else None
    metaloss.to(stored if stored in (torch.float32, torch.float64) else torch.float32)
    metaloss.load_state_dict(tensors)
    metaloss.requires_grad_(False)
    metaloss.eval()
    metaloss.info = {k: v for k, v in info.items() if not k.startswith("_")}
    return metaloss
