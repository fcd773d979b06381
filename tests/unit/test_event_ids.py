"""Event ids: distinct UUIDs (version 4), without a system call per event."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from uuid import UUID

import pytest

from mq_worker.events import build_event
from tests.helpers import PYTHON

EVENTS = 300
_BUILDING = (
    "from mq_worker.events import build_event\n"
    f"for i in range({EVENTS}):\n"
    "    build_event('mq_worker.run.submitted', source='/w', subject='r', data={})\n"
)


def test_event_ids_are_distinct_version_4_uuids() -> None:
    ids = [build_event("mq_worker.run.pending", source="/w", subject="r", data={}).id
           for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    for event_id in ids:
        parsed = UUID(event_id)
        assert parsed.version == 4 and str(parsed) == event_id


def test_a_forked_process_draws_ids_of_its_own() -> None:
    build_event("mq_worker.run.pending", source="/w", subject="r", data={})
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(writer, build_event("x", source="/w", subject=None, data={}).id.encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    in_child = os.read(reader, 100).decode()
    os.close(reader)
    assert in_child != build_event("x", source="/w", subject=None, data={}).id


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_event_ids_cost_no_system_call_each(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-e", "trace=getrandom", "-o", str(trace), PYTHON, "-c",
                    _BUILDING], check=True, timeout=120)
    draws = [line for line in trace.read_text().splitlines() if re.match(r"getrandom\(", line)]
    assert len(draws) < EVENTS / 10
