"""Learned-loss artifacts: bit-exact round trips, use as an ordinary nn.Module, refusal of damaged or foreign
files with a clear ML3Error, refusal of a loss learned for other inputs, and atomic writes.
"""

from __future__ import annotations

import json
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
