"""The import layers of docs/architecture.md, checked statically: every import statement in pgpis_jax/ (at
module level, inside functions or classes, and under `if TYPE_CHECKING:`) is an edge of a module graph, which
must have no cycle and must respect the layer rules below. A second test runs the same checker on a small
synthetic package, so that a checker that saw nothing could not pass.

Resolution: `import pgpis_jax.a.b` and `from pgpis_jax.a import b` (b a submodule) are edges to pgpis_jax.a.b;
`from pgpis_jax.a import name` (name not a submodule) is an edge to pgpis_jax.a. The parent packages that
Python imports on the way are not edges (else every module would depend on every package __init__ above it).
The edges of a package __init__ to the submodules it re-exports are kept: none closes a cycle, so nothing is
ignored.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import textwrap
from typing import Dict, FrozenSet, Iterable, List, Sequence, Tuple

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "pgpis_jax"


@dataclasses.dataclass(frozen=True)
class Import:
    """One import statement's edge: `source` imports `target`, at `location` (path:line)."""

    source: str
    target: str
    location: str

    def __str__(self):
        return f"{self.location}: {self.source} -> {self.target}"


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """Modules under any of `importers` import nothing under `forbidden` (prefixes on module-name boundaries)."""

    description: str
    importers: Tuple[str, ...]
    forbidden: Tuple[str, ...]


def _under(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def entry_point_names(repo: pathlib.Path) -> Tuple[str, ...]:
    """The entry-point scripts: the modules at the repository root (train, sample, eval, ...)."""
    return tuple(sorted(path.stem for path in repo.glob("*.py")))


def package_modules(root: pathlib.Path, package: str) -> Dict[str, pathlib.Path]:
    """Dotted module name -> file for every .py file of `package` under `root` (a package is its __init__)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _resolve(name: str, modules: Dict[str, pathlib.Path]) -> str:
    """The longest prefix of dotted `name` that is a module of the package (the package itself at least)."""
    parts = name.split(".")
    while len(parts) > 1 and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


def _imported_modules(node: ast.AST, module: str, is_package: bool, modules: Dict[str, pathlib.Path]) -> List[str]:
    """The dotted module names an Import / ImportFrom node imports, relative imports made absolute: for
    `from base import name`, base.name if that is a module of the package, else base."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def import_graph(root: pathlib.Path, package: str, entry_points: Sequence[str]) -> List[Import]:
    """The edges from every module of `package` to the modules of the package and to the entry points."""
    modules = package_modules(root, package)
    edges = []
    for module, path in modules.items():
        location = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported_modules(node, module, path.name == "__init__.py", modules):
                if _under(name, (package,)):
                    target = _resolve(name, modules)
                elif name.split(".")[0] in entry_points:
                    target = name.split(".")[0]
                else:
                    continue
                edges.append(Import(module, target, f"{location}:{node.lineno}"))
    return sorted(set(edges), key=lambda edge: (edge.source, int(edge.location.rsplit(":", 1)[1]), edge.target))


def strongly_connected_cycles(edges: Sequence[Import]) -> List[List[Import]]:
    """One cycle (as its edges, in order) per strongly connected component of the graph that has a cycle."""
    successors: Dict[str, List[Import]] = {}
    for edge in edges:
        successors.setdefault(edge.source, []).append(edge)
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack = set()
    components: List[FrozenSet[str]] = []

    def visit(node: str):  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in successors.get(node, ()):
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            components.append(frozenset(component))

    for node in sorted(successors):
        if node not in index:
            visit(node)

    cycles = []
    for component in components:
        start = min(component)
        inner = {node: [e for e in successors.get(node, ()) if e.target in component] for node in component}
        if len(component) > 1 or any(e.target == start for e in inner[start]):
            cycles.append(_shortest_cycle_through(start, inner))
    return sorted(cycles, key=lambda cycle: cycle[0].source)


def _shortest_cycle_through(start: str, successors: Dict[str, List[Import]]) -> List[Import]:
    """Breadth-first from `start` to the first edge back to it (there is one: start is on a cycle)."""
    paths: Dict[str, List[Import]] = {start: []}
    frontier = [start]
    while True:
        next_frontier = []
        for node in frontier:
            for edge in successors[node]:
                if edge.target == start:
                    return paths[node] + [edge]
                if edge.target not in paths:
                    paths[edge.target] = paths[node] + [edge]
                    next_frontier.append(edge.target)
        frontier = next_frontier


def describe_cycle(cycle: Sequence[Import]) -> str:
    """`a -> b -> a` with the location of each import."""
    return " -> ".join(f"{edge.source} ({edge.location})" for edge in cycle) + f" -> {cycle[0].source}"


def layer_violations(edges: Sequence[Import], rules: Sequence[LayerRule]) -> List[Tuple[LayerRule, Import]]:
    """Every (rule, edge) where the edge's source is one of the rule's importers and its target is forbidden."""
    return [(rule, edge) for rule in rules for edge in edges
            if _under(edge.source, rule.importers) and _under(edge.target, rule.forbidden)]


ENTRY_POINTS = entry_point_names(REPO)
BUILDING_BLOCKS = ("pgpis_jax.models", "pgpis_jax.nn", "pgpis_jax.diffusion", "pgpis_jax.poses")
UPPER_LAYERS = ("pgpis_jax.weights", "pgpis_jax.methods", "pgpis_jax.trainer", "pgpis_jax.metrics",
                "pgpis_jax.evaluation", "pgpis_jax.cli")
RULES = (
    LayerRule("networks and building blocks import no layer above them", BUILDING_BLOCKS, UPPER_LAYERS),
    # The trainer takes a pgpis_jax.methods.base.Method by duck typing and imports no methods module at all
    # (not even methods.base), so all of pgpis_jax.methods is forbidden to it.
    LayerRule("the trainer imports no method", ("pgpis_jax.trainer",), ("pgpis_jax.methods",)),
    LayerRule("nothing in the package imports an entry-point script", (PACKAGE,), ENTRY_POINTS),
)

@pytest.fixture(scope="module")
def package_graph() -> List[Import]:
    edges = import_graph(REPO, PACKAGE, ENTRY_POINTS)
    # the checker sees the package: a module-level and a function-level import it must have found
    assert any(e.source == "pgpis_jax.weights.transformers_io" and e.target == "pgpis_jax.models.encoders.swin"
               for e in edges)
    assert any(e.source == "pgpis_jax.methods.pcdm.inpaint" and e.target == "pgpis_jax.methods.pcdm.pipeline"
               for e in edges)
    return edges


def test_package_has_no_import_cycle(package_graph):
    cycles = strongly_connected_cycles(package_graph)
    assert not cycles, "import cycles:\n" + "\n".join(map(describe_cycle, cycles))


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.description)
def test_layer_rule(package_graph, rule):
    violations = layer_violations(package_graph, [rule])
    assert not violations, f"{rule.description}:\n" + "\n".join(str(edge) for _, edge in violations)


