"""The qbench package imports cleanly module by module, and its modules import each other without cycles.

(a) Each module of qbench (qbench.kernels = the top-level kernels/ folder, installed as qbench.kernels)
is imported alone in a fresh interpreter: a module that only works once some other module was imported
first fails here.
(b) The import graph of qbench modules, built from their source with `ast` (every `import` and
`from ... import`, including those inside functions, i.e. lazy imports count), has no cycle.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Where each part of the installed package lives in the checkout (pyproject's package-dir).
ROOTS = {"qbench": REPO / "qbench", "qbench.kernels": REPO / "kernels"}


def _modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file of qbench and qbench.kernels."""
    out = {}
    for prefix, folder in ROOTS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The qbench module a dotted name refers to (itself, or the package holding an imported name)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> set[str]:
    """The qbench modules that `module` imports anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name of pkg.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module: _imports(module, path) for module, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_sees_known_edges():
    """The parser finds plain, `from` and relative imports (guards against a graph that is trivially acyclic)."""
    graph = import_graph()
    assert "qbench.kernels" in MODULES and "qbench.cli" in MODULES
    assert graph["qbench.kernels"] >= {"qbench.kernels.wint", "qbench.kernels.nf4"}
    assert any(graph[m] for m in MODULES if m.startswith("qbench.bench"))


def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_alone(module):
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"import {module} failed:\n{proc.stderr[-3000:]}"


RESEARCH = sorted(p.stem for p in (REPO / "research").glob("*.py") if p.stem != "__init__")


def test_research_folder_is_seen():
    assert {"tasks_identity", "int8_study", "decode_sweep"} <= set(RESEARCH)


@pytest.mark.parametrize("name", RESEARCH)
def test_research_module_imports(name):
    """Each research/ script (a check or study run by hand, `python -m research.<name>` from the repo root)
    imports alone: its qbench imports still resolve after moves in the package."""
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    proc = subprocess.run([sys.executable, "-c", f"import research.{name}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"import research.{name} failed:\n{proc.stderr[-3000:]}"
