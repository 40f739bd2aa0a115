"""The package's layout holds: imports point down the layers (pyproject.toml's import-linter contract), no
module imports itself through others, files stay small, and pyproject.toml lists every package."""

from __future__ import annotations

import ast
import functools
import importlib.util
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path

import grimp

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "batchvl"
KERNELS = ROOT / "kernels"  # batchvl.kernels: see batchvl/kernels.py
MAX_LINES = 400


# --- the import graph -----------------------------------------------------------------------------------------

def module_file(module: str) -> Path:
    """The source file of a batchvl module; batchvl.kernels.X is kernels/X.py."""
    parts = module.split(".")[1:]
    if parts[:1] == ["kernels"] and len(parts) > 1:
        return KERNELS.joinpath(*parts[1:]).with_suffix(".py")
    path = PACKAGE.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _imported_names(tree: ast.Module, module: str, is_package: bool) -> Iterable[tuple[list[str], ast.stmt]]:
    """For each import statement anywhere in `tree` (function-level ones too), the dotted names it may
    import, most specific first: `from a.b import c` may import module a.b.c, else a.b."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield [alias.name], node
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                yield [f"{base}.{alias.name}", base], node


def _ancestors(name: str) -> list[str]:
    """`a.b.c`, `a.b`, `a`."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _graft_kernels(graph: grimp.ImportGraph) -> None:
    """Add the modules of kernels/ as batchvl.kernels.X, with the imports from and to them.

    In a source tree batchvl.kernels is batchvl/kernels.py, whose `__path__` becomes kernels/ only when it
    runs; grimp reads files without running them, so it sees that module but none of kernels/*.py, and drops
    the imports of them (`from batchvl.kernels.decode_attention import ...`).
    """
    grafted = {f"batchvl.kernels.{p.stem}" for p in KERNELS.glob("*.py") if p.stem != "__init__"}
    for module in grafted:
        graph.add_module(module)
    # batchvl.kernels is batchvl/kernels.py in a source tree and kernels/__init__.py once installed: both count.
    sources = [(m, module_file(m)) for m in graph.modules] + [("batchvl.kernels", KERNELS / "__init__.py")]
    for importer, path in sources:
        tree = ast.parse(path.read_text(), str(path))
        lines = path.read_text().splitlines()
        is_package = path.name == "__init__.py" or importer == "batchvl.kernels"
        for names, node in _imported_names(tree, importer, is_package):
            imported = next((n for name in names for n in _ancestors(name) if n in graph.modules), None)
            if imported is None or imported == importer:
                continue
            if not ({importer, imported} & (grafted | {"batchvl.kernels"})):
                continue  # grimp has these
            if not graph.direct_import_exists(importer=importer, imported=imported):
                graph.add_import(importer=importer, imported=imported, line_number=node.lineno,
                                 line_contents=lines[node.lineno - 1].strip())


@functools.cache
def batchvl_graph() -> grimp.ImportGraph:
    """grimp's graph of this checkout's batchvl (function-level imports included), kernels/ grafted in."""
    spec = importlib.util.find_spec("batchvl")
    assert spec and spec.origin and Path(spec.origin).resolve().parent == PACKAGE, \
        f"batchvl imports from {spec and spec.origin}, not this checkout: run with PYTHONPATH={ROOT}"
    graph = grimp.build_graph("batchvl", cache_dir=None)
    _graft_kernels(graph)
    return graph


def test_import_graph_sees_the_kernel_modules_as_batchvl_kernels():
    graph = batchvl_graph()
    assert "batchvl.kernels.decode_attention" in graph.modules
    assert graph.direct_import_exists(importer="batchvl.kernels", imported="batchvl.kernels.decode_attention")
    assert graph.direct_import_exists(importer="batchvl.engine.native", imported="batchvl.kernels")
    assert graph.direct_import_exists(importer="batchvl.kernels", imported="batchvl.kernels.fp8_quant")
    assert graph.direct_import_exists(importer="batchvl.kernels.rmsnorm_fp8_quant",
                                      imported="batchvl.kernels.fp8_quant")
    assert graph.find_children("batchvl.kernels") == {
        "batchvl.kernels.decode_attention", "batchvl.kernels.fp8_quant", "batchvl.kernels.rmsnorm_fp8_quant",
        "batchvl.kernels.bi_matmul", "batchvl.kernels.bi_rmsnorm", "batchvl.kernels.bi_layernorm"}


# --- the layers -----------------------------------------------------------------------------------------------

