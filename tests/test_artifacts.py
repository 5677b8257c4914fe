"""Learned-loss artifacts: bit-exact round trips, use as an ordinary nn.Module, refusal of damaged or foreign
files with a clear ML3Error, refusal of a loss learned for other inputs, and atomic writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import struct
from pathlib import Path

import pytest
import torch
from helpers import TINY_RECIPE, run_cli
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import ml3cli
from ml3cli import artifacts, metadata
from ml3cli.artifacts import load_loss, read_info, save_loss
from ml3cli.errors import ML3Error
from ml3cli.metaloss import LossInput, MetaLoss
from ml3cli.recipes import recipe_from_dict, recipe_to_dict
from ml3cli.tasks.sine import SineRegression

SPEC = SineRegression.loss_inputs_spec


def recipe_dict() -> dict:
    return recipe_to_dict(recipe_from_dict(json.loads(json.dumps(TINY_RECIPE))))


def make_info(**extra) -> dict:
    return {
        "task": "sine",
        "test_task": "sine_shifted",
        "seed": 3,
        "recipe": recipe_dict(),
        "metrics": {"meta_test": {"final": {"learned": 0.25, "mse": 0.5}}, "meta_train_seconds": 1.5},
        **extra,
    }


def trained_like_loss(seed: int = 0, **kwargs) -> MetaLoss:
    """A meta-loss whose φ is not its initialisation (random perturbation), so a round trip is a real check."""
    torch.manual_seed(seed)
    metaloss = MetaLoss(kwargs.pop("inputs", SPEC), hidden=kwargs.pop("hidden", (8, 8)), **kwargs)
    with torch.no_grad():
        for p in metaloss.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return metaloss


@pytest.fixture
def artifact(tmp_path) -> Path:
    return save_loss(tmp_path / "loss.safetensors", trained_like_loss(), make_info())


def rewrite(path: Path, metadata_update: dict[str, str] | None = None, tensors_update=None) -> Path:
    """Re-serialise an artifact with changed metadata and/or tensors (the checksum is NOT recomputed)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    tensors = st_load(data)
    meta.update(metadata_update or {})
    if tensors_update:
        tensors_update(tensors)
    path.write_bytes(st_save(tensors, metadata=meta))
    return path


# -- round trip -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"hidden": (5, 7, 3), "activation": "elu", "bias": False, "output": "linear"},
    ],
)
def test_round_trip_is_bit_exact_and_keeps_metadata(tmp_path, kwargs):
    """save_loss → load_loss gives the same architecture and torch.equal tensors, and the metadata (task,
    recipe, seed, metrics, versions) survives."""
    original = trained_like_loss(**kwargs)
    path = save_loss(tmp_path / "a.safetensors", original, make_info())
    loaded = load_loss(path)

    assert isinstance(loaded, torch.nn.Module)
    assert (loaded.hidden, loaded.activation, loaded.bias, loaded.output) == (
        original.hidden,
        original.activation,
        original.bias,
        original.output,
    )
    assert loaded.inputs == original.inputs
    a, b = original.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype
        assert torch.equal(a[k], b[k]), k

    info = loaded.info
    assert info["task"] == "sine" and info["seed"] == 3
    assert info["recipe"] == recipe_dict()
    assert info["metrics"] == make_info()["metrics"]
    assert info["ml3_version"] == ml3cli.__version__ and info["torch_version"] == torch.__version__
    assert read_info(path)["recipe"] == recipe_dict()

    x = torch.randn(20, 1)
    y = torch.randn(20, 1)
    assert torch.equal(original(x, y), loaded(x, y))


def test_round_trip_keeps_float64(tmp_path):
    """φ stored in float64 comes back in float64, bit-exact."""
    original = trained_like_loss().double()
    loaded = load_loss(save_loss(tmp_path / "d.safetensors", original, make_info()))
    for k, v in original.state_dict().items():
        assert loaded.state_dict()[k].dtype == torch.float64
        assert torch.equal(v, loaded.state_dict()[k])


