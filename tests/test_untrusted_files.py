"""Nothing from a file is trusted: each case an adversarial user found (an edited, re-signed or damaged artifact or
checkpoint) is refused in one line, or loads and works; none gives a traceback, none is silently accepted with
altered metadata, and no artifact decides where ml3 writes."""

from __future__ import annotations

import copy
import io
import json
import math
import os
import re
import resource
import struct
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import TINY_RECIPE, run_cli, sign
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ml3cli import artifacts, checkpoints
from ml3cli.artifacts import load_loss, read_info, save_loss
from ml3cli.checkpoints import batch_type_of, load_checkpoint, save_checkpoint
from ml3cli.commands import inspect
from ml3cli.engine import meta_train
from ml3cli.errors import ML3Error
from ml3cli.losses import artifact_infos, recorded_test_settings
from ml3cli.recipes import recipe_from_dict, recipe_to_dict
from ml3cli.runtime import resolve_device
from ml3cli.tasks import make_task

PEAK_AT_START: dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def _peak_memory_at_start():
    """The process's peak RSS when this module's first test starts (earlier modules may have raised it)."""
    PEAK_AT_START["kB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# -- files to edit --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A loss artifact written by meta-training (with its recipe) and a checkpoint at outer step 3."""
    folder = tmp_path_factory.mktemp("made")
    recipe = recipe_from_dict(copy.deepcopy(TINY_RECIPE) | {"outer": {"steps": 4, "tasks": 2}})
    task = make_task(recipe.task, recipe.task_options)
    states = []
    result = meta_train(recipe, task, on_state=lambda s, snap: states.append(snap()) if s == 3 else None)
    metrics = {"meta_test": {"task": "sine_shifted", "steps": 10, "metric": "mse", "final": {"learned": 0.5}}}
    info = {
        "task": "sine",
        "test_task": "sine_shifted",
        "seed": 0,
        "recipe": recipe_to_dict(recipe),
        "metrics": metrics,
    }
    loss = save_loss(folder / "loss.safetensors", result.metaloss, info)
    checkpoint = save_checkpoint(folder / "c.checkpoint.safetensors", states[0], recipe_to_dict(recipe), loss)
    return {"loss": loss.read_bytes(), "checkpoint": checkpoint.read_bytes(), "recipe": recipe, "task": task}


def parts(data: bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])["__metadata__"], st_load(data)


def edited(data: bytes, change, resign: bool, tensors_change=None) -> bytes:
    """``data`` with its ml3 document changed by ``change(document) -> document``, re-signed (a forger who knows
    the format) or not (an edit)."""
    meta, tensors = parts(data)
    meta["ml3"] = json.dumps(change(json.loads(meta["ml3"])), allow_nan=True)
    if tensors_change:
        tensors = tensors_change(tensors)
    if resign:
        sign(meta, tensors)
    return st_save(tensors, metadata=meta)


