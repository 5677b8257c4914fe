"""The command line behaves like the tools users know: one meaning per flag in every command (``--seeds`` a list
or range of seeds, ``--num-seeds`` a count, ``--out-dir`` a folder, ``--json PATH|-``), results never replaced
silently (a new ``runs/COMMAND/TASK/TIMESTAMP/`` folder with ``settings.json``, ``--overwrite``), ``--version``,
errors that list the valid names and suggest the close one, tables that fit 80 columns, and a one-line message
naming the optional extra when a simulator is missing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_RECIPE, run_main, write_recipe

import ml3cli
from ml3cli.commands import meta_train, parsing
from ml3cli.commands.parsing import evaluation_seeds, parse_seeds
from ml3cli.errors import MissingExtra, ML3Error, simulators_needed
from ml3cli.recipes import load_recipe

#: a compare that takes a fraction of a second
QUICK = ("--task", "sine_shifted", "--loss", "mse", "--tasks", "2", "--steps", "3", "-q")


def one_line_error(result) -> str:
    """The error of a refused command: exit 2, one line on stderr, no traceback."""
    assert result.code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


# -- --version, completion, --help without torch -------------------------------------------------------------
def test_version(tmp_path, monkeypatch, capsys):
    result = run_main(monkeypatch, capsys, "--version", cwd=tmp_path)
    assert result.code == 0
    assert result.stdout.startswith(f"ml3 {ml3cli.__version__} (torch ")
    assert f"Python {sys.version.split()[0]}" in result.stdout


def test_help_offers_completion_and_imports_no_torch():
    """`ml3 --help` lists --install-completion and --version, and still imports neither torch nor numpy."""
    code = (
        "import sys\nfrom ml3cli.cli import app\ntry:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert "--install-completion" in proc.stdout and "--version" in proc.stdout
    assert proc.stdout.strip().endswith("[]")


def test_every_command_has_help_without_torch():
    """`ml3 COMMAND --help` answers for every command, and none of them imports torch or numpy to do it."""
    code = (
        "import sys, typer\nfrom ml3cli.cli import app\nnames = list(typer.main.get_command(app).commands)\n"
        "for name in names:\n    try:\n        app([name, '--help'], prog_name='ml3')\n"
        "    except SystemExit as exc:\n        print('exit', name, exc.code)\n"
        "print('commands:', *names)\nprint(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    )
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60, env=env)
    names = next(line for line in proc.stdout.splitlines() if line.startswith("commands:")).split()[1:]
    assert {"meta-train", "meta-test", "compare", "landscape", "inspect", "tasks", "reproduce", "report"} <= set(names)
    for name in names:
        assert f"exit {name} 0" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert f"Usage: ml3 {name} [OPTIONS]" in proc.stdout
    assert proc.stdout.strip().endswith("[]")


# -- --seeds: a list or range of seeds in every command ------------------------------------------------------
def test_every_command_parses_seeds_in_one_place():
    assert meta_train.parse_seeds is parsing.parse_seeds
    assert parse_seeds("0-2,9") == [0, 1, 2, 9]


@pytest.mark.parametrize(
    ("seeds", "seed", "num_seeds", "expected"),
    [
        ("0-4", None, None, [0, 1, 2, 3, 4]),
        ("0,3,7", None, None, [0, 3, 7]),
        ("2-3,9", None, None, [2, 3, 9]),
        (None, 3, 2, [3, 4]),
        (None, None, 2, [0, 1]),
        (None, None, None, [0, 1, 2, 3, 4, 5]),  # the default count (the artifact's, else 5)
    ],
)
def test_evaluation_seeds(seeds, seed, num_seeds, expected):
    assert evaluation_seeds(seeds, seed, num_seeds, default_count=6) == expected


@pytest.mark.parametrize(
    ("seeds", "seed", "num_seeds", "message"),
    [
        ("5", None, None, "not a count; for 5 seeds write --num-seeds 5"),
        ("0-2", 1, None, "either --seeds, or --seed and --num-seeds"),
        ("0-2", None, 3, "either --seeds, or --seed and --num-seeds"),
        ("3-1", None, None, "expected non-negative seeds like 0-4"),
    ],
)
def test_evaluation_seeds_refused(seeds, seed, num_seeds, message):
    with pytest.raises(ML3Error, match=re.escape(message)):
        evaluation_seeds(seeds, seed, num_seeds, default_count=5)


def test_compare_evaluates_on_the_seeds_listed(tmp_path, monkeypatch, capsys):
    """`compare --seeds 0,3` evaluates on seeds 0 and 3: seed 3's numbers are those of `--seed 3 --num-seeds 1`."""
    listed = run_main(
        monkeypatch, capsys, "compare", *QUICK, "--seeds", "0,3", "--out-dir", tmp_path / "a", cwd=tmp_path
    )
    assert listed.code == 0, listed.output
    alone = run_main(
        monkeypatch, capsys, "compare", *QUICK, "--seed", "3", "--num-seeds", "1", "--out-dir", tmp_path / "b",
        cwd=tmp_path,
    )  # fmt: skip
    assert alone.code == 0, alone.output
    both, three = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("a", "b"))
    assert both["seeds"] == [0, 3] and three["seeds"] == [3]
    assert both["losses"][0]["per_seed"][1] == three["losses"][0]["per_seed"][0]
    assert both["losses"][0]["per_seed"][0] != three["losses"][0]["per_seed"][0]


