"""Repository invariants: no import cycles inside the package, no file over the 600-line budget."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "deepseek_jax"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Package modules imported at module level (function-level imports are lazy, not cycles)."""
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("deepseek_jax")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deepseek_jax"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_no_import_cycles():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    # a package __init__ re-exporting its children is not a cycle through them
    graph = {m: {i for i in deps if not (modules[m].name == "__init__.py" and i.startswith(m + "."))}
             for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for dep in graph[m]:
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(stack + [m, dep])}"
            if dep not in state:
                visit(dep, stack + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_files_within_line_budget():
    root = PACKAGE.parent
    too_long = [
        (str(p.relative_to(root)), n)
        for p in list(PACKAGE.rglob("*.py")) + list((root / "tests").rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > 600
    ]
    assert not too_long, f"files over 600 lines: {too_long}"
