"""The house rules of the source tree, read from the files themselves (ast, no third-party tool): no import
circles inside engine/ or app/, the engine free of UI code, and no file a reader must scroll for long."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "app")
MAX_LINES = 450  # DESIGN.md: "about 450 lines at most"


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module of engine/ and app/ by dotted name (a package by its own name, from its __init__.py)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines under `if TYPE_CHECKING:` (never executed, so not an import that can go round)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file (module level and inside functions): the module
    of each imported name, and the packages an import passes through on its way there."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = here[: len(here) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                targets.add(sub if sub in modules else base)
    out = set()
    for t in targets:
        parts = t.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            prefix = ".".join(parts[:i])
            if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                out.add(prefix)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_names_a_circle(tmp_path):
    """The finder itself: a planted circle through a package's __init__ is found and named."""
    (tmp_path / "engine" / "a").mkdir(parents=True)
    (tmp_path / "app").mkdir()
    (tmp_path / "engine" / "__init__.py").write_text("")
    (tmp_path / "app" / "__init__.py").write_text("")
    (tmp_path / "engine" / "a" / "__init__.py").write_text("from .x import f\n")
    (tmp_path / "engine" / "a" / "x.py").write_text("def f():\n    from ..b import g\n")
    (tmp_path / "engine" / "b.py").write_text("from engine.a import f\n")
    (tmp_path / "engine" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                              "    from .d import h\n")
    (tmp_path / "engine" / "d.py").write_text("from .c import k\n")
    assert find_cycle(import_graph(tmp_path)) == ["engine.a", "engine.a.x", "engine.b", "engine.a"]
    (tmp_path / "engine" / "b.py").write_text("from engine.a.x import f\n")  # past the package: still a circle
    assert find_cycle(import_graph(tmp_path)) == ["engine.a", "engine.a.x", "engine.b", "engine.a"]
    (tmp_path / "engine" / "a" / "x.py").write_text("def f():\n    pass\n")
    assert find_cycle(import_graph(tmp_path)) is None  # c -> d only under TYPE_CHECKING


def test_engine_is_free_of_ui_code():
    """No engine module imports gradio; only the CLI's `ui` command reaches into app/."""
    graph = import_graph()
    for name, path in module_files().items():
        if not name.startswith("engine"):
            continue
        tree = ast.parse(path.read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not any(m.split(".")[0] == "gradio" for m in mods), f"{path} imports gradio"
        uses_app = sorted(m for m in graph[name] if m.split(".")[0] == "app")
        assert not uses_app or name == "engine.cli", f"{name} imports {uses_app}"


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_long_files(pkg):
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / pkg).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by job): {long}"


def test_packages_say_what_they_offer():
    """Each package's __init__.py opens with a docstring."""
    for name, path in module_files().items():
        if path.name == "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc and len(doc) > 40, f"{path} has no docstring saying what the package offers"
