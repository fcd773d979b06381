"""The package's import graph against the layers named in docs/architecture.md.

Only imports made when a module is loaded count: those at its top level (also inside a
top-level `if`, `try` or `with`), not those under `if TYPE_CHECKING:` nor inside functions.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mq_worker"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
WHERE = "the table under '## Layers' in docs/architecture.md"


@dataclass(frozen=True)
class Layer:
    level: int
    name: str
    units: frozenset[str]  # top-level modules and subpackages, as named in the table


def read_layers(text: str) -> list[Layer]:
    """The rows of the layer table: | level | layer | what it holds | modules |."""
    section = text.split("\n## Layers\n", 1)
    assert len(section) == 2, "docs/architecture.md has no '## Layers' section"
    layers = []
    for line in section[1].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            units = frozenset(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cells[3]))
            layers.append(Layer(int(cells[0]), cells[1], units))
    assert layers, f"no rows found in {WHERE}"
    return layers


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    """The table's name for a module: `mq_worker.workers.base` is in `workers`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _load_time_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _load_time_imports(node.body)
            found += _load_time_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody,
                          *(handler.body for handler in node.handlers)):
                found += _load_time_imports(block)
        elif isinstance(node, ast.With):
            found += _load_time_imports(node.body)
    return found


def imported_modules(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package's modules that `name` imports when it is loaded."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _load_time_imports(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            # `from mq_worker import topology` imports the module, not the package's API.
            found.add(submodule if submodule in modules else source)
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: imported_modules(path, name, modules) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    finished: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module):], module]
        if module in finished:
            return None
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            cycle = visit(imported)
            if cycle is not None:
                return cycle
        path.pop()
        finished.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle is not None:
            return cycle
    return None


def test_the_layer_table_names_each_level_once_and_each_module_once() -> None:
    layers = read_layers(ARCHITECTURE.read_text())
    assert sorted(layer.level for layer in layers) == list(range(1, len(layers) + 1)), (
        f"the levels in {WHERE} must be 1, 2, 3... each once")
    placed: dict[str, str] = {}
    for layer in layers:
        for unit in layer.units:
            assert unit not in placed, (
                f"`{unit}` is in two layers of {WHERE}: {placed[unit]!r} and {layer.name!r}")
            placed[unit] = layer.name


def test_every_module_of_the_package_is_in_a_layer_and_every_entry_is_a_module() -> None:
    layers = read_layers(ARCHITECTURE.read_text())
    placed = {unit for layer in layers for unit in layer.units}
    existing = {unit_of(module) for module in import_graph()}
    missing = sorted(existing - placed)
    assert not missing, "\n".join(
        f"mq_worker.{unit} is in no layer: add `{unit}` to the modules column of its layer's "
        f"row ({', '.join(layer.name for layer in layers)}) in {WHERE}" for unit in missing)
    stale = sorted(placed - existing)
    assert not stale, f"{WHERE} names modules that do not exist: {stale}"


def test_no_module_imports_one_of_a_layer_above_its_own() -> None:
    layers = read_layers(ARCHITECTURE.read_text())
    level = {unit: layer.level for layer in layers for unit in layer.units}
    name = {layer.level: layer.name for layer in layers}
    upward = []
    for module, imports in sorted(import_graph().items()):
        for imported in sorted(imports):
            own, other = level.get(unit_of(module)), level.get(unit_of(imported))
            if own is not None and other is not None and other > own:
                upward.append(f"{module} ({name[own]}) imports {imported} ({name[other]})")
    assert not upward, (
        "imports from a layer above (move the code down, or the module up in "
        f"{WHERE}):\n" + "\n".join(upward))


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(("graph", "expected"), [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"d"}, "d": {"c"}}, ["c", "d", "c"]),
])
def test_the_cycle_finder_finds_cycles_and_only_cycles(
        graph: dict[str, set[str]], expected: list[str] | None) -> None:
    assert find_cycle(graph) == expected
