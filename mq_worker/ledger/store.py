"""The ledger's database: its schema, its writes and a small read API.

One SQL code path serves both databases through DB-API connections: the
stdlib `sqlite3` (the embedded default, in WAL mode so readers never block
the writer) and psycopg 3 for PostgreSQL (a ledger shared by several
instances). Calls are synchronous; `AsyncLedgerStore` runs them in a thread
so an event loop never waits on the database.

Writes are idempotent: an event is keyed by its id and an output batch by
(run, worker, sequence), and a run's row changes only when one of them is
new, so redeliveries and several ledgers on one database never count twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import orjson

from mq_worker.errors import ConfigurationError
from mq_worker.ledger import migrations
from mq_worker.ledger.database import connect, default_db_url, redact
from mq_worker.ledger.migrations import POSTGRESQL
from mq_worker.ledger.records import (
    RUN_COLUMNS,
    EventRecord,
    EventRow,
    OutputAssembler,
    OutputBatch,
    OutputLine,
    OutputRow,
    RunPage,
    RunRecord,
    WriteResult,
)
from mq_worker.ledger.upsert import run_upsert_sql
from mq_worker.ledger.writer import write_rows

__all__ = ["AsyncLedgerStore", "LedgerStore", "default_db_url", "redact"]

DEFAULT_MAX_OUTPUT_BYTES = 10 * 1024 * 1024
_MIGRATION_LOCK = 0x6D71775F6C6467  # pg_advisory_xact_lock key: "mqw_ldg"
_T = TypeVar("_T")


class LedgerStore:
    """The ledger database. Not thread-safe: use one per thread, or `AsyncLedgerStore`."""

    def __init__(self, url: str, *, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> None:
        self.url = url
        self.max_output_bytes = max_output_bytes
        self._connection, self.dialect = connect(url)
        self._upsert = self.dialect.sql(run_upsert_sql(self.dialect))

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> LedgerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sql(self, statement: str) -> str:
        return self.dialect.sql(statement)

    def _transaction(self, work: Callable[[Any], _T], *, write: bool = True) -> _T:
        cursor = self._connection.begin(write)
        try:
            result = work(cursor)
            self._connection.commit()
            return result
        except BaseException:
            self._connection.rollback()
            raise

    # -- schema --------------------------------------------------------------------

    def schema_version(self) -> int:
        """The schema version of the database; 0 for one no ledger has initialised (read-only)."""

        def read(cursor: Any) -> int:
            cursor.execute("SELECT MAX(version) FROM ledger_schema")
            row = cursor.fetchone()
            return int(row[0]) if row and row[0] is not None else 0

        try:
            return self._transaction(read, write=False)
        except Exception:  # no ledger_schema table (each driver has its own error for it)
            return 0

    def migrate(self) -> int:
        """Create or upgrade the schema; return the version it is now at."""

        def upgrade(cursor: Any) -> int:
            if self.dialect is POSTGRESQL:  # two ledgers starting together migrate once
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            cursor.execute(migrations.SCHEMA_TABLE)
            cursor.execute("SELECT MAX(version) FROM ledger_schema")
            row = cursor.fetchone()
            current = int(row[0]) if row and row[0] is not None else 0
            if current > migrations.LATEST_VERSION:
                raise ConfigurationError(
                    f"the ledger database has schema version {current}, newer than this "
                    f"mq-worker knows ({migrations.LATEST_VERSION}): upgrade mq-worker"
                )
            for version in range(current + 1, migrations.LATEST_VERSION + 1):
                for statement in migrations.MIGRATIONS[version - 1](self.dialect):
                    cursor.execute(statement)
                cursor.execute(self._sql("INSERT INTO ledger_schema VALUES (?, ?)"),
                               (version, time.time()))
            return migrations.LATEST_VERSION

        return self._transaction(upgrade)

    # -- writing -------------------------------------------------------------------

    def write(self, rows: Iterable[EventRow | OutputRow]) -> WriteResult:
        """Record events and output batches in one transaction; duplicates change nothing."""
        batch = list(rows)
        now = time.time()
        return self._transaction(lambda cursor: write_rows(
            cursor, self.dialect, self._upsert, batch, now, self.max_output_bytes))

    def prune(self, older_than: float, *, chunk: int = 1000) -> int:
        """Delete runs that ended (or, never ending, began) before `older_than`; return how many."""
        pruned = 0
        while True:
            def delete_some(cursor: Any) -> int:
                cursor.execute(self._sql(
                    "SELECT id FROM runs WHERE COALESCE(ended_at, created_at) < ? LIMIT ?"),
                    (older_than, chunk))
                ids = [r[0] for r in cursor.fetchall()]
                if not ids:
                    cursor.execute(self._sql(
                        "DELETE FROM events WHERE time < ? AND NOT EXISTS "
                        "(SELECT 1 FROM runs WHERE runs.id = events.run_id)"), (older_than,))
                    return 0
                marks = ", ".join("?" * len(ids))
                for table, column in (("events", "run_id"), ("output", "run_id"), ("runs", "id")):
                    cursor.execute(self._sql(f"DELETE FROM {table} WHERE {column} IN ({marks})"),
                                   ids)
                return len(ids)

            deleted = self._transaction(delete_some)
            pruned += deleted
            if deleted < chunk:
                return pruned

    # -- reading -------------------------------------------------------------------

    def list_runs(
        self,
        *,
        state: str | Sequence[str] | None = None,
        pool: str | None = None,
        queue: str | None = None,
        worker: str | None = None,
        deployment: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> RunPage:
        """Runs newest first (by their first event), filtered; `before` is a page's cursor."""
        states = [state] if isinstance(state, str) else list(state or ())
        where, args = run_conditions(
            states=states,
            equal={"pool": pool, "queue": queue, "worker": worker, "deployment_id": deployment},
            since=since, until=until,
        )
        return self.page_of_runs(where, args, limit=limit, before=before)

    def page_of_runs(self, where: Sequence[str], args: Sequence[Any], *, limit: int,
                     before: str | None) -> RunPage:
        """One page of the runs that meet every condition of `where` (SQL with `?` for
        `args`), newest first; `before` is the cursor a page gave for the next one."""
        where, args = list(where), list(args)
        if before:
            created, _, run_id = before.partition("/")
            # A row-value comparison: both databases walk the (created_at, id) index with it.
            where.append("(created_at, id) < (?, ?)")
            args.extend([float(created), run_id])
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        statement = (f"SELECT {', '.join(_READ_COLUMNS)} FROM runs {clause} "
                     "ORDER BY created_at DESC, id DESC LIMIT ?")
        rows = self._transaction(lambda c: _fetch(c, self._sql(statement), [*args, limit + 1]),
                                 write=False)
        runs = [_run_record(r) for r in rows[:limit]]
        cursor = f"{runs[-1].created_at!r}/{runs[-1].id}" if len(rows) > limit else None
        return RunPage(runs, cursor)

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run with its events in order, or None."""

        def read(cursor: Any) -> tuple[list[Any], list[Any]]:
            runs = _fetch(cursor, self._sql(
                f"SELECT {', '.join(_READ_COLUMNS)} FROM runs WHERE id = ?"), [run_id])
            events = _fetch(cursor, self._sql(
                "SELECT id, type, time, source, data FROM events WHERE run_id = ? "
                "ORDER BY time, rank, recorded_at, id"), [run_id])
            return runs, events

        runs, events = self._transaction(read, write=False)
        if not runs:
            return None
        records = [EventRecord(e[0], e[1], e[2], e[3], orjson.loads(e[4])) for e in events]
        return _run_record(runs[0], records)

    def get_output_batches(self, run_id: str) -> list[OutputBatch]:
        """The run's stored output batches in order."""
        rows = self._transaction(lambda c: _fetch(c, self._sql(
            "SELECT worker, sequence, lines, dropped_lines, truncated, eof FROM output "
            "WHERE run_id = ? ORDER BY started_at, worker, sequence"), [run_id]), write=False)
        return [OutputBatch(worker, sequence,
                            [OutputLine(stream, text) for stream, text in orjson.loads(lines)],
                            dropped, bool(truncated), bool(eof))
                for worker, sequence, lines, dropped, truncated, eof in rows]

    def get_output(self, run_id: str) -> list[OutputLine]:
        """The run's stored output in order, with a marker where some was truncated or dropped."""
        result: list[OutputLine] = []
        assembler = OutputAssembler(result.append)
        for batch in self.get_output_batches(run_id):
            assembler.add(batch)
        return result

    def count_runs(self) -> int:
        rows = self._transaction(lambda c: _fetch(c, "SELECT COUNT(*) FROM runs", []),
                                 write=False)
        return int(rows[0][0])