def test_loaded_loss_trains_an_ordinary_model(artifact):
    """ml3cli.load_loss gives a frozen nn.Module that works as a loss in a plain PyTorch loop: backward()
    reaches the model's parameters with finite, non-zero gradients, and φ gets none."""
    loss_fn = ml3cli.load_loss(artifact)
    assert not loss_fn.training
    assert all(not p.requires_grad for p in loss_fn.parameters())

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.linspace(-2, 2, 32).unsqueeze(1)
    y = torch.sin(x - torch.pi)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
        optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in loss_fn.parameters())
    # keyword form is the same function
    assert torch.equal(loss_fn(model(x), y), loss_fn(y_pred=model(x), y_true=y))


# -- refused files --------------------------------------------------------------------------------------------
def refused(path: Path, *words: str) -> str:
    """Assert that load_loss refuses ``path`` with an ML3Error naming the file and containing one of ``words``."""
    with pytest.raises(ML3Error) as info:
        load_loss(path)
    message = str(info.value)
    assert str(path) in message
    assert any(w in message.lower() for w in words), message
    assert "\n" not in message
    return message


@pytest.mark.parametrize("keep", [5, 100, -10])
def test_truncated_file_is_refused(artifact, keep):
    """A file cut short (inside the length prefix, inside the header, inside the tensors) is refused."""
    data = artifact.read_bytes()
    artifact.write_bytes(data[:keep])
    refused(artifact, "truncated", "corrupt")


def test_flipped_byte_in_tensor_data_fails_the_checksum(artifact):
    """One flipped byte inside the tensor data is caught by the checksum."""
    data = bytearray(artifact.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    position = 8 + n + (len(data) - 8 - n) // 2
    data[position] ^= 0x01
    artifact.write_bytes(bytes(data))
    refused(artifact, "checksum")


def test_tensors_replaced_without_new_checksum_are_refused(artifact):
    """Tensors rewritten by another tool (valid safetensors, stale sha256) are refused as a checksum mismatch."""
    rewrite(artifact, tensors_update=lambda t: t.__setitem__("net.0.bias", torch.zeros_like(t["net.0.bias"])))
    refused(artifact, "checksum")


def test_architecture_mismatch_is_refused(artifact):
    """Metadata that declares another architecture than the stored tensors is refused (not a crash in
    load_state_dict)."""
    data = artifact.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    document = json.loads(meta["ml3"])
    document["architecture"]["hidden"] = [8, 9]
    rewrite(artifact, {"ml3": json.dumps(document)})
    refused(artifact, "architecture")


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    refused(path, "corrupt", "truncated", "not")


def test_header_declaring_a_huge_size_is_refused(tmp_path):
    """A length prefix that claims more than the file holds is refused before anything is allocated."""
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b'{"__metadata__": {}}')
    refused(path, "corrupt", "truncated")


def test_oversized_file_is_refused(artifact, monkeypatch):
    """Files above MAX_ARTIFACT_BYTES are refused before they are read."""
    monkeypatch.setattr(artifacts, "MAX_ARTIFACT_BYTES", 100)
    refused(artifact, "too large")


def test_newer_format_version_is_refused(artifact):
    """An artifact from a newer ml3 (format_version above ours) asks the user to upgrade."""
    rewrite(artifact, {"format_version": str(artifacts.FORMAT_VERSION + 1)})
    message = refused(artifact, "newer")
    assert "upgrade" in message


def test_non_ml3_safetensors_is_refused(tmp_path):
    """A valid safetensors file that is not an ml3 loss (no format metadata) is refused as such."""
    path = tmp_path / "other.safetensors"
    path.write_bytes(st_save({"weight": torch.zeros(3, 3)}, metadata={"format": "pt"}))
    refused(path, "not an ml3")
    with pytest.raises(ML3Error, match="not an ml3"):
        read_info(path)