def test_compare_refuses_a_count_given_to_seeds(tmp_path, monkeypatch, capsys):
    """`--seeds 3` meant three seeds before it meant a list: refused with the spelling of both meanings."""
    result = run_main(monkeypatch, capsys, "compare", *QUICK, "--seeds", "3", cwd=tmp_path)
    line = one_line_error(result)
    assert "--num-seeds 3" in line and "--seed 3 --num-seeds 1" in line
    assert not (tmp_path / "runs").exists()


# -- --threads -------------------------------------------------------------------------------------------------
class Configured(Exception):
    """Raised by the stand-in for ``runtime.configure``: the run stops once its threads are known."""


def test_threads_default_to_one_and_the_flag_sets_them(tmp_path, monkeypatch, capsys):
    """Every command that computes sets torch's threads: 1 unless `--threads N` (or the recipe's `threads`) says."""
    from ml3cli.commands import compare, landscape

    seen = []

    def configure(threads, *args, **kwargs):
        seen.append(threads)
        raise Configured

    for module in (meta_train, compare, landscape):
        monkeypatch.setattr(module, "configure", configure)
    recipe = write_recipe(tmp_path / "r.yaml", {k: v for k, v in TINY_RECIPE.items() if k != "threads"})
    commands = [
        ("meta-train", recipe, "--out", tmp_path / "x.safetensors"),
        ("meta-test", "--loss", "mse", "--task", "sine"),
        ("compare", *QUICK),
        ("landscape", "--loss", "mse", "--task", "sine_frequency"),
    ]
    for command in commands:
        for extra, threads in (((), 1), (("--threads", "2"), 2)):
            with pytest.raises(Configured):
                run_main(monkeypatch, capsys, *command, *extra, cwd=tmp_path)
            assert seen[-1] == threads, (command, extra)


