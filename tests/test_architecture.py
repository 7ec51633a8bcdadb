"""The package's shape: imports go down only between the folders, and no module imports itself
back through a cycle (docs/design.md, "The map").

Every ``import`` counts, at module level, under ``TYPE_CHECKING`` and inside functions alike: a
function-local import that goes up is still a design that goes up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import xpstore

PACKAGE = Path(xpstore.__file__).parent

LAYERS: dict[str, int] = {
    "errors": 0,
    "config": 1,
    "model": 1,
    "persistence": 2,
    "ops": 3,
    "sampling": 4,
    "index": 4,
    "store": 5,
    "tuning": 6,
    "demo": 7,
    "service": 7,
    "cli": 8,
}
"""Folder (or top-level module) -> layer: a module may import its own folder and lower layers;
folders on one layer (config and model; sampling and index) do not import each other."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _room(module: str) -> str | None:
    """The folder a module lives in (``xpstore.store.writer`` -> ``store``); None: the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _imports(module: str, path: Path, known: set[str]) -> set[tuple[str, bool]]:
    """(imported xpstore module, at module level?) for every import statement in the file."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[tuple[str, bool]] = set()

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = top and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*pkg, base] if base else pkg)
                names = [base] + [f"{base}.{a.name}" for a in child.names]
            for name in names:
                target = name
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    found.add((target, inner))
            visit(child, inner)

    visit(tree, True)
    return found


def _graph() -> dict[str, set[tuple[str, bool]]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_folder_has_a_layer() -> None:
    rooms = {_room(m) for m in _modules()} - {None}
    assert rooms <= set(LAYERS), rooms - set(LAYERS)


def test_imports_go_down_only() -> None:
    upward = []
    for module, imports in _graph().items():
        room = _room(module)
        if room is None:
            continue  # xpstore/__init__.py assembles the public API from every layer
        for target, _top in imports:
            other = _room(target)
            if other is None or other == room:
                continue
            same_layer_peer = LAYERS[other] == LAYERS[room]
            if LAYERS[other] > LAYERS[room] or same_layer_peer:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_no_import_cycles_at_module_level() -> None:
    graph = {m: {t for t, top in imports if top} for m, imports in _graph().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strong(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    assert cycles == []


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    """The walk sees function-local and TYPE_CHECKING imports (a check that cannot fail is no
    check)."""
    src = tmp_path / "mod.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from xpstore.store.store import Store\n"
        "def f():\n    from xpstore.cli import main\n"
    )
    known = {"xpstore.store.store", "xpstore.cli", "xpstore.model.mod"}
    found = _imports("xpstore.model.mod", src, known)
    assert found == {("xpstore.store.store", True), ("xpstore.cli", False)}


@pytest.mark.parametrize("folder", ["model", "persistence", "ops", "sampling", "index"])
def test_the_core_never_imports_the_demo(folder: str) -> None:
    for module, imports in _graph().items():
        if _room(module) == folder:
            assert not any(_room(t) == "demo" for t, _ in imports), module
