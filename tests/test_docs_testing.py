"""docs/testing.md maps the claims of the user docs to the tests that check them. So that the page cannot go stale:
every test it names exists (the file, and a test function of that name in it; a parametrize id in brackets is
ignored), and the marker a table row gives (default / slow) is that of the row's tests.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from helpers import REPO

PAGE = REPO / "docs" / "testing.md"

#: ``tests/test_x.py::test_name``, optionally ``tests/test_x.py::Class::test_name`` and a parametrize id ``[...]``
REFERENCE = re.compile(r"tests/(?P<file>[\w/]+\.py)::(?P<name>[\w:]+)(?:\[[^\]`|]*\])?")
MARKERS = ("default", "slow")


def kinds_in(path: Path) -> dict[str, set[str]]:
    """Test function name → the runs it is part of: {"default"}, {"slow"}, or both (a parametrize whose cases
    carry the slow mark on some of them)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module_slow = any(
        isinstance(node, ast.Assign)
        and any(getattr(target, "id", None) == "pytestmark" for target in node.targets)
        and "pytest.mark.slow" in ast.unparse(node.value)
        for node in tree.body
    )
    kinds: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            decorators = [ast.unparse(d) for d in node.decorator_list]
            if module_slow or "pytest.mark.slow" in decorators:
                kinds[node.name] = {"slow"}
            elif any("pytest.mark.slow" in d for d in decorators):
                kinds[node.name] = {"default", "slow"}
            else:
                kinds[node.name] = {"default"}
    for node in tree.body:  # a test made by a call, ``test_x = settings(...)(given(...)(body))``, marked by wrapping
        for target in node.targets if isinstance(node, ast.Assign) else []:
            if isinstance(target, ast.Name) and target.id.startswith("test"):
                slow = module_slow or ast.unparse(node.value).startswith("pytest.mark.slow(")
                kinds[target.id] = {"slow"} if slow else {"default"}
    return kinds


def references(text: str) -> list[tuple[str, str]]:
    """(file, test name) for every test the text names, parametrize ids stripped."""
    return [(m["file"], m["name"].split("::")[-1]) for m in REFERENCE.finditer(text)]


def kinds_of(reference: tuple[str, str], cache: dict[str, dict[str, set[str]]]) -> set[str] | None:
    file, name = reference
    path = REPO / "tests" / file
    if not path.is_file():
        return None
    if file not in cache:
        cache[file] = kinds_in(path)
    return cache[file].get(name)


def test_every_test_the_page_names_exists():
    text = PAGE.read_text(encoding="utf-8")
    named = references(text)
    assert len(named) > 100, "the page names far fewer tests than expected: is the reference pattern still right?"
    cache: dict[str, dict[str, set[str]]] = {}
    missing = sorted({f"tests/{file}::{name}" for file, name in named if kinds_of((file, name), cache) is None})
    assert not missing, f"docs/testing.md names tests that do not exist: {missing}"


def test_each_row_gives_the_markers_of_its_tests():
    """The last cell of a table row that names tests says `default`, `slow` or both, as its tests are."""
    cache: dict[str, dict[str, set[str]]] = {}
    wrong = []
    rows = 0
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        named = references(" ".join(cells[:-1]))
        if not named:
            continue
        rows += 1
        expected = set().union(*(kinds_of(reference, cache) or set() for reference in named))
        given = {marker for marker in MARKERS if re.search(rf"\b{marker}\b", cells[-1])}
        if given != expected:
            wrong.append(f"{cells[0][:60]!r}: says {sorted(given)}, its tests are {sorted(expected)}")
    assert rows > 50
    assert not wrong, "rows whose marker is not their tests':\n" + "\n".join(wrong)
