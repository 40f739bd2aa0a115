"""The package's layout holds: imports point down the layers (pyproject.toml's import-linter contract)."""

from __future__ import annotations

import ast
import functools
import importlib.util
from collections.abc import Iterable
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "batchvl"
KERNELS = ROOT / "kernels"  # batchvl.kernels: see batchvl/kernels.py


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
    assert graph.find_children("batchvl.kernels") == {"batchvl.kernels.decode_attention"}


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
