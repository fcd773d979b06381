"""Snapshots of a pool's cancel window, so that a worker joining a busy pool starts in seconds.

Replaying the cancel stream costs a worker tens of microseconds a message in
the AMQP client alone: 100,000 cancels in the window took it seconds before
it could take a run. A snapshot is the window compacted: every cancel of the
pool that a caught-up worker holds, and `next_offset`, the cancel stream's
offset it covers up to. A starting worker reads the newest snapshot of its
pool from the stream `mq_worker.cancel-snapshots-<pool>` (`x-stream-offset:
last`) and then the cancel stream from `next_offset` on, with the usual
marker, so it still takes no run before it has every cancel of the window.

Who takes them: the pool's elected reporter, whenever the stream has grown by
SNAPSHOT_EVERY messages past the last snapshot it knows of (the one it started
from, or its own), checked every CHECK_SECONDS; so also right after it caught
up with a long replay. One worker per pool: workers starting together do not
all publish the same window. Any
complete snapshot is correct, however old: the stream's tail after it holds
every later cancel. A snapshot that cannot be used (another schema version,
another pool, a narrower window, malformed) is ignored and the stream read
from the start of the window, as without snapshots.

Signed deployments neither take nor trust snapshots: cancels must carry the
orchestrator's signature, which a snapshot does not.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiormq.abc
import anyio
import orjson
import structlog
from pamqp import commands as spec
from pydantic import BaseModel, Field

from mq_worker.cancel_registry import CancelRegistry
from mq_worker.topology import (
    JSON_CONTENT_TYPE,
    STREAM_OFFSET,
    cancel_snapshot_stream_name,
    declare_cancel_snapshot_stream,
)

log = structlog.get_logger("mq_worker.cancellation")

SCHEMA_VERSION = 1
CONTENT_TYPE = JSON_CONTENT_TYPE
# A snapshot is taken once the cancel stream has this many messages past the last one.
SNAPSHOT_EVERY = 10_000
# How often the elected reporter checks whether a snapshot is due.
CHECK_SECONDS = 5.0
# Time to wait for the newest snapshot of a stream that holds some.
READ_TIMEOUT = 2.0
PUBLISH_TIMEOUT = 30.0
# About 5 MB a 100,000 cancels: bigger windows are not snapshotted (messages stay < 16 MiB).
MAX_CANCELS = 250_000

Row = tuple[int, float, str | None, bool]


class CancelNote(BaseModel):
    reason: str | None = Field(default=None, description="The cancel's reason, if it had one.")
    reported: bool = Field(default=False, description="A worker has published the run's "
                           "`cancelled` event already (its next attempt was waiting).")


class CancelSnapshotMessage(BaseModel):
    """Every cancel of one pool's window that a caught-up worker holds, up to an offset of
    the cancel stream. Workers decode it with orjson (this model documents the contract)."""

    schema_version: int = Field(description=f"{SCHEMA_VERSION}. A worker ignores a snapshot "
                                "of a version it does not know and replays the cancel stream.")
    pool: str = Field(description="The pool whose cancels these are.")
    next_offset: int = Field(ge=0, description="The offset of `mq_worker.cancels` the snapshot "
                             "covers up to: a worker reads the stream on from there.")
    window_seconds: float = Field(description="The cancel window of the worker that took it; "
                                  "a worker with a wider window does not use it.")
    taken_at: float = Field(description="When it was taken, Unix seconds.")
    run_ids: str = Field(pattern="^([0-9a-f]{32})*$", description="The cancelled runs' ids, "
                         "32 lowercase hexadecimal digits each, concatenated, oldest first.")
    at: list[float] = Field(description="When each cancel came (Unix seconds), in the order "
                            "of `run_ids`.")
    notes: dict[str, CancelNote] = Field(default_factory=dict, description="By run id (32 "
                                         "hexadecimal digits): cancels with a reason or "
                                         "already reported.")


@dataclass(frozen=True)
class Snapshot:
    next_offset: int
    run_ids: str  # validated: 32 lowercase hexadecimal digits a cancel
    at: list[float]
    notes: dict[int, tuple[str | None, bool]]

    def rows(self) -> Iterator[Row]:
        """(run id as integer, when cancelled, reason, reported), oldest first, made one at
        a time: a joining worker never holds the whole window twice."""
        ids, notes = self.run_ids, self.notes
        for number, at in enumerate(self.at):
            key = int(ids[32 * number:32 * number + 32], 16)
            reason, reported = notes.get(key, (None, False)) if notes else (None, False)
            yield key, at, reason, reported


def encode(registry: CancelRegistry, *, pool: str, next_offset: int) -> bytes:
    rows = registry.rows()
    return orjson.dumps({
        "schema_version": SCHEMA_VERSION, "pool": pool, "next_offset": next_offset,
        "window_seconds": registry.window_seconds, "taken_at": time.time(),
        # 32 hexadecimal digits a cancel: one string, not 100,000 small ones, to decode.
        "run_ids": "".join(f"{key:032x}" for key, _, _, _ in rows),
        "at": [at for _, at, _, _ in rows],
        "notes": {f"{key:032x}": {"reason": reason, "reported": reported}
                  for key, _, reason, reported in rows if reason is not None or reported},
    })


def decode(body: bytes, *, pool: str, window_seconds: float) -> Snapshot | None:
    """The snapshot in `body`, or None (logged) if this worker cannot use it."""
    try:
        value = orjson.loads(body)
        if not isinstance(value, dict) or value.get("schema_version") != SCHEMA_VERSION:
            reason = "unknown schema_version"
        elif value.get("pool") != pool:
            reason = "another pool's snapshot"
        elif not (isinstance(value.get("window_seconds"), int | float)
                  and value["window_seconds"] >= window_seconds):
            reason = "taken with a narrower cancel window"
        else:
            offset = value.get("next_offset")
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                raise ValueError("next_offset")
            return _checked(offset, value["run_ids"], value["at"], value.get("notes"))
    except (orjson.JSONDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
        reason = f"malformed: {exc}"
    log.warning("cancel snapshot not used; reading the stream from the start of the window",
                reason=reason)
    return None


_HEX_IDS = re.compile(r"(?:[0-9a-f]{32})*")


def _checked(offset: int, run_ids: Any, times: Any, notes: Any) -> Snapshot:
    if not isinstance(run_ids, str) or not isinstance(times, list) \
            or len(run_ids) != 32 * len(times) or not _HEX_IDS.fullmatch(run_ids):
        raise ValueError("run_ids and at do not match")
    if not all(isinstance(at, int | float) and not isinstance(at, bool) for at in times):
        raise ValueError("an entry of at is not a number")
    checked: dict[int, tuple[str | None, bool]] = {}
    for key, note in (notes or {}).items():
        reason = note.get("reason")
        if not (reason is None or isinstance(reason, str)):
            raise ValueError(f"notes[{key}].reason is not text")
        checked[int(key, 16)] = (reason, note.get("reported") is True)
    return Snapshot(offset, run_ids, times, checked)


async def read_newest(connection: aiormq.abc.AbstractConnection, pool: str,
                      window_seconds: float) -> Snapshot | None:
    """The pool's newest usable snapshot, or None (none yet, or the broker refuses)."""
    channel = await connection.channel()
    try:
        if not await declare_cancel_snapshot_stream(channel, pool):
            return None  # none was ever kept: no need to wait for one
        await channel.basic_qos(prefetch_count=1)
        received: list[bytes] = []
        arrived = anyio.Event()

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            received.append(message.body)
            arrived.set()

        await channel.basic_consume(cancel_snapshot_stream_name(pool), on_message,
                                    arguments={STREAM_OFFSET: "last"})
        with anyio.move_on_after(READ_TIMEOUT):
            await arrived.wait()
    finally:
        await channel.close()
    if not received:
        return None
    return decode(received[0], pool=pool, window_seconds=window_seconds)


async def publish(connection: aiormq.abc.AbstractConnection, registry: CancelRegistry, *,
                  pool: str, next_offset: int) -> bool:
    """Publish a snapshot of `registry` covering the stream up to `next_offset`."""
    if len(registry) > MAX_CANCELS:
        log.info("cancel window too large to snapshot", cancels=len(registry),
                 max_cancels=MAX_CANCELS)
        return False
    body = encode(registry, pool=pool, next_offset=next_offset)
    channel = await connection.channel()
    try:
        await declare_cancel_snapshot_stream(channel, pool)
        await channel.basic_publish(
            body, exchange="", routing_key=cancel_snapshot_stream_name(pool),
            properties=spec.Basic.Properties(content_type=CONTENT_TYPE, delivery_mode=2),
            timeout=PUBLISH_TIMEOUT,
        )
    finally:
        await channel.close()
    log.info("cancel snapshot published", cancels=len(registry), next_offset=next_offset,
             bytes=len(body))
    return True