# -- results are never replaced silently ------------------------------------------------------------------------
def test_default_output_folder_is_new_per_run_with_settings(tmp_path, monkeypatch, capsys):
    """Without --out-dir, each run writes to its own runs/compare/TASK/TIMESTAMP/ with settings.json: every option
    as used (the seeds listed, the defaults filled in) and the versions."""
    for _ in range(2):
        result = run_main(monkeypatch, capsys, "compare", *QUICK, "--seeds", "1-2", cwd=tmp_path)
        assert result.code == 0, result.output
    runs = sorted((tmp_path / "runs" / "compare" / "sine_shifted").iterdir())
    assert len(runs) == 2
    for folder in runs:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d(-\d+)?", folder.name)
        assert {p.name for p in folder.iterdir()} == {"results.json", "curves.csv", "curves.png", "settings.json"}
        settings = json.loads((folder / "settings.json").read_text())
        assert settings["command"] == "compare" and settings["argv"][:2] == ["ml3", "compare"]
        used = settings["settings"]
        assert used["seeds"] == [1, 2] and used["num_seeds"] == 2 and used["tasks"] == 2 and used["steps"] == 3
        assert (
            used["threshold"] > 0 and used["at"] == [0, 1, 3] and used["out_dir"] == str(folder.relative_to(tmp_path))
        )
        assert [loss["label"] for loss in used["losses"]] == ["mse"] and used["losses"][0]["lr"] > 0
        assert used["task_options"]["points"] > 0  # the task's options as used, defaults included
        assert settings["versions"]["ml3"] == ml3cli.__version__ and settings["versions"]["torch"]


def test_meta_test_without_a_recorded_meta_test_uses_the_documented_defaults(tmp_path, monkeypatch, capsys):
    """Nothing recorded (a built-in loss, here `huber`) and no counts given: 10 test tasks × seeds 0 … 4 and 100 SGD
    steps, the table at steps 0, 1, 10, 50, 100 and the last (the run here takes --steps 2: 0, 1, 2), the threshold
    half the initial loss, the paired difference against the baseline with a 95% interval; settings.json records the
    versions of ml3, torch, numpy and Python."""
    from ml3cli.commands.compare import table_steps
    from ml3cli.commands.options import EvalOptions

    assert EvalOptions.DEFAULT_STEPS == 100 and table_steps(EvalOptions.DEFAULT_STEPS) == [0, 1, 10, 50, 100]
    tiny = ("--task-option", "hidden=[4]", "--task-option", "points=8", "--task-option", "query_points=8")
    out = tmp_path / "o"
    args = ("meta-test", "--loss", "huber", "--task", "sine_shifted", *tiny, "--steps", "2", "-q", "--out-dir", out)
    result = run_main(monkeypatch, capsys, *args, cwd=tmp_path)
    assert result.code == 0, result.output
    document = json.loads((out / "results.json").read_text())
    settings = json.loads((out / "settings.json").read_text())
    used = settings["settings"]
    assert (used["tasks"], used["seeds"], used["at"]) == (10, [0, 1, 2, 3, 4], [0, 1, 2])
    assert [loss["name"] for loss in document["losses"]] == ["huber", "mse"]
    assert used["threshold"] == pytest.approx(document["losses"][0]["mean"][0] / 2, rel=1e-9)
    assert re.search(r"mse − huber at step 2: \S+ \(95% CI \S+ … \S+\)", re.sub(r"\s+", " ", result.stdout))
    assert set(settings["versions"]) >= {"ml3", "torch", "numpy", "python"}


def test_one_seed_prints_no_interval_rather_than_nan(tmp_path, monkeypatch, capsys):
    """A paired 95% interval needs two seeds or more: with one, the line says so instead of "nan … nan"."""
    tiny = ("--task-option", "hidden=[4]", "--task-option", "points=8", "--task-option", "query_points=8")
    args = ("meta-test", "--loss", "huber", "--task", "sine_shifted", *tiny, "--steps", "2", "--num-seeds", "1")
    result = run_main(monkeypatch, capsys, *args, "-q", "--out-dir", tmp_path / "o", cwd=tmp_path)
    assert result.code == 0, result.output
    text = re.sub(r"\s+", " ", result.stdout)
    assert "mse − huber at step 2:" in text and "(no interval from one seed)" in text and "nan" not in text


def test_out_dir_with_results_is_refused_unless_overwrite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    first = run_main(monkeypatch, capsys, "compare", *QUICK, "--out-dir", out, cwd=tmp_path)
    assert first.code == 0, first.output
    before = (out / "results.json").read_bytes()
    again = run_main(monkeypatch, capsys, "compare", *QUICK, "--num-seeds", "2", "--out-dir", out, cwd=tmp_path)
    line = one_line_error(again)
    assert "already holds" in line and "results.json" in line and "--overwrite" in line
    assert (out / "results.json").read_bytes() == before
    forced = run_main(
        monkeypatch, capsys, "compare", *QUICK, "--num-seeds", "2", "--out-dir", out, "--overwrite", cwd=tmp_path
    )
    assert forced.code == 0, forced.output
    assert len(json.loads((out / "results.json").read_text())["seeds"]) == 2
    assert json.loads((out / "settings.json").read_text())["settings"]["overwrite"] is True


