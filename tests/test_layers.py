"""The package's import layering, read from the source with ``ast`` (imports inside functions count).

cli → commands → experiments → (engine, tasks, baselines) → primitives (envs, control, rl, metaloss, ...): imports
point down only. :data:`FORBIDDEN` lists, per part of the package, the parts it must never import.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from pathlib import Path

from helpers import REPO

#: importer (a module or package of ml3cli, with everything below it) → what it must not import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "ml3cli.envs": ("ml3cli.tasks", "ml3cli.baselines", "ml3cli.experiments"),
    "ml3cli.control": ("ml3cli.tasks", "ml3cli.baselines", "ml3cli.experiments"),
    "ml3cli.rl": ("ml3cli.tasks", "ml3cli.baselines", "ml3cli.experiments"),
    "ml3cli.tasks": ("ml3cli.baselines", "ml3cli.experiments"),
    "ml3cli.baselines": ("ml3cli.experiments",),
}


def module_name(path: Path, root: Path) -> str:
    """``ml3cli/tasks/mfrl.py`` → ``ml3cli.tasks.mfrl``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Every module name an ``import`` / ``from … import`` anywhere in ``source`` may load (relative imports
    resolved; ``from a import b`` gives both ``a`` and ``a.b``, since b may be a submodule), and the constant
    first argument of ``importlib.import_module`` calls."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base_parts = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join([*base_parts, *([node.module] if node.module else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module name → the names it imports, for every ``.py`` file of the package at ``root``."""
    return {
        module_name(path, root): imported_names(path.read_text(), module_name(path, root), path.name == "__init__.py")
        for path in sorted(root.rglob("*.py"))
    }


def within(name: str, prefix: str) -> bool:
    """Whether module ``name`` is ``prefix`` or lies below it."""
    return name == prefix or name.startswith(prefix + ".")


def violations(graph: Mapping[str, set[str]], forbidden: Mapping[str, Sequence[str]]) -> list[str]:
    """``"importer imports imported"`` for every import that :data:`FORBIDDEN`-style rules refuse."""
    return sorted(
        f"{module} imports {name} ({layer} must not import {banned})"
        for module, names in graph.items()
        for layer, refused in forbidden.items()
        if within(module, layer)
        for name in names
        for banned in refused
        if within(name, banned)
    )


def test_the_package_keeps_its_layers():
    graph = import_graph(REPO / "ml3cli")
    assert "ml3cli.tasks.reacher_demos" in graph and "ml3cli.rl" in graph  # the walk found the package
    assert violations(graph, FORBIDDEN) == []


def test_the_check_sees_every_kind_of_import(tmp_path):
    """A planted package: imports at the top, inside functions, relative, ``from pkg import subpackage`` and by
    ``importlib`` are all caught; allowed imports and look-alike names are not."""
    pkg = tmp_path / "ml3cli"
    (pkg / "tasks").mkdir(parents=True)
    (pkg / "baselines").mkdir()
    for init in ("__init__.py", "tasks/__init__.py", "baselines/__init__.py"):
        (pkg / init).write_text("")
    (pkg / "tasks" / "top.py").write_text("import ml3cli.baselines.ppo\nfrom ml3cli.rl import performance\n")
    (pkg / "tasks" / "inner.py").write_text("def f():\n    from ..baselines import ppo\n")
    (pkg / "tasks" / "sub.py").write_text("from ml3cli import experiments\nimport ml3cli.baselines_extra\n")
    (pkg / "tasks" / "dynamic.py").write_text("import importlib\nimportlib.import_module('ml3cli.experiments.mbrl')\n")
    (pkg / "baselines" / "ok.py").write_text("from ml3cli.tasks.top import x\nfrom . import ok\n")
    found = violations(import_graph(pkg), FORBIDDEN)
    assert [line.split(" (")[0] for line in found] == [
        "ml3cli.tasks.dynamic imports ml3cli.experiments.mbrl",
        "ml3cli.tasks.inner imports ml3cli.baselines",
        "ml3cli.tasks.inner imports ml3cli.baselines.ppo",
        "ml3cli.tasks.sub imports ml3cli.experiments",
        "ml3cli.tasks.top imports ml3cli.baselines.ppo",
    ]
