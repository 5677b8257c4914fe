"""What the README promises about installing and testing: `constraints.txt` pins every version the package and its
extras install (torch to the CPU build 2.13.0, while `pyproject.toml` asks only for torch>=2.11), the default
`pytest` run leaves out the slow tests, and CI (`.ci/run`) runs the README's install-and-test command, then ruff.
"""

from __future__ import annotations

import re

import pytest
from helpers import REPO

tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def normalized(name: str) -> str:
    """A distribution name as pip compares them: case-insensitive, runs of -, _ and . alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """``gymnasium[mujoco]>=1.0`` → ``gymnasium``."""
    return normalized(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)[0])


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_constraints_pin_every_dependency_and_extra():
    pins: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
            assert match, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[normalized(match[1])] = match[2]
    project = pyproject()["project"]
    wanted = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    assert sorted({r for r in wanted if requirement_name(r) not in pins}) == []
    assert pins["torch"] == "2.13.0"
    assert [r for r in project["dependencies"] if requirement_name(r) == "torch"] == ["torch>=2.11"]


def test_the_default_run_leaves_out_the_slow_tests():
    options = pyproject()["tool"]["pytest"]["ini_options"]
    assert options["testpaths"] == ["tests"]
    assert "-m 'not slow'" in options["addopts"]
    assert any(marker.startswith("slow:") for marker in options["markers"])


def test_ci_runs_the_readmes_test_command_then_ruff():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    (command,) = [block for block in blocks if block.endswith("&& pytest")]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert command in ci, "keep .ci/run and the README's test command in sync"
    assert ci.index(command) < ci.index("ruff check .") < ci.index("ruff format --check .")