def test_existing_json_file_is_refused_unless_overwrite(tmp_path, monkeypatch, capsys):
    path = tmp_path / "r.json"
    path.write_text("{}")
    result = run_main(monkeypatch, capsys, "compare", *QUICK, "--json", path, cwd=tmp_path)
    assert "--overwrite" in one_line_error(result) and path.read_text() == "{}"
    result = run_main(monkeypatch, capsys, "compare", *QUICK, "--json", path, "--overwrite", cwd=tmp_path)
    assert result.code == 0, result.output
    assert json.loads(path.read_text())["task"] == "sine_shifted"


def test_landscape_refuses_to_overwrite_and_writes_settings(tmp_path, monkeypatch, capsys):
    args = ("landscape", "--loss", "mse", "--task", "sine_frequency", "--tasks", "2", "--points", "9", "-q")
    out = tmp_path / "ls"
    assert run_main(monkeypatch, capsys, *args, "--out-dir", out, cwd=tmp_path).code == 0
    assert json.loads((out / "settings.json").read_text())["settings"]["points"] == 9
    assert "landscape.png" in one_line_error(run_main(monkeypatch, capsys, *args, "--out-dir", out, cwd=tmp_path))
    assert run_main(monkeypatch, capsys, *args, "--out-dir", out, "--overwrite", cwd=tmp_path).code == 0
    assert run_main(monkeypatch, capsys, *args, cwd=tmp_path).code == 0
    (folder,) = (tmp_path / "runs" / "landscape" / "sine_frequency").iterdir()
    assert (folder / "landscape.png").is_file() and (folder / "settings.json").is_file()


def test_json_dash_writes_json_to_stdout_and_the_table_to_stderr(tmp_path, monkeypatch, capsys):
    result = run_main(monkeypatch, capsys, "compare", *QUICK, "--json", "-", "--out-dir", tmp_path / "o", cwd=tmp_path)
    assert result.code == 0, result.output
    assert json.loads(result.stdout)["task"] == "sine_shifted"
    assert "step 3" in result.stderr


def test_meta_train_warns_before_replacing_an_artifact_and_shows_the_meta_test_progress(tmp_path, monkeypatch, capsys):
    recipe = write_recipe(tmp_path / "tiny.yaml", TINY_RECIPE)
    out = tmp_path / "x.safetensors"
    first = run_main(monkeypatch, capsys, "meta-train", recipe, "--out", out, cwd=tmp_path)
    assert first.code == 0, first.output
    assert "warning" not in first.stderr
    assert "meta-test on sine_shifted: seed" in first.stdout  # the progress bar of the built-in meta-test
    summary = re.sub(r"\s+", " ", first.stdout)
    assert re.search(r"task loss at θ₀ \S+ → after 1 inner step \S+ \(outer step 30, mean over 2 tasks\)", summary)
    again = run_main(monkeypatch, capsys, "meta-train", recipe, "--out", out, "-q", cwd=tmp_path)
    assert again.code == 0, again.output
    assert f"warning: {out} exists and will be replaced" in re.sub(r"\s+", " ", again.stderr)
    assert "meta-test on sine_shifted: seed" not in again.stdout  # --quiet


