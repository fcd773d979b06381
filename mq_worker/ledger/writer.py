"""One batch of events and output written in a few statements, whatever its size.

Round trips are what a shared PostgreSQL costs, so a batch is written as one
multi-row INSERT per table (`RETURNING` says which rows are new) and one
`executemany` of the run merges (psycopg pipelines it). Only new rows change
a run, which is what makes the writes idempotent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import orjson

from mq_worker.ledger.migrations import Dialect
from mq_worker.ledger.records import EventRow, OutputRow, WriteResult

_CHUNK = 200  # rows per INSERT: far below either database's limit on parameters
_EVENT_COLUMNS = "id, run_id, type, time, rank, source, data, recorded_at, size"
_OUTPUT_COLUMNS = ("run_id, worker, sequence, started_at, first_line, lines, bytes, "
                   "dropped_lines, truncated, eof, recorded_at")


def _insert_returning(cursor: Any, dialect: Dialect, table: str, columns: str,
                      conflict: str, returning: str, rows: Sequence[tuple[Any, ...]]
                      ) -> set[tuple[Any, ...]]:
    """Insert `rows`, skipping conflicts; the `returning` values of the rows inserted."""
    inserted: set[tuple[Any, ...]] = set()
    width = columns.count(",") + 1
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start:start + _CHUNK]
        marks = ", ".join(["(" + ", ".join("?" * width) + ")"] * len(chunk))
        cursor.execute(dialect.sql(
            f"INSERT INTO {table} ({columns}) VALUES {marks} "
            f"ON CONFLICT ({conflict}) DO NOTHING RETURNING {returning}"),
            [value for row in chunk for value in row])
        inserted.update(tuple(found) for found in cursor.fetchall())
    return inserted


def write_rows(cursor: Any, dialect: Dialect, upsert: str, rows: Sequence[EventRow | OutputRow],
               now: float, max_output_bytes: int) -> WriteResult:
    # One order for every writer, so two ledgers on one database lock runs alike.
    events = sorted({r.id: r for r in rows if isinstance(r, EventRow)}.values(),
                    key=lambda r: (r.run_id, r.id))
    outputs = sorted({(r.run_id, r.worker, r.sequence): r for r in rows
                      if isinstance(r, OutputRow)}.values(),
                     key=lambda r: (r.run_id, r.worker, r.sequence))
    duplicates = len(rows) - len(events) - len(outputs)
    new_events = _insert_returning(
        cursor, dialect, "events", _EVENT_COLUMNS, "id", "id",
        [(r.id, r.run_id, r.type, r.time, r.rank, r.source, r.data, now, r.size)
         for r in events])
    changes = [r.run for r in events if (r.id,) in new_events and r.run is not None]

    capped = _cap(cursor, dialect, outputs, max_output_bytes)
    new_batches = _insert_returning(
        cursor, dialect, "output", _OUTPUT_COLUMNS, "run_id, worker, sequence",
        "run_id, worker, sequence",
        [(r.run_id, r.worker, r.sequence, r.started_at, r.first_line,
          orjson.dumps(lines).decode(), size, r.dropped_lines, int(truncated), int(r.eof), now)
         for r, (lines, size, truncated) in zip(outputs, capped, strict=True)])
    for r, (lines, size, truncated) in zip(outputs, capped, strict=True):
        if (r.run_id, r.worker, r.sequence) in new_batches:
            changes.append(replace(r.run, output_bytes=size, output_lines=len(lines),
                                   output_dropped_lines=r.dropped_lines,
                                   output_truncated=int(truncated)))
    changes.sort(key=lambda change: change.id)
    if changes:
        cursor.executemany(upsert, [change.values() for change in changes])
    duplicates += (len(events) - len(new_events)) + (len(outputs) - len(new_batches))
    return WriteResult(len(new_events), duplicates, len(new_batches))


def _cap(cursor: Any, dialect: Dialect, outputs: Sequence[OutputRow], max_bytes: int
         ) -> list[tuple[list[list[str]], int, bool]]:
    """Each batch's lines within what its run may still store (approximate across ledgers)."""
    run_ids = sorted({r.run_id for r in outputs})
    stored: dict[str, int] = {}
    for start in range(0, len(run_ids), _CHUNK):
        chunk = run_ids[start:start + _CHUNK]
        cursor.execute(dialect.sql(
            f"SELECT id, output_bytes FROM runs WHERE id IN ({', '.join('?' * len(chunk))})"),
            chunk)
        stored.update((run_id, int(size)) for run_id, size in cursor.fetchall())
    result = []
    for row in outputs:
        room = max_bytes - stored.get(row.run_id, 0)
        lines, size, truncated = row.lines, row.bytes, row.truncated
        if size > room:
            lines, size = _fit(lines, max(room, 0))
            truncated = True
        stored[row.run_id] = stored.get(row.run_id, 0) + size
        result.append((lines, size, truncated))
    return result


def _fit(lines: list[list[str]], room: int) -> tuple[list[list[str]], int]:
    kept: list[list[str]] = []
    size = 0
    for stream, text in lines:
        cost = len(text.encode(errors="replace")) + 1
        if size + cost > room:
            break
        kept.append([stream, text])
        size += cost
    return kept, size
