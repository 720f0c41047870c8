"""The package's floors, read from the source (function-level imports included): no import cycles, and no module
imports from a floor above its own (README: "The package, one floor on another")."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "quick"
# the ground floor first; packages not named here are the top floor (user API, CLI, benchmarks, test helpers)
FLOORS = {"settings": 0, "formats": 0, "data": 0, "kernels": 1, "nn": 2, "models": 3, "external": 3, "algorithms": 4}
TOP = 5


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The quick modules ``name`` imports anywhere in its source (a name imported from a package counts as the
    submodule of that name where there is one, else as the package)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t.startswith("quick") and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _floor(module: str) -> int:
    parts = module.split(".")
    return FLOORS.get(parts[1], TOP) if len(parts) > 1 else TOP


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join([*path[path.index(d) :], d])
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_module_imports_from_a_floor_above():
    graph = _graph()
    up = [f"{m} -> {d}" for m, deps in sorted(graph.items()) for d in sorted(deps) if _floor(d) > _floor(m)]
    assert not up, up


def test_the_checker_sees_function_level_imports(tmp_path, monkeypatch):
    """A lazy import inside a function counts: the checks above could not fail otherwise."""
    pkg = tmp_path / "quick"
    (pkg / "formats").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "formats" / "__init__.py").write_text("")
    (pkg / "formats" / "a.py").write_text("def f():\n    from quick.models import b\n")
    (pkg / "models").mkdir()
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "b.py").write_text("from ..formats import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    graph = _graph()
    assert graph["quick.formats.a"] == {"quick.models.b"} and graph["quick.models.b"] == {"quick.formats.a"}
