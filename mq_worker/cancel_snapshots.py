"""Snapshots of a pool's cancel window, so that a worker joining a busy pool starts in seconds.

Replaying the cancel stream costs a worker microseconds a message even read
in bulk (mq_worker.stream_replay), and the broker's own time: 100,000 cancels
in the window take seconds before a worker can take a run. A snapshot is the
window compacted: every cancel of the pool that a caught-up worker holds, and
`next_offset`, the cancel stream's offset it covers up to, in parts of
PART_CANCELS cancels (messages stay well under 16 MiB) that a worker uses only
once it has read them all. A starting worker reads the newest snapshot of its
pool from the stream `mq_worker.cancel-snapshots-<pool>` (`x-stream-offset:
last`) and then the cancel stream from `next_offset` on, with the usual
marker, so it still takes no run before it has every cancel of the window.

Who takes them: the pool's elected reporter, whenever the stream has grown by
SNAPSHOT_EVERY messages past the last snapshot it knows of (the one it started
from, or its own), checked every CHECK_SECONDS; so also right after it caught
up with a long replay. One worker per pool: workers starting together do not
all publish the same window. Any
complete snapshot is correct, however old: the stream's tail after it holds
every later cancel, as long as it is the same stream: a snapshot names the
message it was taken after (`last_message`), and a worker that finds another
one at that offset (the stream was deleted and declared again, its offsets
starting at 0 again) does not use it. A snapshot that cannot be used (another
schema version, another pool, a narrower window, another stream, malformed)
is ignored and the stream read from the start of the window, as without
snapshots.

Signed deployments neither take nor trust snapshots: cancels must carry the
orchestrator's signature, which a snapshot does not.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import aiormq.abc
import aiormq.exceptions
import anyio
import orjson
import structlog
from pamqp import commands as spec
from pydantic import BaseModel, Field

from mq_worker.cancel_registry import CancelRegistry
from mq_worker.errors import TopologyMismatch
from mq_worker.topology import (
    CANCELS_STREAM,
    JSON_CONTENT_TYPE,
    MARKER_HEADER,
    STREAM_OFFSET,
    cancel_snapshot_stream_name,
    declare_cancel_snapshot_stream,
)

log = structlog.get_logger("mq_worker.cancellation")

# 2: in parts, and `last_message` (version 1 was one message, and could not tell a deleted
# cancel stream's offsets from its successor's).
SCHEMA_VERSION = 2
CONTENT_TYPE = JSON_CONTENT_TYPE
# A snapshot is taken once the cancel stream has this many messages past the last one.
SNAPSHOT_EVERY = 10_000
# How often the elected reporter checks whether a snapshot is due.
CHECK_SECONDS = 5.0
# Time to wait for the newest snapshot of a stream that holds some.
READ_TIMEOUT = 2.0
# ... and of one the broker says is empty: its count lags by up to ~5 s, so a snapshot
# published just now may be there, and comes at once if it is. A pool with no snapshot
# stream at all (it never had a snapshot, or the stream was deleted) is not waited for.
EMPTY_READ_TIMEOUT = 0.5
PUBLISH_TIMEOUT = 30.0
# Cancels a part holds at most: about 5 MB a 100,000, so a part stays well under 16 MiB.
PART_CANCELS = 200_000

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
    last_message: str = Field(description="The fingerprint of the cancel stream's message at "
                              "`next_offset - 1` (empty when `next_offset` is 0): the first 32 "
                              "hexadecimal digits of the SHA-256 of its body followed by the "
                              "UTF-8 of its `x-mq-worker-marker` header, if it has one. A worker "
                              "finding another message there (the stream was deleted and "
                              "declared again) does not use the snapshot.")
    taken_at: float = Field(description="When it was taken, Unix seconds.")
    snapshot_id: str = Field(description="Shared by the parts of one snapshot (32 hexadecimal "
                             "digits).")
    part: int = Field(ge=0, description="This part's number, from 0. The parts are published in "
                      "order, one after the other; `run_ids`, `at` and `notes` of part 0 come "
                      "first.")
    parts: int = Field(ge=1, description="How many parts the snapshot has. A worker uses a "
                       "snapshot only once it has read every part; an incomplete one is "
                       "ignored.")
    run_ids: str = Field(pattern="^([0-9a-f]{32})*$", description="The cancelled runs' ids, "
                         "32 lowercase hexadecimal digits each, concatenated, oldest first.")
    at: list[float] = Field(description="When each cancel came (Unix seconds), in the order "
                            "of `run_ids`.")
    notes: dict[str, CancelNote] = Field(default_factory=dict, description="By run id (32 "
                                         "hexadecimal digits): cancels with a reason or "
                                         "already reported.")


@dataclass(frozen=True)
class Snapshot:
    """A whole snapshot, or one part of it (`part` of `parts`, all with one `snapshot_id`)."""

    next_offset: int
    last_message: str
    run_ids: str  # validated: 32 lowercase hexadecimal digits a cancel
    at: list[float]
    notes: dict[int, tuple[str | None, bool]]
    snapshot_id: str = ""
    part: int = 0
    parts: int = 1

    def rows(self) -> Iterator[Row]:
        """(run id as integer, when cancelled, reason, reported), oldest first, made one at
        a time: a joining worker never holds the whole window twice."""
        ids, notes = self.run_ids, self.notes
        for number, at in enumerate(self.at):
            key = int(ids[32 * number:32 * number + 32], 16)
            reason, reported = notes.get(key, (None, False)) if notes else (None, False)
            yield key, at, reason, reported


def fingerprint(body: bytes, marker: str | bytes | None) -> str:
    """What identifies a message of the cancel stream (see `last_message`)."""
    if isinstance(marker, str):
        marker = marker.encode()
    return hashlib.sha256(body + (marker or b"")).hexdigest()[:32]


def encode(registry: CancelRegistry, *, pool: str, next_offset: int, last_message: str,
           part_cancels: int = PART_CANCELS) -> list[bytes]:
    """The snapshot's parts, in order: `part_cancels` cancels each (at least one part)."""
    rows = registry.rows()
    snapshot_id, taken_at = uuid.uuid4().hex, time.time()
    starts = range(0, max(len(rows), 1), part_cancels)
    bodies = []
    for number, start in enumerate(starts):
        part = rows[start:start + part_cancels]
        bodies.append(orjson.dumps({
            "schema_version": SCHEMA_VERSION, "pool": pool, "next_offset": next_offset,
            "window_seconds": registry.window_seconds, "taken_at": taken_at,
            "last_message": last_message, "snapshot_id": snapshot_id,
            "part": number, "parts": len(starts),
            # 32 hexadecimal digits a cancel: one string, not 100,000 small ones, to decode.
            "run_ids": "".join(f"{key:032x}" for key, _, _, _ in part),
            "at": [at for _, at, _, _ in part],
            "notes": {f"{key:032x}": {"reason": reason, "reported": reported}
                      for key, _, reason, reported in part if reason is not None or reported},
        }))
    return bodies


