"""Every wire name is written once, in mq_worker.topology, and imported everywhere else.

A name typed again elsewhere drifts the day one of the two copies is renamed: the
worker would then publish one header and read another. This test reads the
package's source and fails on any string constant equal to a name topology defines.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import mq_worker
from mq_worker import topology
from mq_worker.events import EventType

PACKAGE = Path(mq_worker.__file__).parent
TOPOLOGY = PACKAGE / "topology"

# (file, value): a literal in that file that equals a wire name without being one.
ALLOWED: dict[tuple[str, str], str] = {
    ("health.py", "application/json"): "an HTTP response's content type",
    ("dashboard/api.py", "application/json"): "an HTTP response's content type",
    ("job_configuration.py", "default"): "the JSON Schema keyword",
    ("workers/hooks.py", "default"): "the JSON Schema keyword",
    ("schema/channels.py", "default"): "the AsyncAPI parameter keyword",
    ("schema/models.py", "application/json"): "a typing.Literal is written out; the AsyncAPI "
                                              "drift test holds it to the wire",
}


def wire_names() -> set[str]:
    """Every string topology defines: its constants, and the header and argument
    names (`x-...`) written in its source."""
    names = {
        value
        for name, value in vars(topology).items()
        if name.isupper() and isinstance(value, str)
    }
    for name, value in vars(topology).items():
        if name.isupper() and isinstance(value, tuple):
            names.update(item for item in value if isinstance(item, str))
    for path in TOPOLOGY.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and node.value.startswith("x-")):
                names.add(node.value)
    return names


def _string_constants(tree: ast.AST) -> Iterator[ast.Constant]:
    """String constants, leaving out the pieces of f-strings (templates, not names) and
    logger names (module names, such as `mq_worker.output`)."""
    not_names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            not_names.update(id(part) for part in node.values)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "get_logger"):
            not_names.update(id(argument) for argument in node.args)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in not_names):
            yield node


def retyped_names() -> list[str]:
    names = wire_names()
    event_types = {event_type.value for event_type in EventType}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if path.parent == TOPOLOGY:
            continue
        for node in _string_constants(ast.parse(path.read_text())):
            value = node.value
            if value not in names or (relative, value) in ALLOWED:
                continue
            if relative == "events.py" and value in event_types:
                continue  # the event types are defined with the event models
            found.append(f"{relative}:{node.lineno}: {value!r}")
    return found


def test_no_wire_name_is_typed_outside_topology() -> None:
    found = retyped_names()
    assert not found, "import these names from mq_worker.topology:\n" + "\n".join(found)


def test_the_scan_sees_a_retyped_name_and_only_that() -> None:
    source = (
        f'HEADER = "{topology.MARKER_HEADER}"\n'
        f'label = f"{{x}}{topology.MARKER_HEADER}"\n'
        f'log = structlog.get_logger("{topology.OUTPUT_EXCHANGE}")\n'
    )
    constants = [node.value for node in _string_constants(ast.parse(source))]
    assert {topology.MARKER_HEADER, topology.OUTPUT_EXCHANGE} <= wire_names()
    assert constants == [topology.MARKER_HEADER]
