"""The package's shape, read from its source with ``ast``: no import cycles, a torch-free config, and no
module too long to read in one sitting.

Every ``import`` statement counts: module level, inside functions, under ``if TYPE_CHECKING:``; relative
imports are resolved. ``import a.b.c`` is an edge to ``a.b.c``; ``from x import y`` is an edge to ``x.y`` when
that is a module of the package, else to ``x``. Only edges between the package's own modules are kept.
"""

from __future__ import annotations

import ast
import itertools
import re
from collections.abc import Container, Iterable, Mapping
from pathlib import Path

PACKAGE = "sounding_anagrams"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_LINES = 700

# module -> {imported module: line of the first import statement naming it}
Graph = Mapping[str, Mapping[str, int]]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def imported_modules(name: str, path: Path, modules: Container[str]) -> dict[str, int]:
    """The modules of ``modules`` that the import statements of module ``name`` name, each with the line of
    the first statement naming it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:  # `from ..x import y` in package a.b: x under a
                parts = package.split(".")
                source = ".".join([*parts[: len(parts) - node.level + 1], *([source] if source else [])])
            # `from x import y` imports the module x.y when there is one, else a name defined in x.
            targets = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target in modules and target != name:
                found.setdefault(target, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    modules = package_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the path that walks it, ending where it starts (``[a, b, a]``), or None.

    A depth-first walk: reaching a node that is still on the walk's path closes a cycle.
    """
    path: list[str] = []
    finished: set[str] = set()

    def walk(node: str) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in finished:
            return None
        path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = walk(target)
            if cycle is not None:
                return cycle
        path.pop()
        finished.add(node)
        return None

    for start in sorted(graph):
        cycle = walk(start)
        if cycle is not None:
            return cycle
    return None


def reachable(graph: Mapping[str, Iterable[str]], start: str) -> dict[str, list[str]]:
    """Every module ``start`` imports, directly or through others, with one import path to it."""
    paths = {start: [start]}
    pending = [start]
    while pending:
        node = pending.pop()
        for target in sorted(graph.get(node, ())):
            if target not in paths:
                paths[target] = [*paths[node], target]
                pending.append(target)
    del paths[start]
    return paths


def describe(graph: Graph, path: list[str]) -> str:
    """``a -> b (a.py:12) -> ...``: each step with the line that imports it."""
    files = package_modules()
    steps = [path[0]]
    for source, target in itertools.pairwise(path):
        steps.append(f"{target} ({files[source].relative_to(ROOT.parent)}:{graph[source][target]})")
    return " -> ".join(steps)


def test_find_cycle_reports_the_path_of_a_cycle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["b"]}) == ["b", "c", "b"]
    assert find_cycle({"a": ["a"]}) == ["a", "a"]


def test_every_kind_of_import_statement_is_an_edge(tmp_path: Path):
    source = tmp_path / "mod.py"
    source.write_text(
        "import pkg.a.deep\n"
        "from pkg.b import module_b, name_in_b\n"
        "from ..c import name_in_c\n"
        "from . import sibling\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.d import Name\n"
        "def lazy():\n"
        "    import pkg.e\n",
        encoding="utf-8",
    )
    modules = {"pkg", "pkg.a", "pkg.a.deep", "pkg.b", "pkg.b.module_b", "pkg.c", "pkg.d", "pkg.e"}
    modules |= {"pkg.sub", "pkg.sub.sibling", "pkg.sub.mod"}
    edges = imported_modules("pkg.sub.mod", source, modules)
    assert sorted(edges) == [
        "pkg.a.deep",
        "pkg.b",
        "pkg.b.module_b",
        "pkg.c",
        "pkg.d",
        "pkg.e",
        "pkg.sub.sibling",
    ]
    assert edges["pkg.e"] == 8


def test_the_import_graph_is_the_package_s():
    """The graph is read from the package itself, lazy imports included: not empty by mistake."""
    graph = import_graph()
    assert f"{PACKAGE}.cli" in graph and f"{PACKAGE}.config" in graph
    assert f"{PACKAGE}.errors" in graph[f"{PACKAGE}.config"]
    assert f"{PACKAGE}.search.fleet" in graph[f"{PACKAGE}.cli"]  # imported inside main()
    assert sum(len(edges) for edges in graph.values()) > len(graph)


def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {describe(graph, cycle)}"


def test_nothing_imports_the_command_line():
    """cli.py parses and dispatches; what commands share lives below it."""
    importers = [name for name, edges in import_graph().items() if f"{PACKAGE}.cli" in edges]
    assert importers == [], f"{importers} import {PACKAGE}.cli"


def test_the_render_config_does_not_reach_the_sampler():
    """config.py stays free of torch: it reaches nothing under sounding_anagrams.sampler, directly or
    through the modules it imports."""
    graph = import_graph()
    reached = reachable(graph, f"{PACKAGE}.config")
    sampler = sorted(name for name in reached if f"{name}.".startswith(f"{PACKAGE}.sampler."))
    assert sampler == [], "\n".join(describe(graph, reached[name]) for name in sampler)


def test_no_module_is_too_long_to_read():
    lengths = {
        name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in package_modules().items()
    }
    too_long = {name: count for name, count in lengths.items() if count > MAX_LINES}
    assert too_long == {}, f"modules over {MAX_LINES} lines: {too_long}"


def test_the_architecture_page_names_every_search_module_and_only_existing_ones():
    """docs/ARCHITECTURE.md is where a newcomer finds a concept's module: each module of the search engine
    is on it, and each module path it names exists."""
    page = (ROOT.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    named = {
        name for name in re.findall(r"`((?:[a-z_]+/)*[a-z_]+\.py)`", page) if not name.startswith("tests/")
    }
    search = {path.name for path in (ROOT / "search").glob("*.py") if path.name != "__init__.py"}
    missing = sorted(name for name in search if f"`{name}`" not in page and f"search/{name}" not in named)
    assert not missing, f"docs/ARCHITECTURE.md does not name {missing}"
    known = {str(path.relative_to(ROOT)) for path in ROOT.rglob("*.py")}
    stale = sorted(
        name for name in named if name not in known and not any(k.endswith(f"/{name}") for k in known)
    )
    assert not stale, f"docs/ARCHITECTURE.md names modules that do not exist: {stale}"