def test_quiet_hides_the_progress_bars_of_meta_test_compare_and_landscape(tmp_path, monkeypatch, capsys):
    """Without `--quiet` each shows a progress bar; with `-q` none does, and the results still print."""
    short = ("--tasks", "1", "--num-seeds", "1", "--steps", "1", "--task-option", "hidden=[4]")
    runs = {
        "meta-test sine_shifted: 1 losses, seed": ("meta-test", "--loss", "mse", "--task", "sine_shifted", *short),
        "compare sine_shifted: 1 losses, seed": ("compare", "--loss", "mse", "--task", "sine_shifted", *short),
        "landscape sine_frequency: task": ("landscape", "--loss", "mse", "--task", "sine_frequency", "--tasks", "1",
                                           "--points", "3"),
    }  # fmt: skip
    for bar, args in runs.items():
        for quiet in ((), ("-q",)):
            out = tmp_path / f"{args[0]}{len(quiet)}"
            result = run_main(monkeypatch, capsys, *args, *quiet, "--out-dir", out, cwd=tmp_path)
            assert result.code == 0, result.output
            assert (bar in result.output) == (not quiet), (args, quiet, result.output[:300])
            assert "┃" in result.stdout and (out / "settings.json").is_file()


# -- errors list the valid names and suggest the close one -----------------------------------------------------
def test_unknown_task_option_lists_the_valid_keys(tmp_path, monkeypatch, capsys):
    result = run_main(monkeypatch, capsys, "compare", *QUICK, "--task-option", "hiden=[4]", cwd=tmp_path)
    line = one_line_error(result)
    assert "--task-option hiden" in line and "did you mean 'hidden'?" in line
    assert "known: activation, amplitude_range, hidden, phase_range, points, query_points, x_range" in line


def test_unknown_task_suggests_the_close_one(tmp_path, monkeypatch, capsys):
    result = run_main(monkeypatch, capsys, "compare", "--task", "sine_shiftd", "--loss", "mse", cwd=tmp_path)
    line = one_line_error(result)
    assert "unknown task 'sine_shiftd'; did you mean 'sine_shifted'?" in line and "mnist_binary" in line


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("outer.stpes=3", "unknown field `outer.stpes`; did you mean 'steps'? known: grad_clip, lr, lr_schedule"),
        ("nmae=x", "unknown field `nmae`; did you mean 'name'?"),
        ("meta_test.task_options.pionts=3", "`meta_test.task_options.pionts`; did you mean 'points'?"),
        ("meta_loss.zzz=1", "unknown field `meta_loss.zzz`; known: activation, bias, hidden, learned_lr, output"),
    ],
)
def test_unknown_recipe_field_suggests_the_close_one(tmp_path, override, expected):
    recipe = write_recipe(tmp_path / "r.yaml", TINY_RECIPE)
    with pytest.raises(ML3Error, match=re.escape(expected)):
        load_recipe(recipe, [override])


