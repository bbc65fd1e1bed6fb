"""The runner package (runner_image/sandbox), read with `ast`: stdlib only, and every module of it loaded by
the entry point's top-level imports, so all of it is in PID 1 before the template is forked (runner.py then
takes its dir out of sys.path: a module imported later, inside a function, would not be found)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

RUNNER_DIR = Path(__file__).resolve().parent.parent / "runner_image"
PACKAGE = "runner_image.sandbox"


def modules() -> dict[str, Path]:
    found = {f"{PACKAGE}.{path.stem}": path for path in sorted((RUNNER_DIR / "sandbox").glob("*.py"))}
    found[PACKAGE] = found.pop(f"{PACKAGE}.__init__")
    return found


def imports(path: Path, top_level_only: bool) -> set[str]:
    """Modules `path` imports (`from a import b` counts as `a.b` when that is one of the runner's)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = ast.walk(tree) if not top_level_only else iter(_top_level(tree.body))
    ours = set(modules())
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in ours else base for a in node.names)
    return found


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements run at import: the module's own, and those under a top-level `if` (such as __main__'s)."""
    out: list[ast.stmt] = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If):
            out += _top_level(node.body) + _top_level(node.orelse)
    return out


def test_the_runner_imports_only_the_standard_library_and_itself():
    files = {**modules(), "runner": RUNNER_DIR / "runner.py"}
    strays = sorted(f"{module} imports {name}" for module, path in files.items()
                    for name in imports(path, top_level_only=False)
                    if name.split(".")[0] not in sys.stdlib_module_names and name != PACKAGE
                    and not name.startswith(PACKAGE + "."))
    assert strays == []


def test_every_runner_module_is_loaded_before_the_template_forks():
    """From the entry point, top-level imports alone reach every module of the package; none imports inside a
    function."""
    ours = modules()
    reached, todo = set(), sorted(imports(RUNNER_DIR / "runner.py", top_level_only=True) & set(ours))
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += sorted(imports(ours[module], top_level_only=True) & set(ours))
    assert f"{PACKAGE}.pid1" in reached
    assert sorted(set(ours) - reached - {PACKAGE}) == []
    lazy = sorted(module for module, path in ours.items()
                  if imports(path, top_level_only=False) != imports(path, top_level_only=True))
    assert lazy == [], "imports inside functions"
