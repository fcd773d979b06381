"""The ledger's database on real SQLite and PostgreSQL: schema, idempotent writes, reads."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from mq_worker.events import build_event
from mq_worker.ledger import LedgerStore
from mq_worker.ledger.migrations import LATEST_VERSION
from mq_worker.ledger.records import EventRow, OutputRow, parse_event, parse_output
from tests.helpers.ledger import ledger_database


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with ledger_database(request.param, tmp_path) as url:
        yield url


def _event(event_type: str, run_id: str, **data: Any) -> EventRow:
    common = {"run_id": run_id, "run_name": "demo", "pool": "p", "queue": "q", "worker": "w1",
              "related": [{"role": "deployment", "id": "d-1", "name": "nightly"}], "tags": ["t"]}
    return parse_event(build_event(f"mq_worker.run.{event_type}", source="/mq_worker/workers/w1",
                                   subject=run_id, data={**common, **data}).body)


def _output(run_id: str, sequence: int, lines: list[str], **fields: Any) -> OutputRow:
    return parse_output(orjson.dumps({
        "run_id": run_id, "worker": "w1", "pool": "p", "queue": "q", "sequence": sequence,
        "first_line": sequence * 10, "lines": [{"stream": "stdout", "text": t} for t in lines],
        **fields}))


def test_schema_is_created_once_and_versioned(db_url: str) -> None:
    with LedgerStore(db_url) as store:
        assert store.schema_version() == 0
        assert store.migrate() == LATEST_VERSION
        assert store.migrate() == LATEST_VERSION
        assert store.schema_version() == LATEST_VERSION


def test_a_run_is_recorded_once_whatever_the_order_and_repetitions(db_url: str) -> None:
    run_id = str(uuid.uuid4())
    pending = _event("pending", run_id, late_by_seconds=0.0)
    submitted = _event("submitted", run_id, infrastructure_pid="h:12", late_by_seconds=0.25)
    crashed = _event("crashed", run_id, status_code=3, reason="exit-code",
                     message="the process exited with status code 3")
    with LedgerStore(db_url) as store:
        store.migrate()
        first = store.write([crashed, _output(run_id, 1, ["b"]), pending])
        again = store.write([pending, submitted, crashed, _output(run_id, 0, ["a"]),
                             _output(run_id, 1, ["b"])])
        run = store.get_run(run_id)
    assert (first.events, first.output_batches) == (2, 1)
    assert (again.events, again.duplicates, again.output_batches) == (1, 3, 1)
    assert run is not None
    assert [e.type for e in run.events] == [
        "mq_worker.run.pending", "mq_worker.run.submitted", "mq_worker.run.crashed"]
    assert (run.state, run.status_code, run.reason, run.worker) == ("crashed", 3, "exit-code", "w1")
    assert (run.deployment_id, run.deployment_name, run.tags) == ("d-1", "nightly", ["t"])
    assert run.infrastructure_pid == "h:12"
    assert run.start_delay_seconds == 0.25
    assert run.pending_at and run.submitted_at and run.ended_at
    assert run.pending_at <= run.submitted_at <= run.ended_at
    assert run.duration_seconds is not None and run.duration_seconds >= 0
    assert run.event_count == 3 and run.output_lines == 2


def test_output_comes_back_in_order_and_capped_with_one_marker(db_url: str) -> None:
    run_id = str(uuid.uuid4())
    with LedgerStore(db_url, max_output_bytes=100) as store:
        store.migrate()
        store.write([_output(run_id, s, [f"line {s}.{i}" for i in range(3)]) for s in (2, 0, 1)])
        store.write([_output(run_id, 3, ["x" * 60], dropped_lines=4),
                     _output(run_id, 4, ["y" * 60])])
        lines = store.get_output(run_id)
        run = store.get_run(run_id)
    texts = [line.text for line in lines]
    assert texts[:9] == [f"line {s}.{i}" for s in range(3) for i in range(3)]
    assert sum("truncated" in t for t in texts) == 1
    assert any("4 lines dropped" in t for t in texts)
    assert not any(t.startswith("y") for t in texts)
    assert run is not None and run.output_truncated and run.output_bytes <= 100


def test_runs_are_listed_newest_first_filtered_and_paged(db_url: str) -> None:
    ids = [str(uuid.uuid4()) for _ in range(25)]
    rows: list[EventRow | OutputRow] = []
    for i, run_id in enumerate(ids):
        rows.append(_event("pending", run_id, late_by_seconds=0.0))
        outcome = "completed" if i % 2 else "crashed"
        rows.append(_event(outcome, run_id, status_code=0 if i % 2 else 1))
        time.sleep(0.001)  # distinct event times, so "newest first" is well defined
    with LedgerStore(db_url) as store:
        store.migrate()
        store.write(rows)
        seen: list[str] = []
        cursor = None
        while True:
            page = store.list_runs(limit=10, before=cursor)
            seen.extend(r.id for r in page.runs)
            cursor = page.next_cursor
            if cursor is None:
                break
        crashed = store.list_runs(state="crashed", limit=100).runs
        none = store.list_runs(pool="elsewhere").runs
        recent = store.list_runs(since=time.time() + 60).runs
    assert seen == list(reversed(ids))
    assert [r.id for r in crashed] == [i for n, i in enumerate(ids) if n % 2 == 0][::-1]
    assert none == [] and recent == []


def test_pruning_deletes_old_runs_with_their_events_and_output(db_url: str) -> None:
    old, new = str(uuid.uuid4()), str(uuid.uuid4())
    with LedgerStore(db_url) as store:
        store.migrate()
        store.write([_event("completed", old, status_code=0), _output(old, 0, ["o"])])
        cutoff = time.time()
        store.write([_event("completed", new, status_code=0)])
        assert store.prune(cutoff) == 1
        assert store.get_run(old) is None and store.get_output(old) == []
        assert store.get_run(new) is not None


def test_postgresql_without_the_extra_fails_clearly(tmp_path: Path) -> None:
    hide_psycopg = ("import sys; sys.modules['psycopg'] = None; sys.argv[0] = 'mq-worker'; "
                    "from mq_worker.cli import main; main()")
    result = subprocess.run(
        [sys.executable, "-c", hide_psycopg, "runs", "--db",
         "postgresql://postgres@127.0.0.1:5432/postgres"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "pip install 'mq-worker[ledger]'" in result.stderr
    assert "Traceback" not in result.stderr
