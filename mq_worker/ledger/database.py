"""Opening the ledger's database: SQLite (stdlib sqlite3) or PostgreSQL (psycopg 3)."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Protocol

from mq_worker.errors import ConfigurationError
from mq_worker.ledger.migrations import POSTGRESQL, SQLITE, Dialect


def default_sqlite_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return Path(base) / "mq-worker" / "ledger.db"


def default_db_url() -> str:
    """MQ_WORKER_LEDGER_DB, else an SQLite file in the user's data directory."""
    return os.environ.get("MQ_WORKER_LEDGER_DB") or f"sqlite:///{default_sqlite_path()}"


def redact(url: str) -> str:
    """`url` without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


class Connection(Protocol):
    def begin(self, write: bool) -> Any: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...


def connect(url: str) -> tuple[Connection, Dialect]:
    """Open the database at `url`: `sqlite:///PATH` (or a bare path) or `postgresql://...`."""
    if url.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg
        except ImportError:
            raise ConfigurationError(
                "a PostgreSQL ledger needs the 'ledger' extra: pip install 'mq-worker[ledger]'"
            ) from None
        try:
            connection: Any = psycopg.connect(url, autocommit=False, connect_timeout=10)
        except psycopg.Error as exc:
            raise ConfigurationError(f"cannot open {redact(url)}: {exc}") from None
        return _PostgresConnection(connection), POSTGRESQL
    if "://" in url and not url.startswith("sqlite://"):
        raise ConfigurationError(
            f"unsupported ledger database {redact(url)!r}: use sqlite:///PATH or postgresql://..."
        )
    path = url.removeprefix("sqlite://").removeprefix("/") if url.startswith("sqlite://") else url
    if path != ":memory:":
        Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        connection = sqlite3.connect(os.path.expanduser(path), timeout=30,
                                     check_same_thread=False, isolation_level=None)
        _enable_wal(connection)
        # FULL: a transaction the ledger acknowledged survives a power cut, not only a crash.
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA busy_timeout=30000")
    except sqlite3.Error as exc:
        raise ConfigurationError(f"cannot open SQLite database {path!r}: {exc}") from None
    return _SqliteConnection(connection), SQLITE


def _enable_wal(connection: sqlite3.Connection, wait_seconds: float = 30.0) -> None:
    """Switch to WAL. A connection racing another one to switch a new file (a ledger and
    its dashboard starting together) is told "locked" at once, without the busy
    timeout: it tries again until the other is done."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class _SqliteConnection:
    """sqlite3 in autocommit mode with explicit BEGIN, so every write batch is one transaction."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.raw = connection
        self._open = False

    def begin(self, write: bool) -> Any:
        # A reader takes no lock: in WAL mode it never waits for the writer.
        self.raw.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        self._open = True
        return self.raw.cursor()

    def commit(self) -> None:
        if self._open:
            self.raw.execute("COMMIT")
            self._open = False

    def rollback(self) -> None:
        if self._open:
            self.raw.execute("ROLLBACK")
            self._open = False

    def close(self) -> None:
        self.raw.close()


class _PostgresConnection:
    def __init__(self, connection: Any) -> None:
        self.raw = connection

    def begin(self, write: bool) -> Any:
        return self.raw.cursor()

    def commit(self) -> None:
        self.raw.commit()

    def rollback(self) -> None:
        self.raw.rollback()

    def close(self) -> None:
        self.raw.close()