def decode(bodies: list[bytes], *, pool: str, window_seconds: float) -> Snapshot | None:
    """The snapshot whose parts are `bodies` (in any order), or None (logged) if this
    worker cannot use it: a part it cannot use, or parts missing."""
    parts = [decode_part(body, pool=pool, window_seconds=window_seconds) for body in bodies]
    if not parts or any(part is None for part in parts):
        return None
    return assemble([part for part in parts if part is not None])


def assemble(parts: list[Snapshot]) -> Snapshot | None:
    """The snapshot made of `parts`, or None (logged) unless they are every part of one."""
    parts = sorted(parts, key=lambda part: part.part)
    first = parts[0]
    if [part.part for part in parts] != list(range(first.parts)) or any(
            (part.snapshot_id, part.parts, part.next_offset, part.last_message)
            != (first.snapshot_id, first.parts, first.next_offset, first.last_message)
            for part in parts):
        log.warning("incomplete cancel snapshot not used", parts=first.parts,
                    found=len(parts))
        return None
    if len(parts) == 1:
        return first
    notes = {key: note for part in parts for key, note in part.notes.items()}
    return Snapshot(first.next_offset, first.last_message,
                    "".join(part.run_ids for part in parts),
                    [at for part in parts for at in part.at], notes, first.snapshot_id,
                    0, 1)


