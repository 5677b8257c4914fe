"""``ml3 reproduce`` and ``ml3 report``: a tiny end-to-end run, artifact reuse, the verdict rule, the schema, and the
committed results page being what the committed JSON gives."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from helpers import REPO, run_main
from rich.console import Console

from ml3cli.commands import report
from ml3cli.commands.options import ReproduceOptions
from ml3cli.commands.reproduce import reproduce
from ml3cli.errors import ML3Error
from ml3cli.experiments import REPRODUCIBLE, experiment
from ml3cli.experiments.protocol import VERDICTS, Paired, validate_results, verdict

#: sine_reference shrunk to seconds: 3 outer steps, a small optimizee, 5 SGD steps at meta-test
TINY = (
    "outer.steps=3",
    "task_options.hidden=[8]",
    "meta_test.task_options.hidden=[8]",
    "meta_test.steps=5",
    "meta_loss.hidden=[8]",
)


@pytest.fixture
def tiny_experiment(tmp_path, monkeypatch):
    """The sine_reference experiment with tiny settings, run in an empty folder (the recipes come with ml3)."""
    monkeypatch.chdir(tmp_path)
    exp = dataclasses.replace(experiment("sine_reference"), quick=TINY, quick_eval={"tasks": 2, "seeds": 2})
    return exp, ReproduceOptions(quick=True, meta_seeds=2, jobs=2, out_dir=tmp_path / "out")


def test_quick_reproduction_writes_valid_results_and_reuses_its_artifacts(tiny_experiment, tmp_path, capsys):
    exp, options = tiny_experiment
    console = Console(width=120)
    document = reproduce(exp, options, console)
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written == json.loads(json.dumps(document))  # what was returned is what was written
    validate_results(written, "results.json")
    assert written["verdict"] in VERDICTS and written["quick"] is True
    (comparison,) = written["comparisons"]
    assert np.array(comparison["final"]["learned_tuned"]).shape == (2, 2)  # meta-train seeds × test seeds
    assert comparison["same_lr"]["pairs"] == comparison["tuned"]["pairs"] == 4
    scores = comparison["lr"]["baseline_scores"]
    chosen = comparison["lr"]["baseline_tuned"]
    assert min(scores, key=lambda lr: scores[lr]) == str(chosen) or float(min(scores, key=scores.get)) == chosen
    assert (tmp_path / "out" / "figure.png").read_bytes()[:4] == b"\x89PNG"
    assert not any(record["reused"] for record in written["meta_train"])

    capsys.readouterr()
    again = reproduce(exp, options, console)
    assert all(record["reused"] for record in again["meta_train"])
    assert "no meta-training needed" in capsys.readouterr().out
    assert again["comparisons"][0]["final"] == comparison["final"]  # same artifacts, same streams: same numbers


def test_a_changed_recipe_is_meta_trained_again(tmp_path, monkeypatch, capsys):
    """An artifact is reused only when it was meta-trained by exactly the job's recipe and seed: another override or
    another seed meta-trains again (reproduce's reuse of unchanged artifacts is tested above, end to end)."""
    from ml3cli.experiments.protocol import MetaTrainJob

    artifact = tmp_path / "a.safetensors"
    sets = [word for item in TINY for word in ("--set", item)]
    trained = run_main(
        monkeypatch, capsys, "meta-train", "sine_reference", *sets, "--out", artifact, "-q", cwd=tmp_path
    )
    assert trained.code == 0, trained.output
    assert MetaTrainJob("sine_reference", 0, TINY, artifact).reusable()
    assert not MetaTrainJob("sine_reference", 0, (*TINY, "outer.lr=0.01"), artifact).reusable()
    assert not MetaTrainJob("sine_reference", 1, TINY, artifact).reusable()
    assert not MetaTrainJob("sine_reference", 0, TINY, tmp_path / "missing.safetensors").reusable()


def test_the_verdict_compares_tuned_against_tuned():
    better = Paired(-1.0, -1.5, -0.5, 10, 10)
    worse = Paired(0.5, 0.1, 0.9, 0, 10)
    unclear = Paired(-0.1, -0.5, 0.3, 6, 10)
    assert verdict(same=worse, tuned=better)["verdict"] == "reproduced"
    step_size = verdict(same=better, tuned=worse)
    assert step_size["verdict"] == "partly" and "step size" in step_size["why"]
    assert verdict(same=worse, tuned=unclear)["verdict"] == "partly"
    assert verdict(same=worse, tuned=worse)["verdict"] == "not reproduced"


def test_paired_intervals_use_every_meta_train_and_test_seed_pair():
    learned = np.array([[1.0, 2.0, 3.0], [1.5, 2.5, 3.5]])
    baseline = np.array([2.0, 3.0, 4.0])
    paired = Paired.of(learned, baseline)
    assert paired.pairs == 6 and paired.learned_better_on == 6
    assert paired.mean == pytest.approx(-0.75) and paired.low < paired.mean < paired.high < 0


def test_a_malformed_results_file_names_the_field():
    with pytest.raises(ML3Error, match=r"results.json: missing required field `paper`"):
        validate_results({"experiment": "sine"}, "results.json")


def test_reproduce_list_and_unknown_names(tmp_path, monkeypatch, capsys):
    result = run_main(monkeypatch, capsys, "reproduce", "--list", cwd=tmp_path)
    assert result.code == 0 and all(name in result.stdout for name in REPRODUCIBLE)
    result = run_main(monkeypatch, capsys, "reproduce", "sinus", cwd=tmp_path)
    assert result.code == 2 and "unknown experiment 'sinus'" in result.stderr


def test_the_committed_results_page_is_what_the_committed_json_gives(monkeypatch):
    """docs/results.md, the README's status table and the guide's table of shipped losses are generated by
    `ml3 report`: never edited by hand."""
    monkeypatch.chdir(REPO)
    report.run(Console(quiet=True), check=True)


def test_the_table_of_targets_is_filled_from_the_comparisons_it_names():
    """Each cell of the targets table is its comparison's verdict and Δ at tuned rates (a changed number in the
    data changes the cell) and the metric shown beside it at tuned rates, a target is met only when a cell is
    reproduced, an experiment without a full run says "not run", and a label the results do not hold is refused,
    naming it."""
    import copy

    from ml3cli.commands.output import fmt
    from ml3cli.commands.reproduce import RESULTS
    from ml3cli.experiments.targets import TARGETS, Measured, Target

    documents = report.load_results(REPO / RESULTS)
    assert all(where.experiment in REPRODUCIBLE for t in TARGETS for where in t.cells().values() if where)
    report.targets_table(documents)  # every label of a committed experiment is found
    sine = next(d for d in documents if d["experiment"] == "beyond_sine")
    target = Target(
        task="sine", beat="MSE", plain=Measured("beyond_sine", "sgd: plain ML³ (sine)"), frozen=None,
        adapting=Measured("no_such_run", "anything"),
    )  # fmt: skip
    row = report.targets_table([sine], (target,)).splitlines()[-1]
    plain = sine["comparisons"][0]
    assert plain["label"] == "sgd: plain ML³ (sine)"
    assert f"**{plain['verdict']['verdict']}**: Δ {report.difference(plain['tuned'])} after 100 SGD steps" in row
    assert "| — |" in row and "not run (`ml3 reproduce no_such_run`)" in row and row.endswith("| no |")
    changed = copy.deepcopy(sine)
    changed["comparisons"][0]["tuned"]["mean"] = -12.5
    changed["comparisons"][0]["verdict"]["verdict"] = "reproduced"
    row = report.targets_table([changed], (target,)).splitlines()[-1]
    assert "**reproduced**: Δ -12.5 (" in row and row.endswith("| **yes** |")
    mnist = next(d for d in documents if d["experiment"] == "beyond_mnist_binary")["comparisons"][0]
    accuracy = {k: v["accuracy"] for k, v in mnist["extra"]["report_metrics"].items()}
    learned = np.mean([accuracy[f"learned{m}@tuned"] for m in mnist["meta_seeds"]])
    shown = Target(task="pairs", beat="CE", plain=Measured("beyond_mnist_binary", mnist["label"]), frozen=None,
                   adapting=None, beside="accuracy")  # fmt: skip
    row = report.targets_table(documents, (shown,)).splitlines()[-1]
    assert f"steps; accuracy {fmt(learned)} vs {fmt(accuracy['baseline@tuned'])} ([" in row
    renamed = dataclasses.replace(target, plain=Measured("beyond_sine", "sgd: plain (renamed)"))
    with pytest.raises(ML3Error, match=r"'sgd: plain \(renamed\)' of beyond_sine, which results/beyond_sine"):
        report.targets_table([sine], (renamed,))


def test_a_baseline_that_diverged_at_the_fixed_rate_is_said_so():
    """beyond_sawyer's torque MSE diverges at the recipes' fixed rate: its section says so; the same comparison
    with a finite baseline there does not."""
    import copy

    from ml3cli.commands.reproduce import RESULTS

    sawyer = next(d for d in report.load_results(REPO / RESULTS) if d["experiment"] == "beyond_sawyer")
    sawyer = {**sawyer, "comparisons": sawyer["comparisons"][:1]}
    assert "torque_mse diverged (nan)" in "\n".join(report.experiment_section(sawyer))
    finite = copy.deepcopy(sawyer)
    finite["comparisons"][0]["final"]["baseline_fixed"] = [1.0] * len(
        finite["comparisons"][0]["final"]["baseline_fixed"]
    )
    assert "diverged" not in "\n".join(report.experiment_section(finite))


def test_a_stale_table_of_shipped_losses_is_refused_and_regenerated(tmp_path, monkeypatch):
    """One number changed by hand in docs/cli.md's table is caught by `ml3 report --check`; `ml3 report` puts back
    exactly what the index gives and leaves the rest of the guide alone."""
    import shutil

    for name in ("README.md", "docs", "results"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    guide = tmp_path / "docs" / "cli.md"
    committed = guide.read_text(encoding="utf-8")
    row = next(line for line in committed.splitlines() if line.startswith("| `sine` |"))
    guide.write_text(committed.replace(row, row.replace("1.885", "1.886")), encoding="utf-8")
    with pytest.raises(ML3Error, match=r"docs/cli.md differ"):
        report.run(Console(quiet=True), check=True)
    report.run(Console(quiet=True))
    assert guide.read_text(encoding="utf-8") == committed


def test_a_control_keeps_its_verdict_but_not_the_experiments():
    """A comparison shown beside the claim (``control``) does not decide the experiment's verdict."""
    from ml3cli.experiments.protocol import overall_verdict

    def comparison(found: str, control: bool = False) -> dict:
        return {"verdict": {"verdict": found, "why": ""}, "control": control}

    assert overall_verdict([comparison("reproduced"), comparison("not reproduced", control=True)]) == "reproduced"
    assert overall_verdict([comparison("reproduced"), comparison("not reproduced")]) == "partly"
    assert overall_verdict([comparison("not reproduced", control=True)]) == "not reproduced"


def test_a_record_with_a_baseline_per_meta_train_seed_pairs_seed_with_seed():
    """learned seed m is paired with baseline seed m (e.g. one learned loss against another)."""
    from ml3cli.evaluate import LossCurves
    from ml3cli.experiments.protocol import comparison_record

    def curves(final: list[float]) -> LossCurves:
        values = np.zeros((len(final), 1, 3))
        values[:, 0, 2] = final
        return LossCurves("", 0.1, "", values)

    found = {
        "learned0@fixed": curves([1.0, 2.0]), "learned0@tuned": curves([1.0, 2.0]),
        "learned1@fixed": curves([5.0, 6.0]), "learned1@tuned": curves([5.0, 6.0]),
        "baseline0@fixed": curves([2.0, 3.0]), "baseline0@tuned": curves([2.0, 3.0]),
        "baseline1@fixed": curves([6.0, 7.0]), "baseline1@tuned": curves([6.0, 7.0]),
    }  # fmt: skip
    lr = {"fixed": 0.1, "baseline_tuned": {"0": 0.1, "1": 0.3}, "baseline_scores": {}, "learned_tuned": {"0": 0.1, "1": 0.1}, "learned_scores": {}}  # fmt: skip
    record = comparison_record(
        recipe="r", label="r", task="t", metric="m", baseline="other", steps=2, tasks=1, seeds=2,
        meta_seeds=[0, 1], curves=found, lr=lr, seconds={}, report_steps=(0, 2),
    )  # fmt: skip
    # paired seed with seed, every difference is −1; against the mean baseline it would not be
    assert record["tuned"]["mean"] == pytest.approx(-1.0) and record["tuned"]["high"] == pytest.approx(-1.0)
    assert np.array(record["final"]["baseline_tuned"]).shape == (2, 2)
    assert record["curves"]["baseline@tuned"]["2"] == pytest.approx(4.5)
    from ml3cli.commands.reproduce import summarize

    assert summarize(record, "tuned")["baseline_lr"] == "0.1/0.3"


def check_quick_results(out, document: dict) -> None:
    """What every experiment's --quick run must leave behind: a valid results.json equal to what was returned, a
    verdict of the three, the comparison figure, and every comparison with one row per meta-train seed."""
    written = json.loads((out / "results.json").read_text())
    assert written == json.loads(json.dumps(document))
    validate_results(written, str(out / "results.json"))
    assert written["quick"] and written["verdict"] in VERDICTS
    assert (out / "figure.png").read_bytes()[:4] == b"\x89PNG"
    for comparison in written["comparisons"]:
        assert comparison["verdict"]["verdict"] in VERDICTS
        assert len(comparison["final"]["learned_tuned"]) == len(comparison["meta_seeds"]) == 2


def test_the_sine_experiment_runs_quick_end_to_end(tmp_path, monkeypatch):
    """`ml3 reproduce sine --quick`: the paper's first experiment with its own smoke settings."""
    monkeypatch.chdir(tmp_path)
    options = ReproduceOptions(quick=True, jobs=2, out_dir=tmp_path / "out")
    check_quick_results(tmp_path / "out", reproduce(experiment("sine"), options, Console(quiet=True)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["sine_reference", "shaped_sine", "mnist_binary", "beyond_sine", "beyond_mnist_binary", "beyond_mnist"]
)
def test_the_supervised_experiments_run_quick_end_to_end(name, tmp_path, monkeypatch):
    """The other supervised experiments at their --quick settings (the RL and robot ones have their own files)."""
    monkeypatch.chdir(tmp_path)
    options = ReproduceOptions(quick=True, jobs=2, out_dir=tmp_path / "out")
    check_quick_results(tmp_path / "out", reproduce(experiment(name), options, Console(quiet=True)))


def test_the_speed_page_tables_are_made_from_the_benchmarks_json(tmp_path):
    """docs/speed.md's benchmark tables come from results/benchmarks/NAME.json, between their markers; without a
    JSON the page is left as it is."""
    import json

    from ml3cli.commands.report import SPEED, with_benchmark_tables

    page = SPEED.read_text(encoding="utf-8")
    assert with_benchmark_tables(page, tmp_path) is None
    sweeps = {
        "commit": "0123456789abcdef",
        "versions": {"torch": "2.13.0"},
        "rounds": 2,
        "load_after": 1.25,
        "results": {
            "sine": {"task": "sine_shifted", "rates": 9, "seeds": 5, "tasks": 10, "steps": 100, "looped_seconds": 19.5,
                     "batched_seconds": 3.0, "speedup": 6.5, "speedup_range": [6.1, 6.9], "same_scores": True},
        },
    }  # fmt: skip
    (tmp_path / "sweeps.json").write_text(json.dumps(sweeps))
    made = with_benchmark_tables(page, tmp_path)
    assert "| sine (sine_shifted) | 9 × 5 × 10 × 100 | 19.50 | 3.00 | 6.50× (6.10–6.90) | yes |" in made
    assert "commit `0123456789` with torch 2.13.0, 2 rounds, load 1.2 after the run" in made
    begin, end = "<!-- sweeps table: generated", "<!-- end of the generated sweeps table -->"
    assert made.split(begin)[0] == page.split(begin)[0] and made.split(end)[1] == page.split(end)[1]


def test_a_comparison_trains_and_tunes_every_loss_with_the_chosen_optimizer_and_adaptation(
    tiny_experiment, tmp_path, monkeypatch, capsys
):
    """compare_losses(optimizer="adam"): the baseline's test curves are Adam's at the rate tuned for Adam, not
    SGD's; with adaptation the learned losses adapt at tuning and at test, and the hand-written baseline does not."""
    from ml3cli.engine.inner_optimizers import Adam
    from ml3cli.engine.online import Adaptation
    from ml3cli.evaluate import evaluate
    from ml3cli.experiments.protocol import Context, EvalSizes, compare_losses
    from ml3cli.losses import builtin_loss
    from ml3cli.tasks import make_task

    exp, _ = tiny_experiment
    artifact = tmp_path / "tiny.safetensors"
    sets = [word for item in TINY for word in ("--set", item)]
    trained = run_main(
        monkeypatch, capsys, "meta-train", "sine_reference", *sets, "--out", artifact, "-q", cwd=tmp_path
    )
    assert trained.code == 0, trained.output
    context = Context(
        experiment=exp, quick=True, meta_seeds=[0], overrides={"sine_reference": list(TINY)},
        artifact_paths={"sine_reference": {0: artifact}},
    )  # fmt: skip
    sizes = EvalSizes(grid_span=1.0, grid_step=1.0)  # 3 rates to start, a decade apart: enough to tell rules apart
    plain = compare_losses(context, "sine_reference", sizes=sizes)
    adam = compare_losses(context, "sine_reference", optimizer="adam", sizes=sizes)
    assert "optimizer" not in plain["extra"] and adam["extra"]["optimizer"] == "adam"

    recipe = context.recipe("sine_reference", seed=0)
    task = make_task(recipe.meta_test.task, recipe.meta_test.task_options)
    rate = adam["lr"]["baseline_tuned"]
    (by_hand,) = evaluate(task, [builtin_loss(task, "mse", rate)], 2, 2, recipe.meta_test.steps, optimizer=Adam())
    assert adam["final"]["baseline_tuned"] == pytest.approx(by_hand.at(recipe.meta_test.steps).tolist(), rel=1e-6)
    assert adam["final"]["baseline_fixed"] != plain["final"]["baseline_fixed"]

    adapting = compare_losses(context, "sine_reference", adaptation=Adaptation(lr=0.05), sizes=sizes)
    assert adapting["extra"]["adaptation"]["lr"] == 0.05
    assert adapting["final"]["baseline_tuned"] == plain["final"]["baseline_tuned"]  # a fixed hand-written loss
    assert adapting["lr"]["learned_scores"] != plain["lr"]["learned_scores"]  # tuned as it is tested: adapting
    assert adapting["final"]["learned_fixed"] != plain["final"]["learned_fixed"]


def test_a_rate_tuned_at_the_edge_of_the_rates_tried_is_named_on_the_results_page():
    """A tuned rate that is the lowest or highest one tried is no interior optimum: the page names the loss."""
    lr = {
        "baseline_tuned": 0.01, "baseline_scores": {"0.001": 2.0, "0.01": 1.0, "0.1": 3.0},
        "learned_tuned": {"0": 0.01, "1": 1e-8},
        "learned_scores": {"0": {"0.001": 2.0, "0.01": 1.0, "0.1": 3.0}, "1": {"1e-08": 4.0, "1e-06": 4.1, "0.1": 9.0}},
    }  # fmt: skip
    assert report.rates_at_the_edge({"lr": lr}) == ["learned1 (1e-08)"]
    lr["baseline_tuned"] = 0.1
    assert report.rates_at_the_edge({"lr": lr}) == ["baseline (0.1)", "learned1 (1e-08)"]
