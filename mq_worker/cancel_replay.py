"""Catching up with the cancel window on connections of their own, several ranges at once.

A cold worker (no snapshot, nothing read yet) must read every message of the window
before it takes a run. The broker, not the worker, is the limit: RabbitMQ 3.10 spends
tens of microseconds of its own CPU per stream message it hands to an AMQP 0-9-1
consumer, all of it in the one process that serves that consumer. So a long window is
split into ranges of offsets, each read by a consumer on a connection of its own
(mq_worker.stream_replay), and the broker serves them on all its cores.

The ranges run from the window's first offset (the first message a consumer attached
at the window's start time receives) to the offset of a marker published at the
stream's end before the replay (mq_worker.cancel_markers.stream_end). Each range
reader stops at its range's last offset; the last one reads on to a marker of its
own, published once it consumes, so that it has read every cancel published before.

A range that stops short (its connection closed or broken, a stall) costs nothing
but time: the caller's usual consumer reads on from the first offset not read, and
`ReplayOutcome.already_read` says which later offsets it may step over.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import aiormq.abc
import anyio
import structlog

from mq_worker import cancel_markers, stream_replay
from mq_worker.broker import mask_secrets
from mq_worker.stream_frames import Delivery, FrameError
from mq_worker.topology import CANCELS_STREAM, MARKER_HEADER, STREAM_OFFSET
from mq_worker.wire_decoding import header_text

log = structlog.get_logger("mq_worker.cancel_replay")

# Ranges read at once: at least the broker's cores. On 2 cores 4, 8 and 16 were alike
# (docs/benchmarks.md, Scale); 8 leaves room for a broker with more.
READERS = 8
# A window shorter than this per reader is read by one: a split would cost more
# connections than it saves.
MIN_PER_READER = 5_000

# Credit of each range reader: deliveries the broker sends ahead of its acknowledgements.
PREFETCH = 2000

# The message at an offset as a snapshot names it: its body and marker header.
LastMessage = tuple[bytes, Any]


@dataclass
class _Range:
    attach: int | datetime  # where its consumer attaches
    last: int | None  # its last offset; None: up to the replay's marker
    next_offset: int | None = None
    last_message: LastMessage | None = None
    finished: bool = False

    @property
    def first(self) -> int | None:
        return self.attach if isinstance(self.attach, int) else None


@dataclass
class ReplayOutcome:
    """Where the replay got to: every message before `next_offset` was read (all up to the
    marker if `caught_up`); `last_message` is the one at `next_offset - 1` if known. When
    it stopped short, `already_read` holds later (first, last) offset ranges read too."""

    caught_up: bool
    next_offset: int | None
    last_message: LastMessage | None
    already_read: list[tuple[int, int]] = field(default_factory=list)
    readers: int = 1


def target(connection: aiormq.abc.AbstractConnection, name: str,
           offset: int | datetime) -> stream_replay.ReplayTarget:
    """Where a replay reads: the cancel stream, from `offset`, on the broker of `connection`."""
    return stream_replay.ReplayTarget(
        url=connection.url, vhost=getattr(connection, "vhost", "/"),
        ssl_context=getattr(connection, "ssl_context", None), connection_name=name,
        stream=CANCELS_STREAM, offset=offset, stall_seconds=cancel_markers.STALL_SECONDS)


def within(offset: Any, ranges: list[tuple[int, int]]) -> bool:
    """Whether `offset` is in one of the (first, last) ranges."""
    return isinstance(offset, int) and any(first <= offset <= last for first, last in ranges)


async def replay_window(
    target: stream_replay.ReplayTarget,
    *,
    end: int | None,
    on_message: Callable[[Delivery], None],
    publish_marker: Callable[[str], Awaitable[None]],
) -> ReplayOutcome:
    """Read the stream from `target.offset` (an offset or the window's start time) up to a
    marker of its own, handing every other message to `on_message`, in ranges if `end`
    (an offset known to be in the stream) says the stretch is long. Raises
    stream_replay.StreamCancelled if the stream is deleted meanwhile."""
    ranges = [_Range(target.offset, None)]
    # Offsets start at 0: a stream ending before two readers' share is read in one range.
    if end is not None and READERS > 1 and end + 1 >= 2 * MIN_PER_READER:
        first = target.offset if isinstance(target.offset, int) else await _first_offset(target)
        if first is not None:
            ranges = _split(first, end)
    marker = uuid.uuid4().hex
    cancelled: list[stream_replay.StreamCancelled] = []

    async def read(number: int, part: _Range) -> None:
        name = target.connection_name + (f" {number}/{len(ranges)}" if len(ranges) > 1 else "")
        try:
            await _read_range(replace(target, offset=part.attach, connection_name=name,
                                      prefetch=PREFETCH), part,
                              marker, on_message, publish_marker)
        except stream_replay.StreamCancelled as exc:
            cancelled.append(exc)
            group.cancel_scope.cancel()  # the stream is gone: the other ranges with it
        except (stream_replay.ReplayStopped, FrameError, OSError, TimeoutError) as exc:
            log.info("cancel replay range stopped; the usual consumer reads on",
                     error=mask_secrets(str(exc)) or type(exc).__name__,
                     first=part.first, last=part.last, next_offset=part.next_offset)

    async with anyio.create_task_group() as group:
        for number, part in enumerate(ranges, 1):
            group.start_soon(read, number, part)
    if cancelled:
        raise cancelled[0]
    return _outcome(ranges)


def _split(first: int, end: int) -> list[_Range]:
    readers = max(1, min(READERS, (end - first + 1) // MIN_PER_READER))
    bounds = [first + (end + 1 - first) * n // readers for n in range(readers)]
    return [_Range(start, (bounds[n + 1] - 1) if n + 1 < readers else None)
            for n, start in enumerate(bounds)]


async def _first_offset(target: stream_replay.ReplayTarget) -> int | None:
    """The offset of the first message at or after `target.offset` (None if unknown)."""
    found: list[int] = []

    def on_delivery(delivery: Delivery) -> bool:
        offset = delivery.headers.get(STREAM_OFFSET)
        if isinstance(offset, int):
            found.append(offset)
        return True

    async def nothing() -> None:
        pass

    try:
        await stream_replay.replay(replace(target, prefetch=1), on_delivery, nothing)
    except (stream_replay.ReplayStopped, FrameError, OSError, TimeoutError) as exc:
        log.info("cannot find the cancel window's first offset; reading it in one range",
                 error=mask_secrets(str(exc)) or type(exc).__name__)
    return found[0] if found else None


async def _read_range(
    target: stream_replay.ReplayTarget,
    part: _Range,
    marker: str,
    on_message: Callable[[Delivery], None],
    publish_marker: Callable[[str], Awaitable[None]],
) -> None:
    first, last = part.first, part.last

    def on_delivery(delivery: Delivery) -> bool:
        offset = delivery.headers.get(STREAM_OFFSET)
        if isinstance(offset, int):
            if first is not None and offset < first:
                return False  # the start of its chunk: the range before reads it
            if last is not None and offset > last:
                # `last` is gone (retention): nothing more here
                part.next_offset, part.last_message = last + 1, None
                return True
        value = delivery.headers.get(MARKER_HEADER)
        if value is None:
            on_message(delivery)
        if isinstance(offset, int):
            part.next_offset = offset + 1
            part.last_message = (delivery.body, value)
        if last is not None:
            return offset == last
        return value is not None and header_text(value) == marker

    async def after_consume() -> None:
        if last is None:
            await publish_marker(marker)

    await stream_replay.replay(target, on_delivery, after_consume)
    part.finished = True


def _outcome(ranges: list[_Range]) -> ReplayOutcome:
    stopped = next((n for n, part in enumerate(ranges) if not part.finished), None)
    if stopped is None:
        final = ranges[-1]
        return ReplayOutcome(True, final.next_offset, final.last_message, readers=len(ranges))
    part = ranges[stopped]
    next_offset, last_message = part.next_offset, part.last_message
    if next_offset is None:  # it read nothing: on from where it attaches
        next_offset = part.first
        last_message = ranges[stopped - 1].last_message if stopped else None
    already_read = [(later.first, later.next_offset - 1) for later in ranges[stopped + 1:]
                    if later.first is not None and later.next_offset is not None
                    and later.next_offset > later.first]
    return ReplayOutcome(False, next_offset, last_message, already_read, len(ranges))
