"""anyio for structure, asyncio only at the edge (docs/architecture.md, "Inside a worker").

The modules below are the only ones that may import asyncio, each for the reason
the architecture page gives; any other module uses anyio.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mq_worker

PACKAGE = Path(mq_worker.__file__).parent

ASYNCIO_EDGE = {
    "outbox.py": "gathers aiormq's publisher-confirmation futures",
    "confirmed_batch.py": "aiormq's write queue and its confirmation futures",
    "socket_writes.py": "the asyncio stream writer of aiormq's connection, written to directly",
    "frame_reading.py": "the asyncio stream reader of aiormq's connection, read in chunks",
    "cli/common.py": "the event loop's exception handler",
    "output.py": "a timer set from synchronous code (call_later)",
    "infrastructure.py": "a run's exit awaited on its pidfd, its output read, with add_reader",
    "concurrency.py": "an idle handler task waits for its next delivery on a future (TaskPool)",
}


def modules_importing_asyncio() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name == "asyncio" or name.startswith("asyncio.") for name in names):
                found.add(path.relative_to(PACKAGE).as_posix())
    return found


def test_only_the_edge_imports_asyncio() -> None:
    assert modules_importing_asyncio() <= set(ASYNCIO_EDGE)
