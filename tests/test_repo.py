"""Repository invariants: no import cycles inside the package, no file over the 600-line budget."""

import ast
from pathlib import Path

from tests.utils import ROOT

PACKAGE = ROOT / "deepseek_jax"


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


# training-side modules: the model code (layers/, models/) never imports them, even lazily
TRAINING = ("losses", "train", "optim", "run", "data", "program", "metrics", "checkpoint", "checkpoint_damage",
            "multihost", "rundir", "plan", "generate", "cli", "tokenizer", "inspect_model")


def _all_imports(path: Path) -> set[str]:
    """Every deepseek_jax module a file imports, at any depth (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("deepseek_jax")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deepseek_jax"):
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_model_code_never_imports_training_code():
    bad = []
    for part in ("layers", "models"):
        for path in (PACKAGE / part).rglob("*.py"):
            for name in _all_imports(path):
                parts = name.split(".")
                if len(parts) > 1 and parts[1] in TRAINING:
                    bad.append((str(path.relative_to(PACKAGE.parent)), name))
    assert not bad, f"model code importing training modules: {bad}"


def test_package_modules_and_functions_read_in_one_sitting():
    """STYLE.md: a package file reads in one sitting (about 400 lines), a function fits on a screen."""
    long_files, long_functions = [], []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > 400:
            long_files.append((str(path.relative_to(PACKAGE.parent)), len(text.splitlines())))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long_functions.append((str(path.relative_to(PACKAGE.parent)), node.name))
    assert not long_files, f"package files over 400 lines: {long_files}"
    assert not long_functions, f"functions over 60 lines: {long_functions}"