def test_load_loss_never_unpickles(artifact, tmp_path, monkeypatch):
    """load_loss reads safetensors only: with every unpickler disabled it still loads an artifact, and a pickle (a
    torch.save file, or a bare pickle) under an artifact's name is refused as such, never unpickled."""
    import pickle

    zipped, bare = tmp_path / "zipped.safetensors", tmp_path / "bare.safetensors"
    torch.save(trained_like_loss().state_dict(), zipped)
    bare.write_bytes(pickle.dumps({"net.0.weight": [[0.0]]}, protocol=4))

    def unpickling(*args, **kwargs):
        raise AssertionError("load_loss unpickled")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, unpickling)
    assert load_loss(artifact)(torch.zeros(4, 1), torch.ones(4, 1)).ndim == 0
    assert "torch.save" in refused(zipped, "not a safetensors")
    assert "a pickle" in refused(bare, "not a safetensors")


def test_missing_file_is_refused(tmp_path):
    refused(tmp_path / "absent.safetensors", "not found")


def test_malformed_metadata_is_refused(artifact):
    """An ml3 document that is not JSON is reported as malformed metadata."""
    rewrite(artifact, {"ml3": "{not json"})
    refused(artifact, "malformed")


# -- wrong task -----------------------------------------------------------------------------------------------
@pytest.fixture
def wrong_task_artifact(tmp_path) -> Path:
    """A loss learned over one input ``x[3]``, stored with an otherwise complete sine recipe."""
    metaloss = trained_like_loss(inputs=(LossInput("x", 3),))
    return save_loss(tmp_path / "wrong.safetensors", metaloss, make_info(task="other_task"))


def test_wrong_inputs_are_refused_by_load_loss(wrong_task_artifact):
    """load_loss(path, expect_inputs=…) refuses a loss learned for other inputs and says which ones."""
    load_loss(wrong_task_artifact)  # loading without expectations is fine
    with pytest.raises(ML3Error) as info:
        load_loss(wrong_task_artifact, expect_inputs=SPEC)
    message = str(info.value)
    assert "x[3]" in message and "y_pred[1], y_true[1]" in message and "other_task" in message