class _Builder:
    """import-linter's graph builder, handing it batchvl_graph() (grimp's, plus kernels/)."""

    def build(self, root_package_names, cache_dir, include_external_packages=False,
              exclude_type_checking_imports=False):
        assert root_package_names == ["batchvl"] and not include_external_packages
        assert not exclude_type_checking_imports
        return batchvl_graph()


def test_imports_keep_to_the_layers_contract_in_pyproject():
    import importlinter.api  # noqa: F401 - importing it configures import-linter, as its CLI does
    from importlinter.application import use_cases
    from importlinter.application.app_config import settings
    from importlinter.application.output import console

    builder, width = settings.GRAPH_BUILDER, console.width
    settings.configure(GRAPH_BUILDER=_Builder())
    console.width = 120
    try:
        with console.capture() as captured:
            kept = use_cases.lint_imports(str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True)
    finally:
        settings.configure(GRAPH_BUILDER=builder)
        console.width = width
    assert kept and "Contracts: 1 kept, 0 broken." in captured.get(), captured.get()


# --- cycles ---------------------------------------------------------------------------------------------------

def strongly_connected_components(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's algorithm, without recursion: the strongly connected components of the graph `edges` (node ->
    the nodes it points to), each sorted, sinks first. Nodes only pointed to are nodes too."""
    nodes = sorted(set(edges) | {w for ws in edges.values() for w in ws})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(edges.get(succ, ())))))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:  # all successors done
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The components of `edges` that hold a cycle: more than one node, or one that points to itself."""
    return [c for c in strongly_connected_components(edges) if len(c) > 1 or c[0] in edges.get(c[0], ())]


def shortest_cycle(edges: Mapping[str, Iterable[str]], component: list[str]) -> list[str]:
    """A shortest path from the component's first node back to itself, inside the component: [a, b, ..., a]."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(edges.get(node, ())):
            if succ == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [start, *reversed(path[:-1]), start] if node != start else [start, start]
            if succ in members and succ not in came_from:
                came_from[succ] = node
                queue.append(succ)
    raise ValueError(f"{component} holds no cycle")


HAND_MADE = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": set(), "f": {"f", "d"}, "g": {"a"}}


def test_cycles_are_the_components_that_loop_and_self_imports():
    assert cycles(HAND_MADE) == [["a", "b", "c"], ["f"]]
    assert shortest_cycle(HAND_MADE, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert shortest_cycle(HAND_MADE, ["f"]) == ["f", "f"]
    assert strongly_connected_components(HAND_MADE) == [["e"], ["d"], ["a", "b", "c"], ["f"], ["g"]]


def test_cycles_finds_none_in_a_diamond_and_one_in_a_long_ring():
    assert cycles({"top": {"left", "right"}, "left": {"bottom"}, "right": {"bottom"}}) == []
    ring = {f"m{i}": {f"m{(i + 1) % 5000}"} for i in range(5000)}  # deeper than Python's recursion limit
    assert [len(c) for c in cycles(ring)] == [5000]


def test_no_module_imports_itself_through_others():
    graph = batchvl_graph()
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    report = []
    for component in cycles(edges):
        path = shortest_cycle(edges, component)
        report.append(f"import cycle among {', '.join(component)}:")
        for importer, imported in zip(path, path[1:], strict=False):
            detail = (graph.get_import_details(importer=importer, imported=imported) or [{}])[0]
            where = f"{module_file(importer).relative_to(ROOT)}:{detail.get('line_number', '?')}"
            report.append(f"    {importer} -> {imported}  ({where} {detail.get('line_contents', '')})")
    assert not report, "\n".join(report)


# --- size and packaging ---------------------------------------------------------------------------------------

def test_no_source_file_is_longer_than_400_lines():
    files = sorted(PACKAGE.rglob("*.py")) + sorted(KERNELS.rglob("*.py"))
    assert len(files) > 50
    long = {str(f.relative_to(ROOT)): n for f in files if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines (split along the seam): {long}"


def test_pyproject_lists_every_package_folder():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(init.parent.relative_to(ROOT).parts) for init in PACKAGE.rglob("__init__.py")}
    assert "batchvl.engine" in folders
    listed, found = set(setuptools["packages"]), folders | {"batchvl.kernels"}
    assert listed == found, f"not listed: {sorted(found - listed)}; listed, not found: {sorted(listed - found)}"
    assert setuptools["package-dir"] == {"batchvl.kernels": "kernels"}
    assert (KERNELS / "__init__.py").is_file()