def test_inspect_of_a_file_that_is_not_an_artifact(tmp_path, monkeypatch, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello, these are notes and not a loss\n")
    png = tmp_path / "curves.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    for path, kind in ((text, "text"), (png, "a PNG image")):
        line = one_line_error(run_main(monkeypatch, capsys, "inspect", path, cwd=tmp_path))
        assert f"{path}: not an ml3 loss artifact (not a safetensors file; it looks like {kind})" in line
        assert "header" not in line


# -- tables fit 80 columns ------------------------------------------------------------------------------------------
def test_tables_fit_80_columns(tmp_path, monkeypatch, capsys):
    """At COLUMNS=80 no cell of the compare table (three losses, six steps) or the 1-D landscape table wraps."""
    monkeypatch.setenv("COLUMNS", "80")
    result = run_main(
        monkeypatch, capsys, "compare", "--task", "sine_shifted", "--loss", "mse", "--loss", "mse@0.01",
        "--loss", "l1@0.003", "--tasks", "2", "--num-seeds", "2", "--steps", "120", "-q", cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    rows = [line for line in lines if re.match(r"│ step \d", line)]
    assert [row.split("│")[1].strip() for row in rows] == [f"step {s}" for s in (0, 1, 10, 50, 100, 120)]
    cells = [cell.strip() for row in rows for cell in row.split("│")[2:-1]]
    assert len(cells) == 18 and all(re.fullmatch(r"[\d.e+-]+ ± [\d.e+-]+", cell) for cell in cells), cells
    assert any(line.startswith("│ steps to ≤") for line in lines)

    result = run_main(
        monkeypatch, capsys, "landscape", "--loss", "mse", "--loss", "l1", "--task", "sine_frequency", "--tasks", "8",
        "--points", "9", "-q", cwd=tmp_path,
    )  # fmt: skip
    assert result.code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    assert sum(re.fullmatch(r"│ +-?[\d.e-]+ │ +[\d.]+ │ +[\d.]+ │", line) is not None for line in lines) == 8
    assert "(θ ∈ [-7, 7], target: θ*)" in re.sub(r"\s+", " ", result.stdout)


# -- the simulators are an optional extra -------------------------------------------------------------------------
def test_a_missing_simulator_names_the_extra(monkeypatch):
    """A simulator import that fails becomes one MissingExtra naming the extra (gymnasium's own guard too)."""
    monkeypatch.setitem(sys.modules, "mujoco", None)
    with pytest.raises(MissingExtra, match=r"^the Reacher needs mujoco, .* pip install 'ml3cli\[sim\]'$"):
        with simulators_needed("the Reacher"):
            import mujoco  # noqa: F401
    DependencyNotInstalled = type("DependencyNotInstalled", (Exception,), {})
    with pytest.raises(MissingExtra, match=r"\[sim\]"):
        with simulators_needed("gymnasium's Ant"):
            raise DependencyNotInstalled("MuJoCo is not installed")
    with pytest.raises(ModuleNotFoundError):  # anything else keeps its traceback
        with simulators_needed("the Reacher"):
            import ml3cli_no_such_module  # noqa: F401


BLOCKED = """
import json, sys
for name in ("mujoco", "gymnasium", "pybullet"):
    sys.modules[name] = None  # as if `pip install ml3cli` without the [sim] extra
from ml3cli.errors import ML3Error
from ml3cli.tasks import REGISTRY, make_task
found = {}
for name in REGISTRY:
    try:
        make_task(name)
        found[name] = "ok"
    except ML3Error as err:
        found[name] = str(err)
print(json.dumps(found))
"""


def test_tasks_without_the_simulators_extra(tmp_path):
    """Without mujoco, gymnasium and pybullet the sine, MNIST and mountain car tasks build; every other task is
    refused when built, in one line naming itself and the extra."""
    proc = subprocess.run([sys.executable, "-c", BLOCKED], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout)
    supervised = {"sine", "sine_shifted", "sine_frequency", "mnist", "mnist_binary", "mountain_car"}
    assert {name for name, message in found.items() if message == "ok"} == supervised
    for name, message in found.items():
        if name not in supervised:
            assert re.fullmatch(
                rf"task '{name}' needs \w+, which is not installed: .* pip install 'ml3cli\[sim\]'", message
            )


def test_cli_without_the_simulators_extra(tmp_path):
    code = (
        "import sys\nsys.modules['mujoco'] = sys.modules['gymnasium'] = None\nfrom ml3cli.cli import main\n"
        "sys.argv = ['ml3', 'compare', '--task', 'reacher_goal', '--loss', 'final_distance']\nmain()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip() == (
        "error: task 'reacher_goal' needs gymnasium, which is not installed: it comes with the optional extra "
        "[sim], pip install 'ml3cli[sim]'"
    )
    assert not Path(tmp_path / "runs").exists()


def test_no_help_text_loses_words_to_rich_markup():
    """Help is rendered with rich, which takes "[word]" for a style and drops it ("needs the [tensorboard]
    extra" printed as "needs the  extra"): every command's and option's help must render to its own words."""
    import typer
    from rich.text import Text

    from ml3cli.cli import app

    def walk(command, path):
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*path, name])

    lost = [
        (" ".join(path), name)
        for path, command in walk(typer.main.get_command(app), ["ml3"])
        for name, text in [
            ("help", command.help or ""),
            *((p.name, getattr(p, "help", None) or "") for p in command.params),
        ]
        if Text.from_markup(text).plain != text.replace("\\[", "[")
    ]
    assert not lost