def test_wrong_inputs_are_refused_by_the_cli(wrong_task_artifact, tmp_path):
    """`ml3 meta-test --loss wrong.safetensors --task sine_shifted` exits 2 with a one-line message."""
    result = run_cli(
        "meta-test", "--loss", wrong_task_artifact, "--task", "sine_shifted", "--out-dir", tmp_path / "out",
        "--quiet", cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "x[3]" in lines[0] and str(wrong_task_artifact) in lines[0]
    assert not (tmp_path / "out").exists()


# -- atomic writes --------------------------------------------------------------------------------------------
def test_save_leaves_no_temp_files(tmp_path):
    """After save_loss (also over an existing file) the folder holds only the artifact."""
    folder = tmp_path / "nested" / "dir"
    path = folder / "loss.safetensors"
    save_loss(path, trained_like_loss(0), make_info())
    save_loss(path, trained_like_loss(1), make_info())
    assert sorted(os.listdir(folder)) == ["loss.safetensors"]
    assert torch.equal(load_loss(path).state_dict()["net.0.bias"], trained_like_loss(1).state_dict()["net.0.bias"])


def test_saved_file_has_the_permissions_of_an_ordinary_file(tmp_path):
    """The atomic write (via a 0600 temp file) still yields a file with the umask's usual mode, so that
    artifacts can be shared like any other output."""
    umask = os.umask(0o022)
    try:
        path = save_loss(tmp_path / "loss.safetensors", trained_like_loss(), make_info())
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    """If the final rename fails, save_loss raises ML3Error, the previous artifact is intact and the temp
    file is removed."""
    path = save_loss(tmp_path / "loss.safetensors", trained_like_loss(0), make_info())
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(ML3Error, match="cannot write"):
        save_loss(path, trained_like_loss(1), make_info())
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["loss.safetensors"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_checksum_from_the_file_bytes_equals_the_tensor_checksum(tmp_path, dtype):
    """`ml3 inspect` checks the checksum from the raw bytes, without torch: it must equal the one written."""
    path = save_loss(tmp_path / "l.safetensors", trained_like_loss().to(dtype), {"task": "sine"})
    info, count = artifacts.verified_info(path)
    assert info["task"] == "sine" and count == sum(p.numel() for p in load_loss(path).parameters())
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    tensors = st_load(data)
    assert artifacts.file_sha256(path, data, header) == artifacts.tensors_sha256(tensors)
    meta = header["__metadata__"]
    assert meta["sha256"] == metadata.document_sha256(artifacts.tensors_sha256(tensors), meta["ml3"])


def test_inspect_refuses_a_flipped_byte_without_loading_torch(artifact, tmp_path):
    """The torch-free reader still catches damaged tensor data, and `ml3 inspect` never imports torch."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom ml3cli.cli import app\ntry:\n    app(['inspect', sys.argv[1]])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    ok = subprocess.run([sys.executable, "-c", code, str(artifact)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip().endswith("False"), ok.stdout
    data = bytearray(artifact.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n + (len(data) - 8 - n) // 2] ^= 0x01
    artifact.write_bytes(bytes(data))
    with pytest.raises(ML3Error, match="checksum"):
        artifacts.verified_info(artifact)


# -- each refusal says what is wrong (the cases mutation testing found unchecked) --------------------------------
def resign(path: Path, document_update=None, tensors_update=None, version: int | None = None) -> Path:
    """Re-serialise an artifact with a changed document and/or tensors, with the checksum recomputed (what another
    tool that knows the format would write), optionally at another format version."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    tensors = st_load(data)
    document = json.loads(meta["ml3"])
    if document_update:
        document_update(document)
    if tensors_update:
        tensors_update(tensors)
    text = json.dumps(document)
    version = version or artifacts.FORMAT_VERSION
    meta.update(
        ml3=text,
        format_version=str(version),
        sha256=metadata.expected_sha256(version, artifacts.tensors_sha256(tensors), text),
    )
    path.write_bytes(st_save(tensors, metadata=meta))
    return path


def raw_file(path: Path, header, body: bytes = b"", declared: int | None = None) -> Path:
    """A file of a safetensors length prefix (``declared``, else the header's true length), a header and a body;
    a header of None writes the body alone."""
    if header is None:
        path.write_bytes(body)
        return path
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if declared is None else declared) + text + body)
    return path


PT = {"__metadata__": {"format": "pt"}}


