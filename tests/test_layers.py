"""The package's import layering, read from the source with ``ast`` (imports inside functions count).

cli → commands → experiments → (engine, tasks, baselines) → primitives (envs, control, rl, metaloss, ...): imports
point down only. :data:`LAYERS` places every module of the package (a new module must be given a place), a module
imports only from its own layer or below, and no two modules import each other, directly or round a longer cycle.
:data:`FORBIDDEN` spells out the rules that matter most by name.
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


#: the package's layers, top first: a module may import from its own layer and the layers below it
LAYERS: tuple[tuple[str, ...], ...] = (
    ("ml3cli.__main__",),
    ("ml3cli.entry",),
    ("ml3cli.cli",),
    ("ml3cli.commands",),
    ("ml3cli.experiments",),
    ("ml3cli.baselines",),
    ("ml3cli.losses", "ml3cli.landscape", "ml3cli.report_metrics", "ml3cli.plots", "ml3cli.checkpoints"),
    ("ml3cli.artifacts",),
    ("ml3cli.evaluate", "ml3cli.engine"),
    ("ml3cli.recipes",),
    ("ml3cli.tasks",),
    ("ml3cli.envs", "ml3cli.control", "ml3cli.rl", "ml3cli.distributed", "ml3cli.launchers"),
    (
        "ml3cli.files",
        "ml3cli.metadata",
        "ml3cli.tracking",
        "ml3cli.shipped",
        "ml3cli.metaloss",
        "ml3cli.loss_inputs",
        "ml3cli.functional",
        "ml3cli.runtime",
        "ml3cli.errors",
    ),
)
#: the package root only re-exports public names, lazily; every layer may name it
ROOT = "ml3cli"


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


def layer_of(module: str) -> int | None:
    """The index in :data:`LAYERS` of the part that holds ``module`` (None: the root or unplaced)."""
    return next((i for i, parts in enumerate(LAYERS) for part in parts if within(module, part)), None)


def upward_imports(graph: Mapping[str, set[str]]) -> list[str]:
    """Every import of a module of the package from a layer above the importer's."""
    return sorted(
        f"{module} (layer {layer_of(module)}) imports {name} (layer {layer_of(name)})"
        for module, names in graph.items()
        for name in names
        if module != ROOT and name in graph and name != ROOT and layer_of(name) < layer_of(module)  # type: ignore[operator]
    )


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The import cycles among the package's modules (strongly connected components of more than one module,
    and modules that import themselves), by Tarjan's algorithm."""
    edges = {
        module: sorted(name for name in names if name in graph and name != ROOT) for module, names in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for name in edges[module]:
            if name not in index:
                visit(name)
                low[module] = min(low[module], low[name])
            elif name in stack:
                low[module] = min(low[module], index[name])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or module in edges[module]:
                found.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return found


def test_every_module_has_a_layer_and_imports_point_down():
    graph = import_graph(REPO / "ml3cli")
    assert [m for m in graph if m != ROOT and layer_of(m) is None] == [], "give each new module a place in LAYERS"
    assert upward_imports(graph) == []


def test_the_package_has_no_import_cycles():
    assert cycles(import_graph(REPO / "ml3cli")) == []


def test_the_layer_and_cycle_checks_catch_planted_imports():
    graph = {"ml3cli.tasks.a": {"ml3cli.engine.outer"}, "ml3cli.engine.outer": {"ml3cli.tasks.a", "ml3cli.errors"}}
    graph["ml3cli.errors"] = set()
    assert upward_imports(graph) == ["ml3cli.tasks.a (layer 10) imports ml3cli.engine.outer (layer 8)"]
    assert cycles(graph) == [["ml3cli.engine.outer", "ml3cli.tasks.a"]]
    assert cycles({"ml3cli.errors": {"ml3cli.errors"}}) == [["ml3cli.errors"]]


def test_the_package_keeps_its_layers():
    graph = import_graph(REPO / "ml3cli")
    assert "ml3cli.tasks.reacher_demos" in graph and "ml3cli.rl" in graph  # the walk found the package
    assert violations(graph, FORBIDDEN) == []


def test_the_cli_is_the_only_user_of_typer():
    """Typer (and click beneath it) is the command line's business: no module but ``ml3cli.cli`` imports either."""
    graph = import_graph(REPO / "ml3cli")
    users = [m for m, names in graph.items() if any(within(n, "typer") or within(n, "click") for n in names)]
    assert sorted(users) == ["ml3cli.cli"]


#: files the package writes other than through ``ml3cli.files``: the logs a run streams as it goes (read while they grow,
#: never replaced), as (module, call). TensorBoard's event files are torch's SummaryWriter's.
STREAMED_LOGS = {
    ("ml3cli.commands.meta_train", "open(out_path.with_suffix(f'.rank{shard.rank}.log'), 'w', encoding='utf-8')"),
    ("ml3cli.launchers", "open(run.log, 'w', encoding='utf-8')"),
}


def direct_writes(root: Path) -> set[tuple[str, str]]:
    """(module, call) for every call outside ``ml3cli.files`` that writes, replaces or copies a file itself."""

    def opens_for_writing(call: ast.Call) -> bool:
        mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
        return isinstance(mode, ast.Constant) and isinstance(mode.value, str) and bool(set(mode.value) & set("wax+"))

    found = set()
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        if module == "ml3cli.files":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            name = func.rsplit(".", 1)[-1]
            if (
                name in ("write_text", "write_bytes", "touch")
                or func in ("os.replace", "os.rename", "os.open", "torch.save")
                or func.startswith("shutil.")
                or (name == "open" and opens_for_writing(node))
            ):
                found.add((module, ast.unparse(node)))
    return found


def test_files_are_written_through_ml3cli_files():
    """Results, artifacts, checkpoints, curves, figures and indexes are written atomically by ``ml3cli.files`` (a
    temp file, fsync, rename): no other module writes, replaces or copies a file itself, except the streamed logs."""
    assert direct_writes(REPO / "ml3cli") == STREAMED_LOGS


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
