"""The code passes the project's linter (rules in pyproject.toml), so style is checked where tests run."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    result = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", str(ROOT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


#: What each layer may import of actscope: storage nothing above it, pipeline storage, queries
#: storage and the model code (where it recomputes activations or tokenizes a probe), jobs all.
LAYERS = {
    "storage": {"storage"},
    "pipeline": {"storage", "pipeline"},
    "queries": {"storage", "queries", "pipeline.model"},
}


def test_layers_import_only_what_is_below_them():
    """The import graph the design notes describe (``docs/design-notes.md``, Layers), lazy imports
    inside functions included."""
    wrong = []
    for layer, allowed in LAYERS.items():
        for path in sorted((ROOT / layer).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("actscope."):
                    name = node.module.removeprefix("actscope.")
                    if not any(name == a or name.startswith(a + ".") for a in allowed):
                        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}")
    assert not wrong, "\n".join(wrong)


def _runtime_imports(path: Path) -> set[str]:
    """The actscope modules a file imports when it runs (lazy imports included, imports for
    typing alone, under ``if TYPE_CHECKING:``, left out)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    return {node.module.removeprefix("actscope.") for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and id(node) not in typing_only and (node.module or "").startswith("actscope.")}


def test_no_import_cycles():
    graph = {f"{p.parent.name}.{p.stem}": _runtime_imports(p) for layer in (*LAYERS, "jobs") for p in (ROOT / layer).glob("*.py") if p.stem != "__init__"}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, "import cycle: " + " -> ".join((*path[path.index(module):], module))
        if module in done or module not in graph:
            return
        for imported in graph[module]:
            visit(imported, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


def test_the_orchestrator_has_no_function_a_newcomer_cannot_read_at_once():
    """``jobs/``: every function at most 60 lines (run_job reads as its phases)."""
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted((ROOT / "jobs").glob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60]
    assert not long, long