@pytest.mark.parametrize(
    "name, header, body, declared, expected",
    [
        ("short", None, b"\0" * 7, None, "not a safetensors file (too short: 7 bytes); truncated?"),
        ("prefix_only", None, b"\0" * 8, None, "not an ml3 loss artifact (not a safetensors file; it looks like text)"),
        ("over_declared", PT, b"", len(json.dumps(PT)) + 4, "corrupt or truncated safetensors header (declares"),
        ("unsigned", PT, b"", 2**64 - 1, "corrupt or truncated safetensors header (declares 18446744073709551615"),
        ("not_json", b"{not json", b"", None, "corrupt safetensors header (not JSON)"),
        ("no_metadata", b"{}", b"", None, "not an ml3 loss artifact (metadata format is None)"),
        ("entry_not_a_dict", {**PT, "w": 5}, b"", None, "corrupt entry for tensor 'w'"),
        ("one_offset", {**PT, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4, None,
         "corrupt entry for tensor 'w'"),
        ("text_offset", {**PT, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}, b"\0" * 4, None,
         "corrupt entry for tensor 'w'"),
        ("reversed", {**PT, "w": {"dtype": "F32", "shape": [1], "data_offsets": [3, 1]}}, b"\0" * 4, None,
         "tensor 'w' lies outside the file; truncated?"),
        ("past_the_end", {**PT, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None,
         "tensor 'w' lies outside the file; truncated?"),
        ("empty_tensor", {**PT, "w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, b"", None,
         "not an ml3 loss artifact (metadata format is 'pt')"),
        ("metadata_not_a_mapping", {"__metadata__": "x"}, b"", None, "not an ml3 loss artifact"),
        ("checkpoint", {"__metadata__": {"format": "ml3-checkpoint"}}, b"", None,
         "a meta-training checkpoint, not a loss artifact; continue it with `ml3 meta-train RECIPE --resume"),
    ],
)  # fmt: skip
def test_each_damaged_or_foreign_file_is_refused_with_its_cause(tmp_path, name, header, body, declared, expected):
    path = raw_file(tmp_path / f"{name}.safetensors", header, body, declared)
    message = refused(path, expected.split(" (")[0].lower())
    assert expected in message, message


def test_a_file_of_exactly_the_size_limit_loads(artifact, monkeypatch):
    monkeypatch.setattr(artifacts, "MAX_ARTIFACT_BYTES", artifact.stat().st_size)
    assert load_loss(artifact)(torch.zeros(2, 1), torch.ones(2, 1)).ndim == 0


def test_the_kind_of_a_foreign_file_is_guessed_from_its_first_four_kilobytes(tmp_path):
    text, binary = tmp_path / "notes.safetensors", tmp_path / "blob.safetensors"
    text.write_bytes(b"a" * 4096 + b"\xff\xfe")  # past the first 4 KiB: not looked at
    binary.write_bytes(b"\xff\xfe" + b"a" * 100)
    assert refused(text, "not a safetensors").endswith("(not a safetensors file; it looks like text)")
    assert refused(binary, "not a safetensors").endswith("(not a safetensors file)")


@pytest.mark.parametrize(
    "dtype, shape, what",
    [("F8", [1], "dtype 'F8', shape [1]"), ("F32", [-1], "dtype 'F32', shape [-1]"),
     ("F32", [1.5], "dtype 'F32', shape [1.5]")],
)  # fmt: skip
def test_a_tensor_entry_of_an_unknown_dtype_or_shape_is_refused_naming_both(artifact, dtype, shape, what):
    data = artifact.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["net.0.bias"].update(dtype=dtype, shape=shape)
    raw_file(artifact, header, data[8 + n :])
    assert f"corrupt entry for tensor 'net.0.bias' ({what})" in refused(artifact, "corrupt")


def test_checksum_messages_say_what_the_checksum_covers(artifact, tmp_path):
    """Format 2 covers tensors and metadata; format 1 covered the tensors only."""
    old = resign(save_loss(tmp_path / "old.safetensors", trained_like_loss(), make_info()), version=1)
    for path, covered in ((artifact, "its tensors or metadata were"), (old, "the tensors were")):
        rewrite(path, tensors_update=lambda t: t.__setitem__("net.0.bias", torch.zeros_like(t["net.0.bias"])))
        assert f"checksum mismatch: {covered} modified or corrupted" in refused(path, "checksum")


def test_an_old_format_artifact_is_upgraded_in_place(tmp_path):
    """upgrade_format rewrites a format-1 artifact at the current version with the same tensors and document."""
    path = resign(save_loss(tmp_path / "old.safetensors", trained_like_loss(), make_info()), version=1)
    before, document = load_loss(path).state_dict(), read_info(path)["_document"]
    assert read_info(path)["_version"] == 1 and artifacts.file_integrity(read_info(path)).startswith("tensors only")
    artifacts.upgrade_format(path)
    after = read_info(path)
    assert after["_version"] == artifacts.FORMAT_VERSION and after["_document"] == document
    assert artifacts.file_integrity(after) == "tensors and metadata"
    assert all(torch.equal(before[k], v) for k, v in load_loss(path).state_dict().items())


def test_tensors_not_of_the_declared_architecture_are_named_with_the_expected_shapes(artifact, tmp_path):
    """The first three offending tensors (in name order) with their expected shapes; an extra tensor counts."""
    as_integers = resign(artifact, tensors_update=lambda t: t.update({k: v.to(torch.int32) for k, v in t.items()}))
    message = refused(as_integers, "architecture")
    assert (
        f"{as_integers}: tensors do not match the declared architecture (net.0.bias, net.0.weight, net.2.bias: "
        "expected floating-point tensors of shapes [[8], [8, 2], [8]])"
    ) in message
    extra = save_loss(tmp_path / "extra.safetensors", trained_like_loss(), make_info())
    resign(extra, tensors_update=lambda t: t.update(extra=torch.zeros(0)))
    assert "(extra: expected floating-point tensors of shapes [])" in refused(extra, "architecture")


def test_metadata_saved_from_user_code_may_leave_out_the_run_fields(tmp_path):
    """save_loss with no run information (and a file from before learned_lr was recorded) reads with defaults."""
    path = save_loss(tmp_path / "bare.safetensors", trained_like_loss(), {})
    resign(path, document_update=lambda d: d["architecture"].pop("learned_lr"))
    info = read_info(path)
    assert (info["task"], info["test_task"], info["seed"], info["recipe"], info["metrics"]) == (
        None,
        None,
        None,
        {},
        {},
    )
    assert info["architecture"]["learned_lr"] is False and info["created"].endswith("+00:00")
    assert not any(key.startswith("_") for key in load_loss(path).info)


def test_inputs_declaring_different_group_axes_are_refused(tmp_path):
    path = save_loss(tmp_path / "groups.safetensors", trained_like_loss(), make_info())
    resign(path, document_update=lambda d: d["architecture"]["inputs"][0].update(groups=["class"]))
    assert "artifact metadata is malformed: the inputs declare different group axes" in refused(path, "group")


def test_class_wise_inputs_and_a_learned_step_scale_round_trip(tmp_path):
    inputs = tuple(LossInput(i.name, i.size, i.description, ("class",)) for i in SPEC)
    path = save_loss(tmp_path / "classes.safetensors", trained_like_loss(inputs=inputs, learned_lr=True), make_info())
    loaded = load_loss(path, expect_inputs=inputs)
    assert loaded.inputs == inputs and loaded.learned_lr
    with pytest.raises(ML3Error, match="the task here needs inputs"):
        load_loss(path, expect_inputs=SPEC)  # the same names and sizes without the class axis


def test_expected_inputs_are_compared_by_name_order_size_and_count(artifact):
    assert load_loss(artifact, expect_inputs=("y_pred", "y_true")).inputs == SPEC
    for wrong in (("y_true", "y_pred"), ("y_pred",), (SPEC[0], LossInput("y_true", 2))):
        with pytest.raises(ML3Error) as info:
            load_loss(artifact, expect_inputs=wrong)
        assert "with inputs (y_pred[1], y_true[1]); the task here needs inputs (" in str(info.value)
    for malformed in ("y_pred", ["y_pred", 3]):
        with pytest.raises(ML3Error, match="expect_inputs must be a sequence of input names or LossInput objects"):
            load_loss(artifact, expect_inputs=malformed)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float64)])
