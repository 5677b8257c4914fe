"""Mutation testing on demand (mutmut 3): mutate one module, run the tests that cover it, print the score.

    python scripts/mutation.py --list              # the targets, their modules and tests
    python scripts/mutation.py evaluate            # mutate the evaluation statistics, print the score and survivors
    python scripts/mutation.py evaluate --report-only --diffs   # the last run's survivors, each with its change
    python scripts/mutation.py evaluate --only 'ml3cli.evaluate.x_lr_grid__mutmut_*'   # re-check a few mutants

Each target names the files (and, where only part of a file is meant, the functions) to mutate and the test files
that cover them. mutmut reads its settings from ``[tool.mutmut]`` in ``pyproject.toml``; rather than rewrite that
file for each target, this script hands mutmut the target's settings in-process and runs it, one mutant at a time
(``--max-children 1``, the machine is shared). mutmut copies the package and the tests into ``mutants/``
(ignored by git) and imports the mutated copy from there, never the installed package; the folder is cleared
before each run, because the tests mutmut maps to each function depend on the target's test selection.

The score counts timeouts as killed (a mutant that makes a test hang is caught) and mutants no selected test
reaches as survivors. Survivors judged equivalent (same observable behaviour as the original, argued in
``EQUIVALENT``) are left out of the denominator; mutant names are stable while the mutated file is unchanged.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    """What one run mutates and which tests it runs against the mutants."""

    modules: tuple[str, ...]  #: files to mutate, relative to the repository root
    tests: tuple[str, ...]  #: test files or node ids run against each mutant
    functions: tuple[str, ...] = ()  #: mutant-name globs when only part of the modules is meant (empty: all)


TARGETS = {
    "evaluate": Target(
        modules=("ml3cli/evaluate.py",),
        tests=("tests/test_confidence.py", "tests/test_tuning.py", "tests/test_step_size.py"),
        # the statistics of a comparison, not the training loops (those are the engine's and the tasks' tests)
        functions=(
            "ml3cli.evaluate.xǁLossCurvesǁsteps_to__mutmut_*",
            "ml3cli.evaluate.x_paired_difference__mutmut_*",
            "ml3cli.evaluate.x_t_quantile_975__mutmut_*",
            "ml3cli.evaluate.x_lr_grid__mutmut_*",
            "ml3cli.evaluate.x_widen_until_interior__mutmut_*",
            "ml3cli.evaluate.x_metric_at__mutmut_*",
            "ml3cli.evaluate.x_step_size_ratio__mutmut_*",
        ),
    ),
    # the contract tests of every family, run for the sine families only
    "sine": Target(modules=("ml3cli/tasks/sine.py",), tests=("tests/test_tasks.py", "-k", "sine")),
    "artifacts": Target(modules=("ml3cli/artifacts.py",), tests=("tests/test_artifacts.py",)),
    "metadata": Target(modules=("ml3cli/metadata.py",), tests=("tests/test_artifacts.py",)),
    "engine": Target(
        modules=tuple(
            f"ml3cli/engine/{name}.py"
            for name in ("unroll", "inner_optimizers", "estimators", "outer", "state", "data")
        ),
        # the outer loop's resume, data-collecting tasks and the learned inner rate drive paths of the engine that
        # test_engine does not; the real-signal chain (20 s a run, a subprocess) is left to the default suite
        tests=(
            "tests/test_engine.py",
            "tests/test_inner_optimizers.py",
            "tests/test_collect.py",
            "tests/test_resume.py",
            "tests/test_learned_lr.py",
            "tests/test_outer_loop.py",
            "tests/test_engine_contracts.py",
            "-k",
            "not real_signals",
        ),
    ),
}

#: survivors with the same observable behaviour as the original, and why (see docs/testing.md)
EQUIVALENT: dict[str, str] = {
    # step_size_ratio
    "ml3cli.evaluate.x_step_size_ratio__mutmut_81": "collects data whether or not the task does: Task.collect "
    "returns the batch unchanged for a task that does not collect (only collecting tasks override it)",
    "ml3cli.evaluate.x_step_size_ratio__mutmut_97": "keep = None keeps every ratio (with a leading axis): a zero "
    "baseline gradient gives an infinite or NaN ratio, which the finite filter below drops as the mask would",
    "ml3cli.evaluate.x_step_size_ratio__mutmut_98": "keep = base >= 0 also keeps zero baseline gradients, whose "
    "infinite or NaN ratios the finite filter below drops",
    # metadata
    "ml3cli.metadata.x_document_sha256__mutmut_7": "codec names are case-insensitive: 'UTF-8' is 'utf-8'",
    "ml3cli.metadata.x__depth__mutmut_2": "deepest starts at 1 instead of 0: the first node visited sets it to 1",
    # artifacts
    "ml3cli.artifacts.x__check_layout__mutmut_23": "every stored entry is a dict (_read_checked refused the others), so `not isinstance(..., dict)` is False and `and` or `or` give the same",
    "ml3cli.artifacts.x__read_checked__mutmut_39": "unreachable: JSON text that starts with '{' (checked above) parses to a dict or fails to parse",
    "ml3cli.artifacts.x_file_sha256__mutmut_9": "'<q' reads the length signed: _read_checked bounded it to 16 MiB first, where both readings agree",
    "ml3cli.artifacts.x_tensors_sha256__mutmut_8": "an empty tensor's bytes are b'' either way",
    "ml3cli.artifacts.x__kind_of__mutmut_10": "codec names are case-insensitive: 'UTF-8' is 'utf-8'",
    "ml3cli.artifacts.x__matches__mutmut_10": "zip's strictness: the lengths were compared just above",
    "ml3cli.artifacts.x__matches__mutmut_13": "zip's strictness: the lengths were compared just above",
    "ml3cli.artifacts.x__matches__mutmut_14": "zip's strictness: the lengths were compared just above",
    "ml3cli.artifacts.x__legacy_groups__mutmut_14": "zip's strictness: len(spec) == len(inputs) is checked first",
    "ml3cli.artifacts.x__legacy_groups__mutmut_17": "zip's strictness: len(spec) == len(inputs) is checked first",
    "ml3cli.artifacts.x__legacy_groups__mutmut_18": "zip's strictness: len(spec) == len(inputs) is checked first",
    "ml3cli.artifacts.x__legacy_groups__mutmut_26": "zip's strictness: len(spec) == len(inputs) was checked",
    "ml3cli.artifacts.x__legacy_groups__mutmut_29": "zip's strictness: len(spec) == len(inputs) was checked",
    "ml3cli.artifacts.x__legacy_groups__mutmut_30": "zip's strictness: len(spec) == len(inputs) was checked",
    "ml3cli.artifacts.x_save_loss__mutmut_20": "allow_nan=True is json.dumps's default",
    "ml3cli.artifacts.x_load_loss__mutmut_52": "the path only enters the message of a corrupt entry, which _checked has already refused",
    "ml3cli.artifacts.x_load_loss__mutmut_58": "unreachable message: safetensors' tensors are the file's bytes that file_sha256 hashed",
    # engine: estimators
    "ml3cli.engine.estimators.x__gradient_of__mutmut_6": "allow_unused=None is taken as materialize_grads (True) "
    "by torch.autograd.grad",
    "ml3cli.engine.estimators.x__gradient_of__mutmut_10": "allow_unused left out is taken as materialize_grads "
    "(True) by torch.autograd.grad",
    "ml3cli.engine.estimators.x__gradient_of__mutmut_18": "zip's strictness: autograd.grad returns one gradient per φ entry",
    "ml3cli.engine.estimators.x__gradient_of__mutmut_21": "zip's strictness: autograd.grad returns one gradient per φ entry",
    "ml3cli.engine.estimators.x__gradient_of__mutmut_22": "zip's strictness: autograd.grad returns one gradient per φ entry",
    "ml3cli.engine.estimators.xǁTruncatedBackpropǁ_backward__mutmut_10": "thetas[1] exists (inner.steps >= 1) and "
    "has the task axis of thetas[0]: every θ_k of the forward pass has",
    "ml3cli.engine.estimators.xǁTruncatedBackpropǁ_backward__mutmut_30": "None and {} are both falsy, and `if "
    "adjoint:` is the only read of adjoint before its first assignment",
    "ml3cli.engine.estimators.xǁTruncatedBackpropǁ_backward__mutmut_67": "zip's strictness: grads[: len(leaf)] has "
    "one gradient per φ entry",
    "ml3cli.engine.estimators.xǁTruncatedBackpropǁ_backward__mutmut_70": "zip's strictness: grads[: len(leaf)] has "
    "one gradient per φ entry",
    "ml3cli.engine.estimators.xǁTruncatedBackpropǁ_backward__mutmut_71": "zip's strictness: grads[: len(leaf)] has "
    "one gradient per φ entry",
    "ml3cli.engine.estimators.xǁTruncatedBackpropǁ_backward__mutmut_74": "unreachable: every carried (floating) "
    "state entry, momentum's velocity and Adam's m and v, enters its step's update, so its gradient is never None",
    "ml3cli.engine.estimators.xǁTruncatedBackpropǁ_backward__mutmut_76": "unreachable: every carried (floating) "
    "state entry, momentum's velocity and Adam's m and v, enters its step's update, so its gradient is never None",
    "ml3cli.engine.estimators.xǁTruncatedBackpropǁ_backward__mutmut_80": "zip's strictness: grads[len(leaf) :] has "
    "one gradient per carried state entry",
    "ml3cli.engine.estimators.xǁTruncatedBackpropǁ_backward__mutmut_83": "zip's strictness: grads[len(leaf) :] has "
    "one gradient per carried state entry",
    "ml3cli.engine.estimators.xǁTruncatedBackpropǁ_backward__mutmut_84": "zip's strictness: grads[len(leaf) :] has "
    "one gradient per carried state entry",
    "ml3cli.engine.estimators.xǁTruncatedBackpropǁestimate__mutmut_17": "only a task that collects data reads the "
    "generator share() hands on, and __post_init__ refuses such a task",
    # engine: outer loop
    "ml3cli.engine.outer.x_build_metaloss__mutmut_2": "fork_rng(devices=None) forks every CUDA device's generator "
    "as well as the CPU's; φ is drawn from the CPU generator alone, which is forked and restored either way",
    "ml3cli.engine.outer.x_build_metaloss__mutmut_9": "torch.randint(high, size) is torch.randint(0, high, size): "
    "low defaults to 0",
    **{
        f"ml3cli.engine.outer.x_meta_train__mutmut_{n}": "an initial value that is never read: θ is None at the "
        "first outer step, so the redraw sets the inner state, the batch and the age before any use (a resume sets "
        "all three from the checkpoint)"
        for n in (33, 34, 35, 36)
    },
    # engine: inner optimizers
    "ml3cli.engine.inner_optimizers.x__sqrt__mutmut_17": "any positive placeholder under the root: where value <= 0 "
    "the outer where returns 0 and passes back a zero gradient, whatever the root of the placeholder",
    # engine: unroll
    "ml3cli.engine.unroll.x_sgd_step__mutmut_5": "SGD.update hands back the state it is given untouched, and "
    "sgd_step keeps θ' only",
    "ml3cli.engine.unroll.x_sgd_step_autograd__mutmut_6": "SGD.update hands back the state it is given untouched, "
    "and sgd_step_autograd keeps θ' only",
    "ml3cli.engine.unroll.x_inner_step_autograd__mutmut_32": "allow_unused=None is taken as materialize_grads "
    "(True) by torch.autograd.grad",
    "ml3cli.engine.unroll.x_inner_step_autograd__mutmut_37": "allow_unused left out is taken as materialize_grads "
    "(True) by torch.autograd.grad",
    "ml3cli.engine.unroll.x_inner_step_autograd__mutmut_56": "zip's strictness: autograd.grad returns one gradient "
    "per θ leaf",
    "ml3cli.engine.unroll.x_inner_step_autograd__mutmut_59": "zip's strictness: autograd.grad returns one gradient "
    "per θ leaf",
    "ml3cli.engine.unroll.x_inner_step_autograd__mutmut_60": "zip's strictness: autograd.grad returns one gradient "
    "per θ leaf",
}

#: mutmut's exit codes of a tested mutant, by the name the score uses
STATUS = {1: "killed", 3: "killed", 0: "survived", 33: "no tests", 5: "no tests", None: "not checked"}
TIMEOUTS = {-24, 24, 152, 255, 36}


def status_of(exit_code: int | None) -> str:
    """The status of a mutant from the exit code mutmut recorded for it."""
    if exit_code in TIMEOUTS:
        return "timeout"
    return STATUS.get(exit_code, "suspicious")


def mutmut_settings(target: Target) -> dict:
    """The ``[tool.mutmut]`` settings of a target, as mutmut would read them from pyproject.toml."""
    return {
        "source_paths": ["ml3cli"],  # the whole package is copied (its data files too); only the target mutates
        "only_mutate": list(target.modules),
        "pytest_add_cli_args_test_selection": list(target.tests),
        # one process (pyproject's addopts ask pytest-xdist for two); no cache written into the copy
        "pytest_add_cli_args": ["-n", "0", "-p", "no:cacheprovider"],
        # one test process forked per mutant from the process that collected the stats
        "process_isolation": "fork",
    }


def run_mutmut(target: Target, max_children: int) -> None:
    """Run mutmut on ``target`` in this process, its settings handed over in place of pyproject.toml's."""
    import mutmut.configuration as configuration

    settings = mutmut_settings(target)
    configuration._config_reader = lambda: lambda key, default: settings.get(key, default)
    configuration.reset_config()
    import mutmut.__main__ as mutmut_main  # reads the settings when imported

    copy_also_copy_files = mutmut_main.copy_also_copy_files

    def copy_with_settings() -> None:
        # a test that starts Python (`ml3 inspect` in a subprocess) runs in mutants/ and imports the mutated copy,
        # whose trampolines read the settings from mutants/pyproject.toml: the copy gets the target's table
        copy_also_copy_files()
        with open(ROOT / "mutants" / "pyproject.toml", "a", encoding="utf-8") as copied:
            copied.write("\n[tool.mutmut]\n")
            copied.writelines(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())

    mutmut_main.copy_also_copy_files = copy_with_settings
    mutmut_main._run(list(target.functions), max_children)
    # the tests ran in this process (the stats, the clean run): they must have imported the mutated copy
    tested = Path(sys.modules["ml3cli"].__file__).resolve()
    if not tested.is_relative_to(ROOT / "mutants"):
        raise SystemExit(f"the tests imported {tested}, not the mutated copy under {ROOT / 'mutants'}")
    print(f"the tests imported {tested.relative_to(ROOT)}")


