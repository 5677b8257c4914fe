"""Bad input, everywhere: property-based tests (hypothesis) of the recipe loader and of the artifact
and checkpoint loaders. Every input gives a valid result or an ML3Error (the CLI's one-line error, exit 2), never
another exception, and memory stays bounded. Example counts are bounded so that the suite stays fast; the last
test prints how many inputs each property tried.
"""

from __future__ import annotations

import copy
import json
import resource
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_RECIPE, sign
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ml3cli import checkpoints
from ml3cli.artifacts import load_loss, read_info, save_loss
from ml3cli.checkpoints import batch_type_of, load_checkpoint, save_checkpoint
from ml3cli.engine import meta_train
from ml3cli.errors import ML3Error
from ml3cli.recipes import Recipe, load_recipe, recipe_from_dict, recipe_to_dict
from ml3cli.tasks import make_task
from ml3cli.tasks.sine import SineRegression

TRIED: Counter[str] = Counter()
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
MAXRSS: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _peak_memory_at_start():
    """The process's peak RSS when this module's first test starts (earlier test modules may have raised it)."""
    MAXRSS["start"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# -- strategies -----------------------------------------------------------------------------------------------
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["sine", "sine_shifted", "sine_frequency", "relu", "softplus", "cpu", "auto", "1e-3", "-1"])
)
yaml_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10) | scalars, inner, max_size=4),
    max_leaves=12,
)


def leaf_paths(data, prefix=()) -> list[tuple[str, ...]]:
    paths = [prefix] if prefix else []
    if isinstance(data, dict):
        for key, value in data.items():
            paths += leaf_paths(value, (*prefix, key))
    return paths


RECIPE_PATHS = leaf_paths(TINY_RECIPE) + [("outer", "grad_clip"), ("inner", "reset_every"), ("unknown",)]


def load_or_refuse(path: Path, overrides: list[str] | None = None) -> Recipe | None:
    try:
        return load_recipe(path, overrides)
    except ML3Error as err:
        message = str(err)
        assert message and "\n" not in message.strip() or "YAML" in message, message
        return None


# -- recipes --------------------------------------------------------------------------------------------------
@FUZZ
@given(document=yaml_values)
def test_random_yaml_documents_give_a_recipe_or_ml3error(tmp_path_factory, document):
    path = tmp_path_factory.mktemp("r") / "r.yaml"
    try:
        text = yaml.safe_dump(document)
    except yaml.YAMLError:
        return
    path.write_text(text, encoding="utf-8")
    load_or_refuse(path)
    TRIED["random YAML documents"] += 1


@FUZZ
@given(text=st.text(max_size=300) | st.binary(max_size=300))
def test_random_text_and_bytes_give_ml3error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("r") / "r.yaml"
    (path.write_bytes if isinstance(text, bytes) else lambda t: path.write_text(t, encoding="utf-8"))(text)
    load_or_refuse(path)
    TRIED["random recipe texts/bytes"] += 1


def recipe_field_mutant(tmp_path_factory, where, value, delete, as_override):
    """One field of a valid recipe replaced by a random value (or deleted, or given as --set KEY=VALUE)."""
    data = copy.deepcopy(TINY_RECIPE)
    path = tmp_path_factory.mktemp("r") / "r.yaml"
    overrides = []
    if as_override and not delete:
        try:
            raw = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        except yaml.YAMLError:
            return
        overrides = [f"{'.'.join(where)}={raw}"]
    else:
        node = data
        for part in where[:-1]:
            node = node[part]
        if delete:
            node.pop(where[-1], None)
        else:
            node[where[-1]] = value
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    recipe = load_or_refuse(path, overrides)
    if recipe is not None:  # a valid recipe round-trips through its dict (as stored in artifacts/checkpoints)
        assert recipe_from_dict(recipe_to_dict(recipe)) == recipe
    TRIED["random field values"] += 1


RECIPE_MUTANTS = given(
    where=st.sampled_from(RECIPE_PATHS), value=yaml_values, delete=st.booleans(), as_override=st.booleans()
)
test_random_field_values_give_a_recipe_or_ml3error = FUZZ(RECIPE_MUTANTS(recipe_field_mutant))
#: ``pytest -m slow``: 10,000 of them
test_10000_recipe_field_mutants = pytest.mark.slow(
    settings(FUZZ, max_examples=10_000)(RECIPE_MUTANTS(recipe_field_mutant))
)