def test_half_precision_or_mixed_tensors_load_as_float32(tmp_path, dtypes):
    def convert(tensors):
        for k, (name, t) in enumerate(sorted(tensors.items())):
            tensors[name] = t.to(dtypes[k % 2])

    path = resign(save_loss(tmp_path / "mixed.safetensors", trained_like_loss(), make_info()), tensors_update=convert)
    assert {p.dtype for p in load_loss(path).parameters()} == {torch.float32}


def test_metrics_may_be_nan_but_metadata_must_be_json(tmp_path):
    path = save_loss(tmp_path / "nan.safetensors", trained_like_loss(), make_info(metrics={"final": float("nan")}))
    assert math.isnan(read_info(path)["metrics"]["final"])
    with pytest.raises(ML3Error, match=r"cannot write artifact .*: its metadata is not JSON"):
        save_loss(tmp_path / "bad.safetensors", trained_like_loss(), make_info(metrics={"final": object()}))
    with pytest.raises(ML3Error, match=r"bad.safetensors: the artifact metadata to write is malformed"):
        save_loss(tmp_path / "bad.safetensors", trained_like_loss(), make_info(seed="three"))


def test_an_unknown_bare_name_lists_the_shipped_losses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert read_info("sine")["task"] == "sine"
    with pytest.raises(ML3Error, match=r"artifact not found: nope \(no such file, and not a shipped loss: .*sine"):
        load_loss("nope")
    for path in ("nope.safetensors", "folder/nope"):
        with pytest.raises(ML3Error) as info:
            load_loss(path)
        assert str(info.value) == f"artifact not found: {path}"


