"""The house plan, checked: import contracts (import-linter, from pyproject.toml), no import cycle at
any depth (grimp's graph, function-local imports included), the diffusion floor's few dependencies,
and the size rules (no file over 400 lines, no function over 80, nested functions counting toward
their parent)."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "progdistill"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("progdistill", include_external_packages=True, cache_dir=None)


def test_import_contracts_are_kept(monkeypatch):
    from importlinter.cli import lint_imports
    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def _strongly_connected(nodes: set[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    out.append(comp)
    return out


def test_no_import_cycle_at_any_depth(graph):
    """Between any two modules, a package and its children included (the package root imports
    `pipeline` lazily, so no module may import the root: `__version__` lives in `version`)."""
    own = {m for m in graph.modules if m == "progdistill" or m.startswith("progdistill.")}
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i in own} for m in own}
    cycles = [sorted(c) for c in _strongly_connected(own, edges) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"
    assert not [m for m in own if m in edges[m]], "a module imports itself"
    assert not graph.find_modules_that_directly_import("progdistill"), "nothing imports the package root"


def test_diffusion_imports_only_torch_numpy_tqdm_and_errors(graph):
    allowed = {"torch", "numpy", "tqdm", "progdistill.errors", *sys.stdlib_module_names}
    bad = {}
    for m in graph.find_descendants("progdistill.diffusion") | {"progdistill.diffusion"}:
        for imported in graph.find_modules_directly_imported_by(m):
            if imported.startswith("progdistill.diffusion") or imported.split(".")[0] in allowed or imported in allowed:
                continue
            bad.setdefault(m, []).append(imported)
    assert not bad, bad


def _function_lengths(tree: ast.AST):
    """(name, lines) of every module-level function and method; nested functions count toward their parent."""
    for node in ast.walk(tree):
        bodies = [node] if isinstance(node, ast.Module) else [node] if isinstance(node, ast.ClassDef) else []
        for body in bodies:
            for child in body.body:
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield child.name, child.end_lineno - child.lineno + 1


def test_no_file_over_400_lines_and_no_function_over_80():
    long_files, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        rel = os.path.relpath(path, ROOT)
        if len(text.splitlines()) > MAX_FILE_LINES:
            long_files.append(f"{rel}: {len(text.splitlines())}")
        long_functions += [f"{rel}:{name}: {n}" for name, n in _function_lengths(ast.parse(text))
                           if n > MAX_FUNCTION_LINES]
    assert not long_files, f"files over {MAX_FILE_LINES} lines: {long_files}"
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def test_the_size_rule_counts_nested_functions_toward_their_parent():
    inner = "\n".join(f"        x{i} = {i}" for i in range(85))
    tree = ast.parse(f"def outer():\n    def inner():\n{inner}\n    return inner\n\nclass C:\n    def m(self):\n        pass\n")
    assert dict(_function_lengths(tree)) == {"outer": 88, "m": 2}