def write(tmp_path: Path, data: bytes, name: str = "x.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refused(load, match: str | None = None) -> str:
    with pytest.raises(ML3Error, match=match) as err:
        load()
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


def at(path: tuple, value):
    def change(document):
        node = document
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return document

    return change


# -- the whole file is covered by the checksum ----------------------------------------------------------------
@pytest.mark.parametrize(
    "where, value",
    [
        (("architecture", "activation"), "tanh"),
        (("architecture", "output"), "linear"),
        (("recipe", "inner", "lr"), 0.5),
        (("metrics", "meta_test", "final", "learned"), 0.001),
        (("seed", ), 7),
    ],
)  # fmt: skip
def test_an_edited_artifact_document_is_refused_as_a_checksum_mismatch(made, tmp_path, where, value):
    path = write(tmp_path, edited(made["loss"], at(where, value), resign=False))
    for load in (lambda: load_loss(path), lambda: read_info(path), lambda: artifacts.verified_info(path)):
        refused(load, "checksum mismatch: its tensors or metadata were modified")


def test_a_renamed_field_is_refused_edited_or_resigned(made, tmp_path):
    """``torch_version`` → ``torbh_version`` (one bit): a checksum mismatch; re-signed, a missing field."""

    def rename(document):
        document["torbh_version"] = document.pop("torch_version")
        return document

    for resign, match in ((False, "checksum mismatch"), (True, "missing required field `torch_version`")):
        path = write(tmp_path, edited(made["loss"], rename, resign))
        refused(lambda p=path: load_loss(p), match)
        result = run_cli("inspect", path, cwd=tmp_path)
        assert result.code == 2 and "Traceback" not in result.output and match.split("`")[0] in result.output


def test_a_format_1_artifact_still_loads_and_says_its_checksum_covers_the_tensors_only(made, tmp_path):
    meta, tensors = parts(made["loss"])
    meta["format_version"] = "1"
    path = write(tmp_path, st_save(tensors, metadata=sign(meta, tensors)))
    assert torch.equal(load_loss(path).net[0].weight, tensors["net.0.weight"])
    output = io.StringIO()
    inspect.run(path, Console(file=output, width=200))
    assert "covers the tensors only (format version 1" in output.getvalue()
    artifacts.upgrade_format(path)  # the same tensors and document, now covered
    assert parts(path.read_bytes())[0]["ml3"] == meta["ml3"]
    assert torch.equal(load_loss(path).net[0].weight, tensors["net.0.weight"])
    assert artifacts.file_integrity(read_info(path)) == "tensors and metadata"
    path.write_bytes(edited(path.read_bytes(), at(("seed",), 9), resign=False))
    refused(lambda: load_loss(path), "checksum mismatch")


@pytest.mark.parametrize("version", ["²", "³", "①", "٣", "0"])
def test_format_versions_that_are_not_ascii_digits_are_refused(made, tmp_path, version):
    meta, tensors = parts(made["loss"])
    meta["format_version"] = version
    path = write(tmp_path, st_save(tensors, metadata=meta))
    refused(lambda: load_loss(path), "format")


# -- the document's schema (a re-signed file: the checksum is right) ------------------------------------------
@pytest.mark.parametrize(
    "document, match",
    [
        ("[]", "must be a JSON object, got list"),
        ("3", "must be a JSON object, got int"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON|nested deeper"),
        ('{"a":' * 40 + "1" + "}" * 40, "nested deeper than 32"),
    ],
)
def test_a_document_that_is_not_a_shallow_object_is_refused(made, tmp_path, document, match):
    meta, tensors = parts(made["loss"])
    meta["ml3"] = document
    path = write(tmp_path, st_save(tensors, metadata=sign(meta, tensors)))
    refused(lambda: load_loss(path), match)
    refused(lambda: read_info(path), match)


@pytest.mark.parametrize(
    "where, value, match",
    [
        (("architecture", "inputs", 0, "size"), math.inf, "architecture.inputs.0.size"),
        (("architecture", "inputs", 0, "size"), "1", "architecture.inputs.0.size"),
        (("architecture", "hidden"), [8, True], "architecture.hidden.1"),
        (("architecture", "activation"), "swish", "architecture.activation"),
        (("architecture", "bias"), 1, "architecture.bias"),
        (("metrics", "meta_test"), "x", "metrics.meta_test"),
        (("metrics", "meta_test", "final"), [1], "metrics.meta_test.final"),
        (("created",), 12, "created"),
        (("seed",), 2**70, "seed"),
    ],
)
def test_malformed_fields_are_refused_naming_the_field(made, tmp_path, where, value, match):
    path = write(tmp_path, edited(made["loss"], at(where, value), resign=True))
    message = refused(lambda: load_loss(path), "malformed")
    assert match in message, message


@pytest.mark.parametrize("hidden", [[1_000_000, 1_000_000], [30_000, 30_000], [8, 9]])
def test_a_declared_architecture_that_is_not_the_tensors_is_refused_before_allocating(made, tmp_path, hidden):
    """A 13 kB file that declares a network of 10¹² weights is refused from its header: no layer is built."""
    path = write(tmp_path, edited(made["loss"], at(("architecture", "hidden"), hidden), resign=True))
    peak, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    for load in (lambda: load_loss(path), lambda: artifacts.verified_info(path)):
        refused(load, "do not match the declared architecture" if hidden[0] <= 65_536 else "architecture.hidden.0")
    assert (
        time.perf_counter() - started < 10
    )  # it was 25 s and 3.8 GB before any check (a loaded machine: far from either)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000  # kB


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weights_of_another_precision_load_and_work(made, tmp_path, dtype):
    """Half precision is widened to float32 (exactly); float64 is kept; either way the loss runs."""
    path = write(tmp_path, edited(made["loss"], lambda d: d, True, lambda t: {k: v.to(dtype) for k, v in t.items()}))
    loss = load_loss(path)
    assert loss.net[0].weight.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(loss.net[0].weight, parts(made["loss"])[1]["net.0.weight"].to(dtype).to(loss.net[0].weight))
    value = loss(torch.randn(5, 1), torch.randn(5, 1))
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_a_bare_artifact_from_user_code_is_inspected_and_plotted_or_asks_for_a_task(made, tmp_path):
    """save_loss(path, m, {}) records no task, recipe or meta-test: every command copes."""
    path = save_loss(tmp_path / "bare.safetensors", load_loss(write(tmp_path, made["loss"])), {})
    assert run_cli("inspect", path, cwd=tmp_path).code == 0
    result = run_cli("landscape", "--loss", path, cwd=tmp_path)
    assert result.code == 2 and "records no task" in result.output and "Traceback" not in result.output


# -- what commands take from an artifact's recipe -------------------------------------------------------------
@pytest.mark.parametrize(
    "value, field",
    [
        ("x", "recipe.meta_test"),
        ({"task": "sine_shifted", "steps": -5}, "recipe.meta_test.steps"),
        ({"task": "sine_shifted", "lr": "abc"}, "recipe.meta_test.lr"),
        ({"task": "sine_shifted", "lr": -1}, "recipe.meta_test.lr"),
        ({"task": "sine_shifted", "lr": math.nan}, "recipe.meta_test.lr"),
        ({"task": "sine_shifted", "lr": math.inf}, "recipe.meta_test.lr"),
        ({"task": "sine_shifted", "task_options": "x"}, "recipe.meta_test.task_options"),
    ],
)
def test_a_malformed_recorded_meta_test_is_refused_by_meta_test(made, tmp_path, value, field):
    path = write(tmp_path, edited(made["loss"], at(("recipe", "meta_test"), value), resign=True))
    message = refused(lambda: artifact_infos([str(path)], "sine_shifted"), "recorded recipe is malformed")
    assert field in message, message
    result = run_cli("meta-test", "--loss", path, "--task", "sine_shifted", cwd=tmp_path)
    assert result.code == 2 and field in result.output and "Traceback" not in result.output


def test_an_artifact_cannot_choose_where_files_are_written(made, tmp_path):
    """A recorded ``cache_dir`` is dropped: cache folders come from the user (recipe, command line, environment)."""
    elsewhere = tmp_path / "chosen-by-the-artifact"
    test = {**TINY_RECIPE["meta_test"], "task_options": {**TINY_RECIPE["meta_test"]["task_options"]}}
    test["task_options"]["cache_dir"] = str(elsewhere)
    path = write(tmp_path, edited(made["loss"], at(("recipe", "meta_test"), test), resign=True))
    settings_ = recorded_test_settings(artifact_infos([str(path)], "sine_shifted"), "sine_shifted")
    assert "cache_dir" not in settings_.task_options and settings_.task_options["points"] == 16


@pytest.mark.parametrize("device", ["meta", "mps", "vulkan", "xla", "cuda:x", "cpu "])
def test_only_the_devices_ml3_runs_on_are_accepted(device):
    refused(lambda: resolve_device(device), "expected cpu, cuda, cuda:N or auto")


# -- checkpoints ----------------------------------------------------------------------------------------------
def resume_checks(made, path: Path) -> checkpoints.Checkpoint:
    loaded = load_checkpoint(path, batch_type_of(made["task"]))
    checkpoints.validate_state(loaded, made["recipe"], made["task"])
    return loaded


def group_edit(key: str, value):
    def change(document):
        group = document["optimizer"]["param_groups"][0]
        if value is KeyError:
            group[key + "_renamed"] = group.pop(key)
        else:
            group[key] = value
        return document

    return change


@pytest.mark.parametrize(
    "change, match",
    [
        (group_edit("lr", 0.009), "Adam's lr is 0.009"),
        (group_edit("eps", 1e-3), "Adam's eps"),
        (group_edit("betas", [0.5, 0.999]), "Adam's betas"),
        (group_edit("betas", KeyError), "Adam's betas"),
        (group_edit("amsgrad", True), "Adam's amsgrad"),
    ],
)
def test_edited_adam_settings_are_refused_edited_or_resigned(made, tmp_path, change, match):
    """A resumed run would silently diverge from the uninterrupted one: refused before any step."""
    refused(lambda: resume_checks(made, write(tmp_path, edited(made["checkpoint"], change, False))), "checksum")
    refused(lambda: resume_checks(made, write(tmp_path, edited(made["checkpoint"], change, True))), match)


@pytest.mark.parametrize("how", ["step", "step-zero", "exp_avg-missing", "exp_avg_sq-negative", "exp_avg-nan"])
def test_edited_adam_state_is_refused(made, tmp_path, how):
    def tensors_change(tensors):
        if how == "step":
            tensors["optim/0/step"] = torch.tensor(1e-30)
        elif how == "step-zero":
            tensors["optim/0/step"] = torch.tensor(0.0)
        elif how == "exp_avg-missing":
            tensors.pop("optim/0/exp_avg")
        elif how == "exp_avg_sq-negative":
            tensors["optim/0/exp_avg_sq"] = -tensors["optim/0/exp_avg_sq"] - 1
        else:
            tensors["optim/0/exp_avg"] = tensors["optim/0/exp_avg"] * math.nan
        return tensors

    path = write(tmp_path, edited(made["checkpoint"], lambda d: d, True, tensors_change))
    refused(lambda: resume_checks(made, path), "does not fit this recipe's model|malformed")


def test_an_intact_checkpoint_resumes(made, tmp_path):
    loaded = resume_checks(made, write(tmp_path, made["checkpoint"]))
    assert loaded.state.step == 3


# -- fuzzing the documents ------------------------------------------------------------------------------------
#: a few hundred mutants in the default run; ``pytest -m slow`` tries 10,000 of each kind
MUTANT = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
MANY = settings(max_examples=10_000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
COUNTS: Counter[str] = Counter()
odd_values = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["²", "①", "٣", "../../etc", "/tmp/x", "C:\\x", "\x00", "a" * 10_000, "", "1e400", "-0"])
    | st.text(max_size=8)
    | st.lists(st.integers(0, 2**40), max_size=3)
    | st.just({"a": {"b": {"c": {}}}})
)


def leaves(node, prefix=()):
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += leaves(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += leaves(value, (*prefix, index))
    return found


def artifact_document_mutant(made, tmp_path_factory, data, value, resign, delete):
    """One field of the document replaced, or deleted. Not re-signed: always refused. Re-signed (a forger): refused
    in one line, or loaded with every reader and command working on it."""
    document = json.loads(parts(made["loss"])[0]["ml3"])
    where = data.draw(st.sampled_from(leaves(document)))

    def change(doc):
        node = doc
        for key in where[:-1]:
            node = node[key]
        if delete and isinstance(node, dict):
            node.pop(where[-1])
        else:
            node[where[-1]] = value
        return doc

    mutant = edited(made["loss"], change, resign)
    path = write(tmp_path_factory.mktemp("m"), mutant)
    started = time.perf_counter()
    loaders = {
        "load_loss": lambda: load_loss(path)(torch.randn(3, 1), torch.randn(3, 1)),
        "inspect": lambda: inspect.run(path, Console(file=io.StringIO(), width=120)),
        "settings": lambda: recorded_test_settings(artifact_infos([str(path)], "sine_shifted"), "sine_shifted"),
    }
    accepted = []
    for name, load in loaders.items():
        try:
            load()
            accepted.append(name)
        except ML3Error as err:
            assert "\n" not in str(err) and len(str(err)) < 1_000, str(err)[:300]
    changed = parts(mutant)[0]["ml3"] != parts(made["loss"])[0]["ml3"]
    assert resign or not changed or accepted == [], (where, value, accepted)
    assert time.perf_counter() - started < 5
    COUNTS["artifact mutants"] += 1
    COUNTS["artifact mutants accepted (re-signed, working)"] += bool(accepted)


def checkpoint_document_mutant(made, tmp_path_factory, data, value, resign):
    """One field of a checkpoint's document replaced. Not re-signed: refused. Re-signed: refused, or what a resumed
    run computes with (step, age, Adam, the RNG, θ, the batch) is exactly the original's."""
    original = json.loads(parts(made["checkpoint"])[0]["ml3"])
    where = data.draw(st.sampled_from(leaves(original)))
    mutant = edited(made["checkpoint"], at(where, value), resign)
    path = write(tmp_path_factory.mktemp("c"), mutant)
    COUNTS["checkpoint mutants"] += 1
    try:
        loaded = resume_checks(made, path)
    except ML3Error as err:
        assert "\n" not in str(err) and len(str(err)) < 1_000, str(err)[:300]
        return
    COUNTS["checkpoint mutants accepted (re-signed, same run)"] += 1
    changed = parts(mutant)[0]["ml3"] != parts(made["checkpoint"])[0]["ml3"]
    assert resign or not changed, (where, value)
    reference = resume_checks(made, write(tmp_path_factory.mktemp("r"), made["checkpoint"])).state
    state = loaded.state
    assert (state.step, state.age) == (reference.step, reference.age), where
    assert json.dumps(state.optimizer["param_groups"]) == json.dumps(reference.optimizer["param_groups"]), where
    assert torch.equal(state.generator, reference.generator)
    for name in ("theta", "phi"):
        got, want = getattr(state, name), getattr(reference, name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), where


# -- recipes and flags ----------------------------------------------------------------------------------------
def recipe_file(tmp_path: Path, text: str | None = None, **changes) -> Path:
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(copy.deepcopy(TINY_RECIPE) | changes), "utf-8")
    return path


@pytest.mark.parametrize(
    "text, match",
    [
        ("a: &a [1,1,1,1,1,1,1,1,1]\n" + "".join(
            f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)),
         "aliases expand to more than 100,000 values"),
        ("a: &a {b: *a}\n", "an alias refers to a section that contains it"),
        ("seed: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 32|maximum nesting depth"),
        ("name: a\nname: b\n", "line 2: key `name` is given twice"),
        ("outer: {steps: 1, steps: 2}\n", "key `steps` is given twice"),
    ],
)  # fmt: skip
def test_yaml_that_a_recipe_never_needs_is_refused_at_once(tmp_path, monkeypatch, capsys, text, match):
    from helpers import run_main

    started = time.perf_counter()
    result = run_main(monkeypatch, capsys, "meta-train", recipe_file(tmp_path, text), cwd=tmp_path)
    assert result.code == 2 and re.search(match, result.stderr) and len(result.stderr) < 1_000, result.stderr[:500]
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize(
    "override, match",
    [
        ("seed=9223372036854775808", "field `seed`"),
        ("seed=-1", "field `seed`"),
        ("threads=2147483648", "field `threads`"),
        ("outer.lr=1e300", "field `outer.lr`"),
        ("outer.tasks=100000000", "field `outer.tasks`"),
        ("meta_loss.hidden=[1000000,1000000]", "field `meta_loss.hidden.0`"),
        ("meta_test.tasks=10000000", "field `meta_test.tasks`"),
        ("meta_test.lr=.inf", "field `meta_test.lr`"),
        ("task_options.points=1000000000", "`points` is 1,000,000,000"),
        ("task_options.query_points=1000000000", "`query_points`"),
        ("task_options.hidden=[10000000]", "`hidden` has an entry above"),
        ("name=../elsewhere", "field `name`: must be a file name"),
        ("name=" + "x" * 10_000, "field `name`"),
        ("artifact=../outside.safetensors", "field `artifact`: must be a relative path"),
        ("artifact=/tmp/outside.safetensors", "field `artifact`: must be a relative path"),
        ("seed=" + "[" * 5000 + "]" * 5000, "field `seed`"),
    ],
)
def test_extreme_values_are_refused_before_anything_is_allocated(tmp_path, monkeypatch, capsys, override, match):
    from helpers import run_main

    started = time.perf_counter()
    result = run_main(monkeypatch, capsys, "meta-train", recipe_file(tmp_path), "--set", override, cwd=tmp_path)
    assert result.code == 2 and match in result.stderr and len(result.stderr) < 1_000, result.stderr[:500]
    assert time.perf_counter() - started < 10 and not list(tmp_path.glob("**/*.safetensors"))


