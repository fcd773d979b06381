"""The outbox spool: a file of the events the broker has not yet confirmed.

One file per live worker in `--spool-dir`, locked (flock on a `.lock` file
beside it) for as long as the worker runs, so two live workers never share
one. The file is named after the worker, or after the host when the worker has
the default name (which contains the process id and so changes at every
restart): a restarted worker finds its file again. A worker also adopts the
files of workers that are gone (their lock is free): their events are copied
into its own file, then the orphan is removed.

The file is readable by its owner only (events carry run names and error
text). It is written without fsync: it survives a restart of the worker
process, not a power loss.

Writing never raises into the worker: a failed write (a full disk) is logged,
the events stay in memory, and the next write rewrites the whole file.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import IO

import orjson
import structlog

from mq_worker.events import OutgoingEvent, extra_routing_keys

log = structlog.get_logger("mq_worker.outbox")

SUFFIX = ".outbox.jsonl"
_REWRITE_AFTER = 10_000
_RETRY_SECONDS = 5.0


class Spool:
    """An append-only file of the events not yet confirmed."""

    def __init__(self, path: Path, *, lock: IO[bytes] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = lock
        self._confirmed_in_file = 0
        self.broken = False
        self._retry_at = 0.0
        self._repair_torn_tail()
        self._file = _open_private(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    @staticmethod
    def lock_path(path: Path) -> Path:
        return path.with_name(path.name.removesuffix(SUFFIX) + ".outbox.lock")

    def _repair_torn_tail(self) -> None:
        """Cut a last line a crash left without its newline, so it cannot swallow the next."""
        try:
            with self.path.open("rb+") as file:
                size = file.seek(0, os.SEEK_END)
                if size == 0:
                    return
                file.seek(size - 1)
                if file.read(1) == b"\n":
                    return
                file.seek(0)
                end = file.read().rfind(b"\n") + 1
                file.truncate(end)
                log.warning("dropped an incomplete last line of the outbox spool",
                            path=str(self.path), bytes=size - end)
        except FileNotFoundError:
            return

    def load(self) -> list[OutgoingEvent]:
        events = []
        with self.path.open("rb") as file:
            for line in file:
                try:
                    record = orjson.loads(line)
                    body = orjson.dumps(record["event"])
                    events.append(
                        OutgoingEvent(record["id"], record["type"], body, record["run_id"],
                                      extra_routing_keys(record["type"],
                                                         record["event"].get("data")))
                    )
                except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                    log.warning("skipping an unreadable line of the outbox spool",
                                path=str(self.path))
        return events

    def append(self, event: OutgoingEvent) -> None:
        self.append_all([event])

    def append_all(self, events: Iterable[OutgoingEvent]) -> None:
        if self.broken:
            return  # the file may end mid-line: only a whole rewrite repairs it
        try:
            self._file.write(b"".join(_record(event) for event in events))
            self._file.flush()
        except OSError as exc:
            self._failed(exc)

    def confirmed(self, count: int, pending: Collection[OutgoingEvent]) -> None:
        """`count` events were confirmed; `pending` are those still waiting."""
        self._confirmed_in_file += count
        if self.broken:
            if time.monotonic() >= self._retry_at:
                self.rewrite(pending)
            return
        if not pending:
            try:
                self._file.truncate(0)
            except OSError as exc:
                self._failed(exc)
                return
            self._confirmed_in_file = 0
        elif self._confirmed_in_file > _REWRITE_AFTER and self._confirmed_in_file > len(pending):
            self.rewrite(pending)

    def rewrite(self, pending: Iterable[OutgoingEvent]) -> None:
        """Replace the file by exactly `pending` (after a failure, or to shrink it)."""
        tmp = self.path.with_suffix(".tmp")
        try:
            with _open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as file:
                file.write(b"".join(_record(event) for event in pending))
            os.replace(tmp, self.path)
            new = _open_private(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            self._failed(exc)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        with contextlib.suppress(OSError):
            self._file.close()
        self._file = new
        self._confirmed_in_file = 0
        if self.broken:
            log.info("the outbox spool is written again", path=str(self.path))
        self.broken = False

    def _failed(self, exc: OSError) -> None:
        self._retry_at = time.monotonic() + _RETRY_SECONDS
        if not self.broken:
            log.error("cannot write the outbox spool; events are kept in memory only "
                      "until it can be written again", path=str(self.path), error=str(exc))
        self.broken = True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.close()  # releases the flock
            self._lock = None


def open_spool(directory: Path, worker_name: str, *, default_name: bool) -> Spool:
    """This worker's spool in `directory`, locked, with the events of orphaned spools adopted."""
    directory.mkdir(parents=True, exist_ok=True)
    base = worker_name
    if default_name:
        # The default name ends with this process's id; the host's name is stable.
        base = worker_name.rsplit("-", 1)[0] or "worker"
    for index in range(1, 1000):
        name = base if index == 1 else f"{base}.{index}"
        path = directory / f"{name}{SUFFIX}"
        lock = _try_lock(Spool.lock_path(path))
        if lock is not None:
            break
    else:
        raise OSError(f"no free outbox spool in {directory}: 999 are locked")
    spool = Spool(path, lock=lock)
    for orphan in sorted(directory.glob(f"*{SUFFIX}")):
        if orphan != path:
            _adopt(spool, orphan)
    return spool


def _adopt(spool: Spool, orphan: Path) -> None:
    lock = _try_lock(Spool.lock_path(orphan))
    if lock is None:
        return  # a live worker's
    try:
        if not orphan.exists():
            return  # adopted by another worker meanwhile
        events = Spool(orphan).load()
        spool.append_all(events)
        if spool.broken:
            log.error("cannot adopt an orphaned outbox spool", path=str(orphan))
            return
        orphan.unlink()
        with contextlib.suppress(OSError):
            Spool.lock_path(orphan).unlink()
        if events:
            log.info("events adopted from the outbox spool of a worker that is gone",
                     path=str(orphan), count=len(events))
    except OSError as exc:
        log.error("cannot adopt an orphaned outbox spool", path=str(orphan), error=str(exc))
    finally:
        lock.close()


def _try_lock(path: Path) -> IO[bytes] | None:
    file = _open_private(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        return None
    return file


def _open_private(path: Path, flags: int) -> IO[bytes]:
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o600)
    append = flags & os.O_APPEND
    mode = "ab" if append else ("r+b" if flags & os.O_RDWR else "wb")
    return os.fdopen(fd, mode)


def _record(event: OutgoingEvent) -> bytes:
    return orjson.dumps({
        "id": event.id,
        "type": event.type,
        "run_id": event.run_id,
        "event": orjson.Fragment(event.body),
    }) + b"\n"
