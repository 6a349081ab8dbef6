"""The project's import graph: no circle, the engine never imports the application, no module of
the daemon past 500 lines.

Run alone with ``python -m pytest -q tests/test_imports.py``. The graph is read from the source
with ast (nothing is imported), and every import counts as an edge, wherever it stands: an import
inside a function closes a circle as surely as one at the top, only later.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("streamv2v", "daemon")
MAX_DAEMON_MODULE_LINES = 500


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Every module of ``packages`` under ``root``: dotted name -> file."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """The dotted names ``tree`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    names = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the project modules it imports. Importing ``a.b.c`` runs ``a`` and ``a.b`` too,
    so those count, except the importer's own packages (always imported before it runs)."""
    files = module_files(root, packages)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        edges = set()
        for name in imported_names(tree, module, path.name == "__init__.py"):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in files and target != module and target not in own:
                    edges.add(target)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_project_has_no_import_circle():
    graph = import_graph(ROOT, PACKAGES)
    assert len(graph) > 30 and any(graph.values())  # the walk found the modules and their edges
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_engine_imports_nothing_from_the_daemon():
    graph = import_graph(ROOT, PACKAGES)
    offending = {
        module: sorted(t for t in targets if t.split(".")[0] == "daemon")
        for module, targets in graph.items()
        if module.split(".")[0] == "streamv2v"
    }
    assert not {m: t for m, t in offending.items() if t}, offending


def test_no_daemon_module_is_past_500_lines():
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
        for path in (ROOT / "daemon").rglob("*.py")
    }
    too_long = {name: lines for name, lines in sizes.items() if lines > MAX_DAEMON_MODULE_LINES}
    assert not too_long, (
        f"split these modules (at most {MAX_DAEMON_MODULE_LINES} lines): {too_long}"
    )


def test_the_walk_sees_circles_through_function_level_and_relative_imports(tmp_path):
    # a -> b at the top, b -> c inside a function, c -> a by a relative import: one circle.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def later():\n    import pkg.c\n")
    (pkg / "c.py").write_text("from . import a\n")
    (pkg / "d.py").write_text("from pkg.a import thing\n")  # into the circle, not part of it
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (pkg / "b.py").write_text("def later():\n    import json\n")  # the circle broken
    assert find_cycle(import_graph(tmp_path, ("pkg",))) is None