def test_a_list_of_200000_layers_is_refused_at_once(tmp_path, monkeypatch, capsys):
    """(The task's own list, task_options.hidden, is bounded as well: see the extreme values above.)"""
    import yaml
    from helpers import run_main

    text = yaml.safe_dump(TINY_RECIPE, default_flow_style=None, width=10**9)  # short lists inline: [4, 4, …]
    path = recipe_file(tmp_path, text.replace("hidden: [8, 8]", "hidden: [" + "4," * 200_000 + "4]", 1))
    started = time.perf_counter()
    result = run_main(monkeypatch, capsys, "meta-train", path, cwd=tmp_path)
    assert result.code == 2 and time.perf_counter() - started < 10
    # refused by its size (a recipe is a few kB), or where a shorter list of layers fits: by the schema
    assert "too large for a recipe" in result.stderr, result.stderr[:300]


@pytest.mark.parametrize(
    "args, match",
    [
        (("--seed", "9223372036854775808"), "--seed"),
        (("--threads", "2147483648"), "--threads"),
        (("--seeds", "0-100000000000"), "more than the 1,000 seeds"),
        (("--device", "meta"), "expected cpu, cuda, cuda:N or auto"),
        (("--device", "xla"), "expected cpu, cuda, cuda:N or auto"),
    ],
)
def test_extreme_flags_are_refused_at_once(tmp_path, monkeypatch, capsys, args, match):
    from helpers import run_main

    started = time.perf_counter()
    result = run_main(monkeypatch, capsys, "meta-train", recipe_file(tmp_path), *args, cwd=tmp_path)
    assert result.code == 2 and match in result.output, result.output[-500:]
    assert time.perf_counter() - started < 10


