"""The ledger's schema as versioned migrations, for SQLite and PostgreSQL.

Each migration is a list of statements applied in one transaction, and its
version is recorded in `ledger_schema`; a ledger applies what its database
lacks when it starts, so an older database is upgraded in place. Times are
seconds since the epoch (double precision) in both databases, so the same
queries and indexes serve both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Dialect:
    """What differs between the two databases."""

    name: str
    big_integer: str
    placeholder: str

    def sql(self, statement: str) -> str:
        """`statement` written with `?` placeholders, in this dialect's style."""
        return statement if self.placeholder == "?" else statement.replace("?", self.placeholder)


SQLITE = Dialect("sqlite", "INTEGER", "?")
POSTGRESQL = Dialect("postgresql", "BIGINT", "%s")


def _v1(d: Dialect) -> list[str]:
    big = d.big_integer
    return [
        f"""CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            name TEXT,
            pool TEXT,
            queue TEXT,
            worker TEXT,
            flow_id TEXT,
            flow_name TEXT,
            deployment_id TEXT,
            deployment_name TEXT,
            tags TEXT NOT NULL DEFAULT '[]',
            state TEXT NOT NULL,
            state_time DOUBLE PRECISION NOT NULL,
            state_rank INTEGER NOT NULL,
            status_code INTEGER,
            reason TEXT,
            message TEXT,
            infrastructure_pid TEXT,
            scheduled_start_time DOUBLE PRECISION,
            created_at DOUBLE PRECISION NOT NULL,
            pending_at DOUBLE PRECISION,
            submitted_at DOUBLE PRECISION,
            ended_at DOUBLE PRECISION,
            start_delay_seconds DOUBLE PRECISION,
            duration_seconds DOUBLE PRECISION,
            event_count INTEGER NOT NULL DEFAULT 0,
            output_bytes {big} NOT NULL DEFAULT 0,
            output_lines {big} NOT NULL DEFAULT 0,
            output_dropped_lines {big} NOT NULL DEFAULT 0,
            output_truncated INTEGER NOT NULL DEFAULT 0
        )""",
        # Newest first, and keyset pagination on (created_at, id), with or without a filter.
        "CREATE INDEX runs_created ON runs (created_at DESC, id DESC)",
        "CREATE INDEX runs_state ON runs (state, created_at DESC, id DESC)",
        "CREATE INDEX runs_pool ON runs (pool, created_at DESC, id DESC)",
        "CREATE INDEX runs_queue ON runs (queue, created_at DESC, id DESC)",
        "CREATE INDEX runs_worker ON runs (worker, created_at DESC, id DESC)",
        "CREATE INDEX runs_deployment ON runs (deployment_id, created_at DESC, id DESC)",
        "CREATE INDEX runs_ended ON runs (ended_at)",
        f"""CREATE TABLE events (
            id TEXT PRIMARY KEY,
            run_id TEXT NOT NULL,
            type TEXT NOT NULL,
            time DOUBLE PRECISION NOT NULL,
            rank INTEGER NOT NULL,
            source TEXT,
            data TEXT NOT NULL,
            recorded_at DOUBLE PRECISION NOT NULL,
            size {big} NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX events_run ON events (run_id, time, rank)",
        "CREATE INDEX events_recorded ON events (recorded_at)",
        """CREATE TABLE output (
            run_id TEXT NOT NULL,
            worker TEXT NOT NULL,
            sequence INTEGER NOT NULL,
            started_at DOUBLE PRECISION,
            first_line INTEGER NOT NULL,
            lines TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            dropped_lines INTEGER NOT NULL DEFAULT 0,
            truncated INTEGER NOT NULL DEFAULT 0,
            eof INTEGER NOT NULL DEFAULT 0,
            recorded_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (run_id, worker, sequence)
        )""",
    ]


MIGRATIONS: list[Callable[[Dialect], list[str]]] = [_v1]
LATEST_VERSION = len(MIGRATIONS)

SCHEMA_TABLE = """CREATE TABLE IF NOT EXISTS ledger_schema (
    version INTEGER PRIMARY KEY,
    applied_at DOUBLE PRECISION NOT NULL
)"""