def run_conditions(*, states: Sequence[str] = (), equal: Mapping[str, Any] | None = None,
                   since: float | None = None,
                   until: float | None = None) -> tuple[list[str], list[Any]]:
    """SQL conditions on `runs` (and their arguments): one of `states`, each column of
    `equal` equal to its value (None: any), created in [since, until)."""
    where: list[str] = []
    args: list[Any] = []
    if states:
        where.append(f"state IN ({', '.join('?' * len(states))})")
        args.extend(states)
    for column, value in (equal or {}).items():
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if since is not None:
        where.append("created_at >= ?")
        args.append(since)
    if until is not None:
        where.append("created_at < ?")
        args.append(until)
    return where, args


def _fetch(cursor: Any, statement: str, args: Sequence[Any]) -> list[Any]:
    cursor.execute(statement, tuple(args))
    return list(cursor.fetchall())


_READ_COLUMNS = [c for c in RUN_COLUMNS if c not in ("state_time", "state_rank")]


def _run_record(row: Sequence[Any], events: list[EventRecord] | None = None) -> RunRecord:
    values = dict(zip(_READ_COLUMNS, row, strict=True))
    values["tags"] = orjson.loads(values["tags"] or "[]")
    values["output_truncated"] = bool(values["output_truncated"])
    if values["duration_seconds"] is None and values["ended_at"] and values["submitted_at"]:
        values["duration_seconds"] = values["ended_at"] - values["submitted_at"]
    return RunRecord(**values, events=events or [])