def test_an_output_that_is_a_folder_is_refused_before_training(tmp_path, monkeypatch, capsys):
    from helpers import run_main

    (tmp_path / "taken.safetensors").mkdir()
    started = time.perf_counter()
    result = run_main(
        monkeypatch, capsys, "meta-train", recipe_file(tmp_path), "--out", "taken.safetensors", cwd=tmp_path
    )
    assert result.code == 2 and "it is a folder" in result.stderr and time.perf_counter() - started < 10


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(tmp_path):
    """Two runs writing one artifact set would mix their files (the artifact of one seed, the checkpoint of the
    other): the second is refused while the first holds the output."""
    import os
    import signal
    import subprocess
    import sys

    path = recipe_file(tmp_path, outer={"steps": 100_000, "tasks": 2}, checkpoint_every=0)
    first = subprocess.Popen(
        [sys.executable, "-m", "ml3cli", "meta-train", str(path), "--out", "out/a.safetensors", "--quiet"],
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = tmp_path / "out" / "a.safetensors.lock"
        deadline = time.monotonic() + 60
        while not lock.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lock.exists()
        second = run_cli("meta-train", path, "--seed", "1", "--out", "out/a.safetensors", cwd=tmp_path)
        assert second.code == 2 and f"being written by another run (process {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=60)
    assert not lock.exists()  # released and removed by the first run as it stopped
    assert run_cli("meta-train", path, "--set", "outer.steps=2", "--out", "out/a.safetensors", cwd=tmp_path).code == 0


@pytest.mark.parametrize(
    ("command", "held"),
    [
        (["compare", "--task", "sine_shifted", "--loss", "mse", "--loss", "l1"], "--out-dir"),
        (["meta-test", "--task", "sine_shifted", "--loss", "sine"], "--out-dir"),
        (["landscape", "--task", "sine_shifted", "--loss", "mse", "--mode", "function"], "--out-dir"),
        (["compare", "--task", "sine_shifted", "--loss", "mse", "--loss", "l1"], "--json"),
    ],
)
def test_results_another_run_is_writing_are_refused_naming_it(tmp_path, monkeypatch, capsys, command, held):
    """--out-dir and --json are held for the whole run, like meta-train's artifact: a second run that names them
    is refused before any training; once the first lets go, the same command runs."""
    from helpers import run_main

    from ml3cli import files

    small = ["--tasks", "1", "--num-seeds", "1", "--steps", "2", "--quiet"] if command[0] != "landscape" else []
    target = tmp_path / ("out" if held == "--out-dir" else "results.json")
    args = [*command, *small, held, target.name]
    with files.exclusive_output(target.resolve(), held):
        result = run_main(monkeypatch, capsys, *args, cwd=tmp_path)
        assert result.code == 2, result.stderr
        assert f"being written by another run (process {os.getpid()}" in result.stderr
        assert f"write elsewhere with {held}" in result.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / "results.json").exists()
    assert run_main(monkeypatch, capsys, *args, cwd=tmp_path).code == 0
    assert not target.with_name(target.name + ".lock").exists()