def results(target: Target) -> dict[str, str]:
    """The status of every mutant of ``target``, read from mutmut's record beside each mutated file."""
    found: dict[str, str] = {}
    for module in target.modules:
        record = json.loads((ROOT / "mutants" / f"{module}.meta").read_text())
        for name, exit_code in record["exit_code_by_key"].items():
            if not target.functions or any(fnmatch.fnmatch(name, pattern) for pattern in target.functions):
                found[name] = status_of(exit_code)
    return found


def report(name: str, target: Target, found: dict[str, str], diffs: bool) -> None:
    """Print the counts, the score and every survivor that is not judged equivalent."""
    counts = Counter(found.values())
    equivalent = sorted(m for m, status in found.items() if status not in ("killed", "timeout") and m in EQUIVALENT)
    survivors = sorted(m for m, status in found.items() if status not in ("killed", "timeout") and m not in EQUIVALENT)
    detected = counts["killed"] + counts["timeout"]
    total = len(found)
    scored = total - len(equivalent)
    print(f"\nmutation score of {name} ({', '.join(target.modules)})")
    print(f"  mutants {total}, killed {counts['killed']}, timeout {counts['timeout']}, survived {counts['survived']}")
    for other in sorted(set(counts) - {"killed", "timeout", "survived"}):
        print(f"  {other}: {counts[other]}")
    print(f"  equivalent {len(equivalent)} (not scored)")
    print(f"  score {detected}/{scored} = {100 * detected / max(scored, 1):.1f}%")
    for mutant in equivalent:
        print(f"  equivalent: {mutant}: {EQUIVALENT[mutant]}")
    for mutant in survivors:
        print(f"  {found[mutant]}: {mutant}")
        if diffs:
            print(diff_of(target, mutant))


def diff_of(target: Target, mutant: str) -> str:
    """The change a mutant makes to its module, as a unified diff."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    module = next(m for m in target.modules if mutant.startswith(m.removesuffix(".py").replace("/", ".") + "."))
    return get_diff_for_mutant(mutant, path=module)


def main() -> None:
    """Run one target (or list them) and print its score."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", choices=sorted(TARGETS))
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--report-only", action="store_true", help="print the score of the last run, run nothing")
    parser.add_argument("--diffs", action="store_true", help="print the change each survivor makes")
    parser.add_argument("--only", nargs="+", metavar="GLOB", help="mutant names to run (a re-check, not a score)")
    args = parser.parse_args()
    if args.list or args.target is None:
        for name, target in TARGETS.items():
            print(f"{name}: {' '.join(target.modules)}  <-  {' '.join(target.tests)}")
        return
    target = TARGETS[args.target]
    if args.only:
        target = replace(target, functions=tuple(args.only))
    os.chdir(ROOT)  # mutmut works in the current folder: the copy goes to ./mutants
    if not args.report_only:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        run_mutmut(target, args.max_children)
    report(args.target, target, results(target), args.diffs)


if __name__ == "__main__":
    sys.exit(main())