# -- artifacts and checkpoints --------------------------------------------------------------------------------
class Files(dict):
    def __repr__(self) -> str:  # keep hypothesis' failure reports short
        return f"Files({', '.join(f'{k}: {len(v)} bytes' for k, v in self.items())})"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, bytes]:
    """The bytes of one valid loss artifact and one valid checkpoint (tiny run stopped at outer step 3)."""
    folder = tmp_path_factory.mktemp("valid")
    recipe = recipe_from_dict(copy.deepcopy(TINY_RECIPE) | {"outer": {"steps": 4, "tasks": 2}})
    task = make_task(recipe.task, recipe.task_options)
    states = []
    result = meta_train(recipe, task, on_state=lambda s, snap: states.append(snap()) if s == 3 else None)
    info = {"task": "sine", "test_task": "sine_shifted", "seed": 0, "recipe": recipe_to_dict(recipe)}
    loss = save_loss(folder / "loss.safetensors", result.metaloss, info)
    ckpt = save_checkpoint(folder / "c.checkpoint.safetensors", states[0], recipe_to_dict(recipe), loss)
    return Files(loss=loss.read_bytes(), checkpoint=ckpt.read_bytes())


@pytest.fixture(scope="module")
def sine_task():
    recipe = recipe_from_dict(copy.deepcopy(TINY_RECIPE))
    return recipe, make_task(recipe.task, recipe.task_options)


def try_loaders(path: Path, sine_task) -> list[str]:
    """Run every loader on ``path``; return which succeeded. Anything but ML3Error fails the test.
    (read_info reads only the header and metadata, not the tensors.)"""
    recipe, task = sine_task
    ok = []
    for name, load in (
        ("load_loss", lambda: load_loss(path, expect_inputs=SineRegression.loss_inputs_spec)),
        ("read_info", lambda: read_info(path)),
        ("checkpoint", lambda: checkpoints.validate_state(load_checkpoint(path, batch_type_of(task)), recipe, task)),
    ):
        try:
            load()
            ok.append(name)
        except ML3Error as err:
            assert str(path) in str(err) and "\n" not in str(err), str(err)
    return ok


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_are_refused(tmp_path_factory, sine_task, data):
    path = tmp_path_factory.mktemp("b") / "x.safetensors"
    path.write_bytes(data)
    assert try_loaders(path, sine_task) == []
    TRIED["random byte files"] += 1


@FUZZ
@given(kind=st.sampled_from(["loss", "checkpoint"]), fraction=st.floats(0, 1, exclude_max=True))
def test_truncated_files_are_refused(tmp_path_factory, files, sine_task, kind, fraction):
    data = files[kind]
    path = tmp_path_factory.mktemp("t") / "x.safetensors"
    path.write_bytes(data[: int(fraction * len(data))])
    assert try_loaders(path, sine_task) == []
    TRIED["truncated files"] += 1


@FUZZ
@given(
    kind=st.sampled_from(["loss", "checkpoint"]),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_flipped_bytes_are_refused(tmp_path_factory, files, sine_task, kind, flips):
    """Flipped bytes anywhere are refused: the checksum covers the tensors and the metadata document, and the
    safetensors header around them is checked against both."""
    data = bytearray(files[kind])
    for where, mask in flips:
        data[int(where * len(data))] ^= mask
    if bytes(data) == files[kind]:  # the same byte flipped back
        return
    path = tmp_path_factory.mktemp("f") / "x.safetensors"
    path.write_bytes(bytes(data))
    assert try_loaders(path, sine_task) == []
    TRIED["flipped-byte files"] += 1


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes, declared: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if declared is None else declared) + text + body