def loading_torch(pid: int) -> bool:
    """Whether process ``pid`` has begun to load torch's libraries (ml3's start-up guard is in place by then)."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps (Linux)")
@pytest.mark.parametrize("delay", [0.0, 0.2, 0.5, 0.9])
def test_a_stop_signal_during_start_up_ends_quietly(tmp_path, delay):
    """Ctrl-C while the command line is still importing torch and the task: no traceback, exit 130. The signal is
    sent ``delay`` seconds after torch's libraries start to load, however busy the machine: in the first few tens
    of milliseconds the interpreter itself is starting, before any line of ml3 runs, and a signal there is the
    interpreter's to report (a fixed delay after the start landed there under load)."""
    import os
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "ml3cli", "meta-train", str(recipe_file(tmp_path)), "--quiet"],
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not loading_torch(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, ("the run ended before torch loaded", proc.communicate())
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in out + err, err[-2000:]
    # 130 from ml3's handlers; on a loaded machine the signal can also land before the interpreter has set up its
    # own, or be reported by the interpreter as the cause of its exit (-SIGINT, "interrupted" or nothing printed)
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)
    assert err.strip() in ("", "interrupted"), err[-500:]


def test_a_signal_while_a_resume_is_loading_names_the_checkpoint_on_disk(tmp_path):
    import signal

    from ml3cli.commands.meta_train import _StopRequest
    from ml3cli.errors import RunInterrupted

    on_disk = tmp_path / "a.checkpoint.safetensors"
    on_disk.write_bytes(b"x")
    stop = _StopRequest()
    stop.resumed_from, stop.checkpoint = str(on_disk), str(tmp_path / "elsewhere.checkpoint.safetensors")
    with pytest.raises(RunInterrupted, match=f"checkpoint kept at {on_disk}"):
        stop.handle(signal.SIGINT, None)