def test_entry_points_are_the_root_scripts():
    assert {"train", "sample", "eval", "extract_features", "demo"} <= set(ENTRY_POINTS)


def _write_package(root: pathlib.Path, files: Dict[str, str]):
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))


def test_checker_reports_a_cycle_and_forbidden_edges(tmp_path):
    _write_package(tmp_path, {
        "pgpis_jax/__init__.py": "",
        # a cycle a -> b -> c -> a through a module-level, a package-relative and a function-level import
        "pgpis_jax/a.py": "import pgpis_jax.b\n",
        "pgpis_jax/b.py": "from . import c\n",
        "pgpis_jax/c.py": "def late():\n    from pgpis_jax import a\n    return a\n",
        # no cycle: models/__init__ re-exports models/net, which imports a name of weights/__init__
        "pgpis_jax/models/__init__.py": "from pgpis_jax.models.net import Net\n",
        "pgpis_jax/models/net.py": textwrap.dedent("""\
            from pgpis_jax.weights import NAME


            class Net:
                def load(self):
                    from pgpis_jax.weights import io
                    import train
                    return io
            """),
        "pgpis_jax/weights/__init__.py": "NAME = 'weights'\n",
        "pgpis_jax/weights/io.py": "from pgpis_jax.weights import NAME\n",
    })
    edges = import_graph(tmp_path, PACKAGE, ("train",))

    cycles = strongly_connected_cycles(edges)
    assert [[(e.source, e.target) for e in cycle] for cycle in cycles] == [
        [("pgpis_jax.a", "pgpis_jax.b"), ("pgpis_jax.b", "pgpis_jax.c"), ("pgpis_jax.c", "pgpis_jax.a")]]
    assert describe_cycle(cycles[0]) == ("pgpis_jax.a (pgpis_jax/a.py:1) -> pgpis_jax.b (pgpis_jax/b.py:1) -> "
                                         "pgpis_jax.c (pgpis_jax/c.py:2) -> pgpis_jax.a")

    violations = [(rule.description, str(edge)) for rule, edge in layer_violations(edges, RULES)]
    assert violations == [
        (RULES[0].description, "pgpis_jax/models/net.py:1: pgpis_jax.models.net -> pgpis_jax.weights"),
        (RULES[0].description, "pgpis_jax/models/net.py:6: pgpis_jax.models.net -> pgpis_jax.weights.io"),
        (RULES[2].description, "pgpis_jax/models/net.py:7: pgpis_jax.models.net -> train"),
    ]