DTYPES = ["F32", "F64", "F16", "BF16", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XYZ", 3, None]


@FUZZ
@given(
    kind=st.sampled_from(["loss", "checkpoint"]),
    entry=st.integers(0, 40),
    dtype=st.sampled_from(DTYPES),
    shape=st.none() | st.lists(st.integers(-2, 2**62) | st.sampled_from([0, 1, 8, 2**31]), max_size=4),
    offsets=st.none() | st.lists(st.integers(-5, 2**63 - 1), min_size=0, max_size=3),
    declared=st.none() | st.integers(0, 2**64 - 1),
)
def test_forged_headers_are_refused_with_bounded_memory(
    tmp_path_factory, files, sine_task, kind, entry, dtype, shape, offsets, declared
):
    """A header entry with another dtype, a (huge) shape, bad offsets, or a length prefix that lies."""
    header, body = split(files[kind])
    names = sorted(k for k in header if k != "__metadata__")
    name = names[entry % len(names)]
    if dtype is not None:
        header[name]["dtype"] = dtype
    if shape is not None:
        header[name]["shape"] = shape
    if offsets is not None:
        header[name]["data_offsets"] = offsets
    path = tmp_path_factory.mktemp("h") / "x.safetensors"
    path.write_bytes(join(header, body, declared))
    unchanged = (dtype is None or dtype == split(files[kind])[0][name]["dtype"]) and shape is None and offsets is None
    ok = [name for name in try_loaders(path, sine_task) if name != "read_info"]
    assert not ok or (unchanged and declared is None), ok
    TRIED["forged headers"] += 1


def retensor(data: bytes, change, metadata_change=None, rehash: bool = True) -> bytes:
    """Re-serialise with changed tensors/metadata and (unless ``rehash`` is False) a matching checksum."""
    header, _ = split(data)
    meta = dict(header["__metadata__"])
    tensors = dict(st_load(data))
    change(tensors)
    if metadata_change:
        metadata_change(meta)
    if rehash:
        sign(meta, tensors)
    return st_save(tensors, metadata=meta)


@FUZZ
@given(
    kind=st.sampled_from(["loss", "checkpoint"]),
    entry=st.integers(0, 40),
    how=st.sampled_from(["dtype-int", "dtype-f64", "dtype-f16", "scalar", "reshape", "grow", "drop", "extra"]),
    rehash=st.booleans(),
)
def test_wrong_dtypes_shapes_and_tampered_tensors_are_refused(tmp_path_factory, files, sine_task, kind, entry, how,
                                                              rehash):  # fmt: skip
    """Tensors of another dtype or shape, dropped or extra tensors — with a recomputed checksum (a forger) or
    without (a tampered file) — are refused before any training step. (A float64 copy of φ in a loss artifact
    is a legitimate precision change and may load.)"""
    data = files[kind]
    names = sorted(st_load(data))
    name = names[entry % len(names)]

    def change(tensors):
        t = tensors[name]
        if how == "dtype-int":
            tensors[name] = t.to(torch.int64) if t.dtype != torch.int64 else t.to(torch.int32)
        elif how == "dtype-f64":
            tensors[name] = t.to(torch.float64) if t.dtype != torch.float64 else t.to(torch.float32)
        elif how == "dtype-f16":
            tensors[name] = t.to(torch.float16)
        elif how == "scalar":
            tensors[name] = t.reshape(-1)[:1].reshape(()) if t.numel() else torch.zeros(())
        elif how == "reshape":
            tensors[name] = t.reshape(-1)
            if tensors[name].shape == t.shape:
                tensors[name] = t.reshape(1, *t.shape)
        elif how == "grow":
            tensors[name] = torch.cat([t.reshape(-1), t.reshape(-1)[:1]]) if t.numel() else torch.zeros(1)
        elif how == "drop":
            del tensors[name]
        elif how == "extra":
            tensors["phi/extra" if kind == "checkpoint" else "extra"] = torch.zeros(2)

    path = tmp_path_factory.mktemp("w") / "x.safetensors"
    forged = retensor(data, change, rehash=rehash)
    path.write_bytes(forged)
    ok = [name for name in try_loaders(path, sine_task) if name != "read_info"]
    legit_precision = kind == "loss" and how in ("dtype-f64", "dtype-f16") and rehash
    before, after = st_load(data), st_load(forged)
    noop = before.keys() == after.keys() and all(  # e.g. "scalar" of a tensor that already is one
        before[k].dtype == after[k].dtype and before[k].shape == after[k].shape and torch.equal(before[k], after[k])
        for k in before
    )
    assert not ok or legit_precision or noop, (name, how, ok)
    TRIED["wrong dtype/shape/tampered tensors"] += 1


@pytest.mark.parametrize("kind", ["loss", "checkpoint"])
@pytest.mark.parametrize("version", [None, "", "x", "-1", "0", "3", "²", "①", "٣", "99999999999999999999", "1.0"])
def test_missing_or_newer_format_version_is_refused(tmp_path, files, sine_task, kind, version):
    def set_version(meta):
        if version is None:
            meta.pop("format_version")
        else:
            meta["format_version"] = version

    path = tmp_path / "x.safetensors"
    path.write_bytes(retensor(files[kind], lambda t: None, set_version))
    ok = try_loaders(path, sine_task)
    assert ok == [], ok
    TRIED["format versions"] += 1


def test_valid_files_still_load(tmp_path, files, sine_task):
    """The fixtures themselves pass: the artifact through load_loss/read_info, the checkpoint through
    load_checkpoint and validate_state."""
    for kind, expected in (("loss", ["load_loss", "read_info"]), ("checkpoint", ["checkpoint"])):
        path = tmp_path / f"{kind}.safetensors"
        path.write_bytes(files[kind])
        assert try_loaders(path, sine_task) == expected


def test_memory_stayed_bounded_and_report_counts():
    """After all the files above (huge declared shapes and sizes among them), peak memory grew by < 300 MB."""
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - MAXRSS["start"]) / 1024
    print(f"\nfuzz inputs tried: {dict(TRIED)}; total {sum(TRIED.values())}; peak RSS growth {grown_mb:.0f} MB")
    assert grown_mb < 300