def decode_part(body: bytes, *, pool: str, window_seconds: float) -> Snapshot | None:
    """The snapshot part in `body`, or None (logged) if this worker cannot use it."""
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
            last, snapshot_id = value.get("last_message"), value.get("snapshot_id")
            if not isinstance(last, str) or not isinstance(snapshot_id, str):
                raise ValueError("last_message or snapshot_id")
            part, parts = value.get("part"), value.get("parts")
            if not (isinstance(part, int) and isinstance(parts, int) and 0 <= part < parts):
                raise ValueError("part and parts")
            snapshot = _checked(offset, last, value["run_ids"], value["at"], value.get("notes"))
            return replace(snapshot, snapshot_id=snapshot_id, part=part, parts=parts)
    except (orjson.JSONDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
        reason = f"malformed: {exc}"
    log.warning("cancel snapshot not used; reading the stream from the start of the window",
                reason=reason)
    return None


_HEX_IDS = re.compile(r"(?:[0-9a-f]{32})*")


def _checked(offset: int, last: str, run_ids: Any, times: Any, notes: Any) -> Snapshot:
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
    return Snapshot(offset, last, run_ids, times, checked)


async def usable_newest(channel: aiormq.abc.AbstractChannel, pool: str, window_seconds: float,
                        end: int) -> Snapshot | None:
    """The pool's newest snapshot if there is one of the cancel stream as it is now (whose
    last message is at `end`), else None."""
    try:
        snapshot = await read_newest(channel.connection, pool, window_seconds)
    except (aiormq.exceptions.AMQPError, TopologyMismatch, ConnectionError,
            TimeoutError) as exc:
        log.warning("cannot read cancel snapshots; reading the whole window", error=str(exc))
        return None
    if snapshot is None:
        return None
    if not await continues_stream(channel, snapshot, end):
        log.warning("cancel snapshot taken of another cancel stream (deleted and declared "
                    "again since?); reading the whole window", next_offset=snapshot.next_offset)
        return None
    return snapshot


async def read_newest(connection: aiormq.abc.AbstractConnection, pool: str,
                      window_seconds: float) -> Snapshot | None:
    """The pool's newest usable snapshot, or None (none yet, or the broker refuses).

    A part of the stream's last chunk says where its snapshot's first part is (`part`
    messages before it, as one worker publishes the parts one after the other); the
    parts are read from there."""
    channel = await connection.channel()
    try:
        held = await _counted(channel, pool)
        if held is None:
            log.info("no cancel snapshot stream for the pool; reading the whole window")
            return None
        newest = await _read_from(channel, pool, "last", 1,
                                  READ_TIMEOUT if held else EMPTY_READ_TIMEOUT)
        if not newest:
            return None
        offset, body = newest[0]
        part = decode_part(body, pool=pool, window_seconds=window_seconds)
        if part is None:
            return None
        if part.parts == 1:
            return part
        read = await _read_from(channel, pool, offset - part.part, part.parts, READ_TIMEOUT)
    finally:
        await channel.close()
    return decode([body for _, body in read], pool=pool, window_seconds=window_seconds)


async def _counted(channel: aiormq.abc.AbstractChannel, pool: str) -> int | None:
    """The messages the broker counts in the pool's snapshot stream (seconds behind), or
    None if there is no such stream, which then closes `channel`. Only a declared stream
    takes a snapshot (`publish` declares it), and workers never delete it, so a pool
    without one has no snapshot; the reporter's first, published at this very moment, is
    only missed, and the whole window read instead."""
    try:
        ok = await channel.queue_declare(cancel_snapshot_stream_name(pool), passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    return ok.message_count or 0


async def _read_from(channel: aiormq.abc.AbstractChannel, pool: str, offset: Any,
                     count: int, timeout: float) -> list[tuple[int, bytes]]:
    """Up to `count` messages (offset, body) of the snapshot stream from `offset` on."""
    await channel.basic_qos(prefetch_count=count)
    received: list[tuple[int, bytes]] = []
    enough = anyio.Event()

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        at = (message.header.properties.headers or {}).get(STREAM_OFFSET)
        if len(received) < count and isinstance(at, int):
            received.append((at, message.body))
        if len(received) >= count:
            enough.set()

    ok = await channel.basic_consume(cancel_snapshot_stream_name(pool), on_message,
                                     arguments={STREAM_OFFSET: offset})
    try:
        with anyio.move_on_after(timeout):
            await enough.wait()
    finally:
        assert ok.consumer_tag is not None
        await channel.basic_cancel(ok.consumer_tag)
    return received


async def continues_stream(channel: aiormq.abc.AbstractChannel, snapshot: Snapshot,
                           end: int) -> bool:
    """Whether the cancel stream (whose last message is at `end`) holds, at
    `next_offset - 1`, the message the snapshot was taken after: not so when the stream
    was deleted and declared again since, and its offsets started again at 0."""
    position = snapshot.next_offset - 1
    if position < 0:
        return snapshot.last_message == ""
    if position >= end:
        return False
    found: list[tuple[Any, str]] = []
    arrived = anyio.Event()

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        headers = message.header.properties.headers or {}
        marker = headers.get(MARKER_HEADER)
        if not found:
            found.append((headers.get(STREAM_OFFSET), fingerprint(
                message.body, marker if isinstance(marker, str | bytes) else None)))
            arrived.set()

    ok = await channel.basic_consume(CANCELS_STREAM, on_message, no_ack=False,
                                     arguments={STREAM_OFFSET: position})
    try:
        with anyio.move_on_after(READ_TIMEOUT):
            await arrived.wait()
    finally:
        assert ok.consumer_tag is not None
        await channel.basic_cancel(ok.consumer_tag)
    return found == [(position, snapshot.last_message)]


async def publish(connection: aiormq.abc.AbstractConnection, registry: CancelRegistry, *,
                  pool: str, next_offset: int, last_message: str) -> bool:
    """Publish a snapshot of `registry` covering the stream up to `next_offset`, whose
    message at `next_offset - 1` has the fingerprint `last_message`: its parts in order,
    each confirmed before the next."""
    bodies = encode(registry, pool=pool, next_offset=next_offset, last_message=last_message,
                    part_cancels=PART_CANCELS)
    channel = await connection.channel()
    try:
        await declare_cancel_snapshot_stream(channel, pool)
        for body in bodies:
            await channel.basic_publish(
                body, exchange="", routing_key=cancel_snapshot_stream_name(pool),
                properties=spec.Basic.Properties(content_type=CONTENT_TYPE, delivery_mode=2),
                timeout=PUBLISH_TIMEOUT,
            )
    finally:
        await channel.close()
    log.info("cancel snapshot published", cancels=len(registry), next_offset=next_offset,
             parts=len(bodies), bytes=sum(len(body) for body in bodies))
    return True