def test_checksum_of_an_empty_tensor_from_the_file_bytes_equals_the_tensor_checksum(tmp_path):
    path = tmp_path / "empty.safetensors"
    tensors = {"empty": torch.zeros(0), "scalar": torch.tensor(1.5)}
    path.write_bytes(st_save(tensors))
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert artifacts.file_sha256(path, data, json.loads(data[8 : 8 + n])) == artifacts.tensors_sha256(tensors)


def test_metadata_refusals_name_the_file_and_the_artifact(artifact, tmp_path):
    rewrite(artifact, {"ml3": "{not json"})
    assert f"{artifact}: artifact metadata is not valid JSON" in refused(artifact, "json")
    other = save_loss(tmp_path / "other.safetensors", trained_like_loss(), make_info())
    resign(other, document_update=lambda d: d["architecture"].update(hidden="x"))
    assert f"{other}: artifact metadata is malformed: " in refused(other, "malformed")
    deep: dict = {}
    for _ in range(40):
        deep = {"next": deep}
    path = tmp_path / "deep.safetensors"
    with pytest.raises(ML3Error, match=rf"^{path}: artifact metadata is nested deeper than 32 levels$"):
        save_loss(path, trained_like_loss(), make_info(metrics=deep))


def test_the_shipped_names_are_listed_comma_separated_or_none(tmp_path, monkeypatch):
    from ml3cli import shipped

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ML3Error) as info:
        load_loss("nope")
    assert str(info.value).endswith(f"not a shipped loss: {', '.join(shipped.shipped_names())})")
    monkeypatch.setattr(shipped, "shipped_names", lambda folder=None: [])
    with pytest.raises(ML3Error, match=r"not a shipped loss: none\)$"):
        load_loss("nope")


def test_a_file_from_before_group_axes_takes_them_from_the_expected_inputs_or_its_task(tmp_path):
    """An artifact that records no group axes gets those of the inputs it is expected to serve, else those of the
    task it was learned on (a class-wise MNIST loss), where names and sizes match."""
    from ml3cli.tasks.mnist import CLASSWISE_INPUTS

    metaloss = trained_like_loss(inputs=CLASSWISE_INPUTS)
    path = save_loss(tmp_path / "legacy.safetensors", metaloss, make_info(task="mnist"))
    resign(path, document_update=lambda d: [i.pop("groups") for i in d["architecture"]["inputs"]])
    assert load_loss(path).inputs == CLASSWISE_INPUTS  # from the task it was learned on
    assert load_loss(path, expect_inputs=CLASSWISE_INPUTS).inputs == CLASSWISE_INPUTS
    assert load_loss(path, expect_inputs=("prob", "onehot")).inputs == CLASSWISE_INPUTS  # names: the task's axes
    with pytest.raises(ML3Error, match="the task here needs inputs"):
        load_loss(path, expect_inputs=CLASSWISE_INPUTS[:1])
    flat = tuple(LossInput(i.name, i.size, i.description) for i in CLASSWISE_INPUTS)
    assert load_loss(path, expect_inputs=flat).inputs == flat  # the caller's axes win over the task's
    resign(path, document_update=lambda d: d.update(task="sine"))
    assert all(i.groups == () for i in load_loss(path).inputs)  # a task whose inputs are others: no axes


