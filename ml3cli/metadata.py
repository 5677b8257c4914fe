"""The metadata of ml3's files (loss artifacts and meta-training checkpoints): format, checksum and schema.

Both kinds of file are safetensors files whose ``__metadata__`` holds ``format``, ``format_version``, ``sha256``
and ``ml3`` (a JSON document). Nothing in them is trusted before it is checked here:

* **Format** (:func:`check_format`): the kind of file and a version this ml3 understands.
* **Checksum** (:func:`expected_sha256`): from format version 2 on, ``sha256`` covers the JSON document as well as
  every tensor (name, dtype, shape, bytes), so that an edit or a flipped bit anywhere is refused. Version-1 files
  (written before) covered the tensors only; they still load, and :func:`integrity` says what was checked.
* **Schema** (:func:`parse_document`, :class:`ArtifactRecord`): the document is parsed with bounded depth and
  validated field by field (types, bounds, known names) before anything reads it, so a malformed file is one
  :class:`~ml3cli.errors.ML3Error` naming the file and the field, never a traceback.

Torch-free, so that ``ml3 inspect`` answers without importing torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ml3cli.errors import ML3Error, describe_validation_error
from ml3cli.loss_inputs import ACTIVATION_NAMES, OUTPUT_NAMES

#: the first format version whose checksum covers the metadata document too
WHOLE_FILE_CHECKSUM = 2
#: the deepest nesting a metadata document may have (ml3 writes 6 levels; a recipe's task options add a few)
MAX_DEPTH = 32
#: bounds of a meta-loss that any real one is far inside (a meta-loss is a few kB)
MAX_WIDTH, MAX_LAYERS, MAX_INPUTS, MAX_INPUT_SIZE = 65_536, 64, 64, 65_536


# -- format and checksum --------------------------------------------------------------------------------------
def check_format(path: Path, meta: Any, name: str, version: int, what: str) -> int:
    """The file's format version, after refusing a file whose metadata is not format ``name`` at a version from 1
    up to ``version``."""
    got = meta.get("format") if isinstance(meta, dict) else None
    if got != name:
        raise ML3Error(f"{path}: not an {what} (metadata format is {_short(got)})")
    declared = meta.get("format_version")
    # str.isdigit() also accepts '²' and '①', which int() refuses: only ASCII digits are a version
    if not (isinstance(declared, str) and declared.isascii() and declared.isdigit() and len(declared) < 10):
        raise ML3Error(f"{path}: {what} has no valid format_version (got {_short(declared)})")
    number = int(declared)
    if number < 1:
        raise ML3Error(f"{path}: {what} format version {number} does not exist")
    if number > version:
        raise ML3Error(
            f"{path}: {what} format version {number} is newer than this ml3 understands ({version}); upgrade ml3"
        )
    return number


def document_sha256(tensor_digest: str, document: str) -> str:
    """The checksum of a format-2 file: the tensors' digest and the exact text of the ``ml3`` document."""
    return hashlib.sha256(f"{tensor_digest}\n{document}".encode("utf-8", "surrogatepass")).hexdigest()


def expected_sha256(version: int, tensor_digest: str, document: str) -> str:
    """What the ``sha256`` of a file of format ``version`` must be, given its tensors' digest and document."""
    return tensor_digest if version < WHOLE_FILE_CHECKSUM else document_sha256(tensor_digest, document)


def integrity(version: int) -> str:
    """What the checksum of a file of format ``version`` covers (``ml3 inspect`` shows it)."""
    if version < WHOLE_FILE_CHECKSUM:
        return "tensors only (format version 1, from before the metadata was covered: re-save to cover it)"
    return "tensors and metadata"


# -- the document ---------------------------------------------------------------------------------------------
def parse_document(path: Path, text: Any, what: str) -> dict[str, Any]:
    """The ``ml3`` JSON document of a file: a mapping, nested at most :data:`MAX_DEPTH` deep."""
    if not isinstance(text, str):
        raise ML3Error(f"{path}: {what} metadata is missing its ml3 document")
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as err:
        raise ML3Error(f"{path}: {what} metadata is not valid JSON ({_short(str(err))})") from None
    if not isinstance(document, dict):
        raise ML3Error(f"{path}: {what} metadata must be a JSON object, got {type(document).__name__}")
    if _depth(document) > MAX_DEPTH:
        raise ML3Error(f"{path}: {what} metadata is nested deeper than {MAX_DEPTH} levels")
    return document


