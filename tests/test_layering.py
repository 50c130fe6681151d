"""The layers of ``src/grass_llm`` (docs/architecture.md): a module imports only from its own layer or
lower ones, nothing imports in a cycle, and the library (L0-L4) never imports its applications.

Every import counts, wherever it stands: at the top of a module, inside a function, under
``if TYPE_CHECKING:``, and ``importlib.import_module("...")`` with a literal name. Every module must
be placed in :data:`LAYERS` (a new module is a failure until it is), so the table stays the map of the
package. Each failure names the importing file and line.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "grass_llm"

#: (layer, what it holds, module patterns), lowest first. A pattern is a module's dotted name, or
#: ``pkg.**``: the package ``pkg`` and everything below it. An exact name wins over a pattern; of two
#: patterns the longer wins.
LAYERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "L0 foundation",
        "torch and the standard library only: shared helpers, the LR schedule, the run log and layout, "
        "the memory tracker (its storage labels and cuBLAS workspace sizes)",
        (
            "grass_llm._tensor",
            "grass_llm._text",
            "grass_llm.schedule",
            "grass_llm.runlog",
            "grass_llm.run_layout",
            "grass_llm.memory.tracker",
            "grass_llm.memory.origins",
            "grass_llm.memory.workspaces",
        ),
    ),
    (
        "L1 model and data",
        "decoder layers of a model, activation checkpointing, the loss, model loading, the data",
        (
            "grass_llm.layers",
            "grass_llm.activation_checkpointing",
            "grass_llm.loss",
            "grass_llm.models",
            "grass_llm.data.**",
        ),
    ),
    (
        "L2 algorithm parts",
        "GRASS without hooks: sampling, its config, the MGN tracker, state offload, the backend interface",
        (
            "grass_llm.sampling",
            "grass_llm.config",
            "grass_llm.importance",
            "grass_llm.offload.**",
            "grass_llm.distributed.base",
        ),
    ),
    (
        "L3 optimizer parts and backends",
        "the optimizer's parts, the data-parallel backends and sharded checkpoints",
        ("grass_llm._optim.**", "grass_llm.distributed.**"),
    ),
    (
        "L4 optimizer and public API",
        "GrassOptimizer, the framework integrations, the package's lazy public names",
        ("grass_llm", "grass_llm.optim", "grass_llm.integrations.**"),
    ),
    ("L5 evaluation", "grass-llm eval: benchmarks, scoring, generation", ("grass_llm.evaluate.**",)),
    (
        "L6 workflows",
        "grass-llm train (the recipe) and grass-llm memory (which builds what train builds)",
        ("grass_llm.recipes.**", "grass_llm.memory.**"),
    ),
    (
        "L7 entry points",
        "what only a user or the command line calls: the CLI, the train command line, the plots",
        ("grass_llm.cli", "grass_llm.__main__", "grass_llm.recipes.train_cli", "grass_llm.plots"),
    ),
)
#: The library: everything below this layer. It never imports an application.
FIRST_APPLICATION_LAYER = "L5 evaluation"
#: the applications (module prefixes); of ``grass_llm.memory``, all but the tracker and its two L0 helpers
APPLICATIONS = (
    "grass_llm.recipes",
    "grass_llm.evaluate",
    "grass_llm.plots",
    "grass_llm.cli",
    "grass_llm.memory.budget",
    "grass_llm.memory.cli",
    "grass_llm.memory.cuda",
    "grass_llm.memory.estimate",
    "grass_llm.memory.fake",
    "grass_llm.memory.fit",
    "grass_llm.memory.inputs",
    "grass_llm.memory.model",
    "grass_llm.memory.report",
    "grass_llm.memory.result",
    "grass_llm.memory.step",
)

#: Imports that break the rules on purpose, for a while: (importer, imported) -> why, and when it goes.
#: An entry whose import is gone fails the test, so that it is removed with it.
TRANSITIONAL: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    eager: bool  # runs when the importer is imported (module level, not under TYPE_CHECKING)

    def where(self) -> str:
        return f"{_path(self.importer)}:{self.line}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _path(module: str) -> str:
    return str(MODULES[module].relative_to(PACKAGE.parents[1]))


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(module: str, node: ast.AST) -> list[str]:
    """The grass_llm modules an import node imports (``from pkg import sub`` is the submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: from the importer's package
            package = module if _is_package(module) else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    if (  # importlib.import_module("grass_llm....")
        isinstance(node, ast.Call)
        and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return [node.args[0].value]
    return []


def _imports(module: str, source: str | None = None) -> list[Import]:
    """The grass_llm imports of ``module`` (its file, or ``source``)."""
    found: list[Import] = []

    def visit(node: ast.AST, eager: bool) -> None:
        for target in _targets(module, node):
            if target == "grass_llm" or target.startswith("grass_llm."):
                found.append(Import(module, target, node.lineno, eager))
        for child in ast.iter_child_nodes(node):
            lazy = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            lazy = lazy or (isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body)
            visit(child, eager and not lazy)

    visit(ast.parse(MODULES[module].read_text(encoding="utf-8") if source is None else source), True)
    return found


IMPORTS = {m: _imports(m) for m in MODULES}
LAYER_INDEX = {name: i for i, (name, _, _) in enumerate(LAYERS)}


def layer_of(module: str) -> str | None:
    """The layer of ``module`` by the table (None: not placed)."""
    best: tuple[int, str] | None = None
    for name, _, patterns in LAYERS:
        for pattern in patterns:
            if pattern == module:
                return name
            below = pattern.endswith(".**") and (module == pattern[:-3] or module.startswith(pattern[:-2]))
            if below and (best is None or len(pattern) > best[0]):
                best = (len(pattern), name)
    return None if best is None else best[1]


def _rank(module: str) -> int:
    return LAYER_INDEX[layer_of(module)]


def _parents(module: str) -> list[str]:
    return [module.rsplit(".", k)[0] for k in range(1, module.count(".") + 1)]


#: packages whose ``__init__`` imports at import time (importing anything below them runs it)
EAGER_PACKAGES = {m for m in MODULES if _is_package(m) and any(i.eager for i in IMPORTS[m])}


def _checked(imp: Import) -> bool:
    return imp.imported != imp.importer and (imp.importer, imp.imported) not in TRANSITIONAL


# ------------------------------------------------------------------------------------------------
def test_every_module_is_placed_in_a_layer():
    unplaced = [f"{_path(m)} ({m})" for m in MODULES if layer_of(m) is None]
    assert not unplaced, "place these modules in a layer of tests/test_layering.py LAYERS: " + ", ".join(unplaced)


def test_the_table_names_only_modules_that_exist():
    exact = [p for _, _, patterns in LAYERS for p in patterns if not p.endswith(".**")]
    assert not [p for p in exact if p not in MODULES], "LAYERS names modules that do not exist"


def test_every_import_names_a_module_that_exists():
    missing = [f"{i.where()} imports {i.imported}" for imps in IMPORTS.values() for i in imps if i.imported not in MODULES]
    assert not missing, "imports of modules that do not exist:\n" + "\n".join(missing)


def test_no_module_imports_a_higher_layer():
    upward = [
        f"{i.where()}: {i.importer} ({layer_of(i.importer)}) imports {i.imported} ({layer_of(i.imported)})"
        for imps in IMPORTS.values()
        for i in imps
        if _checked(i) and i.imported in MODULES and _rank(i.imported) > _rank(i.importer)
    ]
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_the_library_never_imports_its_applications():
    first = LAYER_INDEX[FIRST_APPLICATION_LAYER]
    assert all(_rank(m) >= first for m in MODULES if m.startswith(APPLICATIONS)), "an application in the library"
    # (the lazy grass_llm/memory/__init__.py and __main__ import nothing at import time)
    unlisted = [m for m in MODULES if _rank(m) >= first and not m.startswith(APPLICATIONS)]
    assert set(unlisted) <= {"grass_llm.memory", "grass_llm.__main__"}, f"add to APPLICATIONS: {unlisted}"
    found = [
        f"{i.where()}: {i.importer} imports {i.imported}"
        for imps in IMPORTS.values()
        for i in imps
        if _checked(i) and _rank(i.importer) < first and i.imported.startswith(APPLICATIONS)
    ]
    assert not found, "the library imports an application:\n" + "\n".join(found)


def test_no_import_cycle():
    graph = {m: sorted({i.imported for i in IMPORTS[m] if _checked(i) and i.imported in MODULES}) for m in MODULES}
    cycles = [c for c in _strongly_connected(graph) if len(c) > 1]
    lines = []
    for cycle in cycles:
        members = set(cycle)
        lines += [
            f"{i.where()}: {i.importer} imports {i.imported}"
            for m in sorted(members)
            for i in IMPORTS[m]
            if _checked(i) and i.imported in members
        ]
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(lines)


def test_package_inits_do_not_pull_a_higher_layer_in():
    """Importing ``a.b.c`` first runs ``a/__init__.py`` and ``a/b/__init__.py``: one that imports
    eagerly must not be above the importer (were ``grass_llm/memory/__init__.py`` to import the
    estimator eagerly, the library could not import ``grass_llm.memory.tracker``: it stays lazy)."""
    assert "grass_llm.memory" not in EAGER_PACKAGES, "grass_llm/memory/__init__.py must import lazily"
    found = []
    for imps in IMPORTS.values():
        for i in imps:
            if not _checked(i) or i.imported not in MODULES:
                continue
            for p in _parents(i.imported):
                inside = i.importer == p or i.importer.startswith(p + ".")
                if p in EAGER_PACKAGES and not inside and _rank(p) > _rank(i.importer):
                    found.append(f"{i.where()}: {i.importer} imports {i.imported}, which runs {_path(p)} ({layer_of(p)})")
    assert not found, "\n".join(found)


def test_transitional_exceptions_are_still_needed():
    present = {(i.importer, i.imported) for imps in IMPORTS.values() for i in imps}
    stale = [f"{a} -> {b}" for a, b in TRANSITIONAL if (a, b) not in present]
    assert not stale, "remove these TRANSITIONAL entries, their import is gone: " + ", ".join(stale)


def test_importing_the_library_loads_no_application():
    """The same rule at run time: import every library module and look at what got loaded. (Not the
    library modules that live in an application package whose ``__init__`` loads it eagerly: the test
    above keeps the library from importing those. ``grass_llm/memory/__init__.py`` is lazy, so
    ``grass_llm.memory.tracker`` is imported here and must not load the estimator.)"""
    first = LAYER_INDEX[FIRST_APPLICATION_LAYER]
    library = sorted(
        m
        for m in MODULES
        if _rank(m) < first and not any(p in EAGER_PACKAGES and _rank(p) >= first for p in _parents(m))
    )
    code = (
        "import importlib, sys\n"
        f"for m in {library!r}:\n"
        "    importlib.import_module(m)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({APPLICATIONS!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing the library loaded applications: {out}"


@pytest.mark.parametrize(
    "module, layer",
    [
        ("grass_llm.memory.tracker", "L0 foundation"),
        ("grass_llm.memory.estimate", "L6 workflows"),
        ("grass_llm.memory.workspaces", "L0 foundation"),
        ("grass_llm.memory.fit.search", "L6 workflows"),
        ("grass_llm.distributed.base", "L2 algorithm parts"),
        ("grass_llm.distributed.fsdp2", "L3 optimizer parts and backends"),
        ("grass_llm._optim.units", "L3 optimizer parts and backends"),
        ("grass_llm.offload", "L2 algorithm parts"),
        ("grass_llm.recipes.train_cli", "L7 entry points"),
        ("grass_llm.recipes.step", "L6 workflows"),
        ("grass_llm.somewhere_new", None),
    ],
)
def test_the_most_specific_pattern_places_a_module(module, layer):
    assert layer_of(module) == layer


def _strongly_connected(graph: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                out.append(component)
    return out


def test_the_checks_catch_what_they_are_for():
    """The cycle finder and the import reader on small cases, so that a green run means something."""
    assert sorted(map(sorted, _strongly_connected({"a": ["b"], "b": ["a"], "c": ["a"]}))) == [["a", "b"], ["c"]]
    source = (
        "from typing import TYPE_CHECKING\n"
        "from grass_llm import data\n"
        "if TYPE_CHECKING:\n"
        "    from grass_llm.cli import main\n"
        "def f():\n"
        "    import grass_llm.plots\n"
        "    importlib.import_module('grass_llm.evaluate')\n"
    )
    found = {(i.imported, i.line, i.eager) for i in _imports("grass_llm.schedule", source)}
    assert found == {
        ("grass_llm.data", 2, True),  # (from a package, a submodule)
        ("grass_llm.cli", 4, False),
        ("grass_llm.plots", 6, False),
        ("grass_llm.evaluate", 7, False),
    }
    assert _rank("grass_llm.cli") > _rank("grass_llm.schedule")  # all three would be reported