@pytest.mark.parametrize(
    "hidden, bias, learned_lr",
    [((8, 8), True, False), ((5, 7, 3), False, False), ((4,), True, True), ((), True, False)],
)
def test_the_layout_a_reader_expects_is_the_meta_loss_parameters(hidden, bias, learned_lr):
    """The torch-free layout check (what refuses a declared architecture before allocating) cannot drift from the
    module that is then built."""
    from ml3cli.loss_inputs import parameter_shapes
    from ml3cli.metaloss import LossInput, MetaLoss

    inputs = (LossInput("y_pred", 1), LossInput("y_true", 3))
    module = MetaLoss(inputs, hidden, bias=bias, learned_lr=learned_lr)
    assert parameter_shapes(4, hidden, bias, learned_lr) == {k: tuple(v.shape) for k, v in module.state_dict().items()}


# the same properties, a few hundred mutants by default and 10,000 under `pytest -m slow`
ARTIFACT_MUTANTS = given(data=st.data(), value=odd_values, resign=st.booleans(), delete=st.booleans())
CHECKPOINT_MUTANTS = given(data=st.data(), value=odd_values, resign=st.booleans())
test_artifact_document_mutants_are_refused_or_load_and_work = MUTANT(ARTIFACT_MUTANTS(artifact_document_mutant))
test_checkpoint_document_mutants_are_refused_or_resume_the_same_run = MUTANT(
    CHECKPOINT_MUTANTS(checkpoint_document_mutant)
)
test_10000_artifact_document_mutants = pytest.mark.slow(MANY(ARTIFACT_MUTANTS(artifact_document_mutant)))
test_10000_checkpoint_document_mutants = pytest.mark.slow(MANY(CHECKPOINT_MUTANTS(checkpoint_document_mutant)))


def test_zz_counts_and_peak_memory():
    """Prints how many mutants each property tried (``pytest -s``) and bounds the memory they took together."""
    print(dict(COUNTS), f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - PEAK_AT_START["kB"] < 200 * 1024


def test_an_alias_that_shares_a_section_is_fine(tmp_path):
    """Anchors and aliases as people use them (one block of task options for meta-train and meta-test) load."""
    import yaml

    from ml3cli.recipes import load_recipe

    data = copy.deepcopy(TINY_RECIPE)
    data["meta_test"]["task_options"] = data["task_options"]  # one object: PyYAML writes an anchor and an alias
    path = recipe_file(tmp_path, yaml.safe_dump(data))
    assert "&id001" in path.read_text("utf-8") and "*id001" in path.read_text("utf-8")
    recipe = load_recipe(path)
    assert recipe.meta_test.task_options == recipe.task_options == TINY_RECIPE["task_options"]