def _depth(value: Any) -> int:
    """How deeply ``value`` nests (iteratively, so that a deep document cannot exhaust the stack)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        node, depth = todo.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        todo.extend((child, depth + 1) for child in children)
    return deepest


def validated(model: type[BaseModel], document: Any, path: Path, what: str, prefix: str = "") -> Any:
    """``model`` validated from ``document``, or one ML3Error naming the file and the first bad field."""
    try:
        return model.model_validate(document)
    except ValidationError as err:
        raise ML3Error(f"{path}: {what} is malformed: {describe_validation_error(err, prefix, model)}") from None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- the artifact's schema ------------------------------------------------------------------------------------
class _Record(BaseModel):
    """Strict: a number is not a string, a bool is not a number, and no float is inf or NaN."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, frozen=True)


class InputRecord(_Record):
    """One loss input as an artifact records it (:class:`~ml3cli.loss_inputs.LossInput`)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    size: int = Field(ge=1, le=MAX_INPUT_SIZE)
    description: str = Field("", max_length=2_000)
    #: None: an artifact from before group axes were recorded
    groups: list[Annotated[str, Field(min_length=1, max_length=100)]] | None = Field(None, max_length=8)


class ArchitectureRecord(_Record):
    """What rebuilds M_φ from its tensors."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[InputRecord] = Field(min_length=1, max_length=MAX_INPUTS)
    hidden: list[Annotated[int, Field(ge=1, le=MAX_WIDTH)]] = Field(max_length=MAX_LAYERS)
    activation: Literal[ACTIVATION_NAMES]  # type: ignore[valid-type]
    bias: bool
    output: Literal[OUTPUT_NAMES]  # type: ignore[valid-type]
    learned_lr: bool = False  # absent in artifacts from before the switch existed


class MetaTestRecord(_Record):
    """The meta-test numbers ``ml3 meta-train`` records (an artifact saved from user code may record part)."""

    model_config = ConfigDict(allow_inf_nan=True)
    task: str | None = None
    steps: int | None = None
    metric: str | None = None
    final: dict[str, float | None] = {}


class MetricsRecord(_Record):
    """What ``ml3 meta-train`` measured (a diverged baseline's number is NaN: non-finite numbers are allowed)."""

    model_config = ConfigDict(allow_inf_nan=True)
    meta_test: MetaTestRecord | None = None
    meta_train: dict[str, float | None] = {}
    meta_train_seconds: float | None = None
    environment_samples: int | None = Field(None, ge=0)


class ArtifactRecord(_Record):
    """The ``ml3`` document of a loss artifact. Fields beyond these (what :func:`ml3cli.save_loss` was given) are
    kept as they are; the ones here are what ml3 reads."""

    model_config = ConfigDict(extra="allow")
    ml3_version: str = Field(max_length=100)
    torch_version: str = Field(max_length=100)
    created: str = Field(max_length=100)
    architecture: ArchitectureRecord
    task: str | None = Field(None, max_length=200)
    test_task: str | None = Field(None, max_length=200)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    commit: str | None = Field(None, max_length=100)
    recipe: dict[str, Any] = {}
    metrics: MetricsRecord = MetricsRecord()


# -- the checkpoint's schema ----------------------------------------------------------------------------------
class OptimizerRecord(_Record):
    """Adam's settings (one mapping per parameter group, checked against the recipe's on resume) and the
    non-tensor part of its per-parameter state (the tensors are in the file, named ``optim/<index>/<key>``)."""

    model_config = ConfigDict(extra="forbid")
    param_groups: list[dict[str, Any]] = Field(max_length=1_000)
    state: dict[Annotated[str, Field(pattern=r"^[0-9]{1,6}$")], dict[str, Any]]


class BatchRecord(_Record):
    model_config = ConfigDict(extra="forbid")
    type: str = Field(max_length=200)
    fields: list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,99}$")]] = Field(max_length=100)


class CheckpointRecord(_Record):
    """The ``ml3`` document of a meta-training checkpoint (its tensors hold φ, Adam's moments, the RNG, θ and the
    task batch)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=True)  # curves may hold a diverging run's NaN
    ml3_version: str = Field(max_length=100)
    torch_version: str = Field(max_length=100)
    created: str = Field(max_length=100)
    recipe: dict[str, Any]
    artifact: str = Field(max_length=4_096)
    step: int = Field(ge=0, le=10**9)
    age: int = Field(ge=0, le=10**9)
    seconds: float = Field(ge=0, allow_inf_nan=False)
    curves: list[dict[str, float | None]] = Field(max_length=10_000_000)
    optimizer: OptimizerRecord
    optimizer_tensors: dict[Annotated[str, Field(pattern=r"^[0-9]{1,6}$")], list[str]]
    theta: list[str] | None = Field(max_length=10_000)
    batch: BatchRecord | None