class AsyncLedgerStore:
    """A `LedgerStore` for an event loop: every call runs in one thread of its own."""

    def __init__(self, store: LedgerStore) -> None:
        self.store = store
        self._thread = anyio.CapacityLimiter(1)

    @classmethod
    async def open(cls, url: str, **options: Any) -> AsyncLedgerStore:
        store = await anyio.to_thread.run_sync(lambda: LedgerStore(url, **options))
        return cls(store)

    async def call(self, method: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        return await anyio.to_thread.run_sync(lambda: method(*args, **kwargs),
                                              limiter=self._thread)

    async def migrate(self) -> int:
        return await self.call(self.store.migrate)

    async def write(self, rows: list[EventRow | OutputRow]) -> WriteResult:
        return await self.call(self.store.write, rows)

    async def list_runs(self, **filters: Any) -> RunPage:
        return await self.call(self.store.list_runs, **filters)

    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self.call(self.store.get_run, run_id)

    async def get_output_batches(self, run_id: str) -> list[OutputBatch]:
        return await self.call(self.store.get_output_batches, run_id)

    async def get_output(self, run_id: str) -> list[OutputLine]:
        return await self.call(self.store.get_output, run_id)

    async def prune(self, older_than: float) -> int:
        return await self.call(self.store.prune, older_than)

    async def close(self) -> None:
        await self.call(self.store.close)