# -- the metadata helpers every file format shares (ml3cli/metadata.py) ------------------------------------------
@pytest.mark.parametrize(
    "meta, expected",
    [
        ("not a mapping", "not an ml3 loss artifact (metadata format is None)"),
        ({"format": "x" * 78}, f"(metadata format is {'x' * 78!r})"),  # a repr of 80 characters is shown whole
        ({"format": "x" * 79}, f"(metadata format is {'x' * 78!r}"[:-1] + "…)"),  # longer: cut to 80 with …
        ({"format": "ml3-loss", "format_version": 5}, "has no valid format_version (got 5)"),
        ({"format": "ml3-loss", "format_version": "1a"}, "has no valid format_version (got '1a')"),
        ({"format": "ml3-loss", "format_version": "²"}, "has no valid format_version (got '²')"),
        ({"format": "ml3-loss", "format_version": "1234567890"}, "has no valid format_version (got '1234567890')"),
        ({"format": "ml3-loss", "format_version": "123456789"}, "format version 123456789 is newer than this ml3"),
        ({"format": "ml3-loss", "format_version": "0"}, "format version 0 does not exist"),
    ],
)
def test_check_format_names_what_it_found(meta, expected):
    with pytest.raises(ML3Error) as info:
        metadata.check_format(Path("f"), meta, "ml3-loss", 2, "ml3 loss artifact")
    assert expected in str(info.value) and str(info.value).startswith("f: ")


def test_documents_nest_at_most_32_levels_counting_lists():
    def nested(levels: int, inner=None):
        value = inner if inner is not None else {}
        for _ in range(levels - 1):
            value = {"a": value}
        return json.dumps(value)

    assert metadata.parse_document(Path("f"), nested(32), "artifact")
    for text in (nested(33), nested(32, [[]])):  # [[]] is two levels
        with pytest.raises(ML3Error, match=r"^f: artifact metadata is nested deeper than 32 levels$"):
            metadata.parse_document(Path("f"), text, "artifact")
    for text, message in (
        (None, "f: artifact metadata is missing its ml3 document"),
        ("[1]", "f: artifact metadata must be a JSON object, got list"),
        ("{x", "f: artifact metadata is not valid JSON ('Expecting property name"),
    ):
        with pytest.raises(ML3Error) as info:
            metadata.parse_document(Path("f"), text, "artifact")
        assert str(info.value).startswith(message)


def test_the_checksum_of_each_format_version():
    """Format 1 checked the tensors' digest alone; format 2 hashes it with the document's exact text, which may
    hold any character JSON can escape, lone surrogates too."""
    assert metadata.expected_sha256(1, "abc", "doc") == "abc"
    assert metadata.expected_sha256(2, "abc", "doc") == metadata.document_sha256("abc", "doc")
    lone = json.loads('"\\ud800"')
    assert metadata.document_sha256("abc", lone) == hashlib.sha256(b"abc\n\xed\xa0\x80").hexdigest()


def test_a_malformed_record_names_the_field_under_its_prefix():
    with pytest.raises(ML3Error) as info:
        metadata.validated(metadata.InputRecord, {"name": "y", "size": "big"}, Path("f"), "the input", "inputs.0")
    assert str(info.value).startswith("f: the input is malformed: ") and "inputs.0.size" in str(info.value)


def test_an_unknown_field_is_named_with_the_closest_known_one():
    with pytest.raises(ML3Error) as info:
        metadata.validated(metadata.InputRecord, {"name": "y", "size": 1, "sise": 1}, Path("f"), "the input")
    assert str(info.value).startswith("f: the input is malformed: unknown field `sise`; did you mean 'size'?")
