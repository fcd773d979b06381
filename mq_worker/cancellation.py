"""Cancels: the stream that keeps them, and the registry that remembers them.

A cancel must reach a run wherever it is: running on a worker, held by one,
still in a queue, parked until its start time, or not yet published. So
cancels go to a RabbitMQ stream (`mq_worker.cancels`) that keeps them for a
retention window. Every worker reads the stream: at start it replays the
window into its registry (and does not take runs before it has caught up),
then it follows new cancels as they come. A run that reaches a worker is
checked against the registry before anything else. A worker joining a pool
whose window is long starts from a snapshot of it instead of the whole stream
(mq_worker.cancel_snapshots); the registry is mq_worker.cancel_registry.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiormq.abc
import aiormq.exceptions
import anyio
import anyio.abc
import structlog

from mq_worker import cancel_markers, cancel_replay, cancel_snapshots, stream_replay
from mq_worker.broker import deliver_frame, delivery_tag
from mq_worker.cancel_registry import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_WINDOW_SECONDS,
    CancelRecord,
    CancelRegistry,
)
from mq_worker.concurrency import wait_first
from mq_worker.errors import InvalidMessage, TopologyMismatch
from mq_worker.messages import parse_cancel
from mq_worker.stream_frames import Delivery
from mq_worker.topology import (
    CANCEL_REPORTED_HEADER,
    CANCELS_STREAM,
    MARKER_HEADER,
    STREAM_OFFSET,
    cancel_routing_key,
)
from mq_worker.wire_decoding import header_text

log = structlog.get_logger("mq_worker.cancellation")

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_WINDOW_SECONDS",
    "CancelFollower",
    "CancelRecord",
    "CancelRegistry",
    "StreamConsumerCancelled",
]

_ACK_EVERY = 200


class StreamConsumerCancelled(ConnectionError):
    """The broker cancelled the cancel stream's consumer: the session must start again."""


class CancelFollower:
    """Reads the cancel stream of one pool into a registry and reports each new cancel."""

    def __init__(
        self,
        *,
        pool: str,
        registry: CancelRegistry,
        on_cancel: Callable[[CancelRecord], None],
        on_invalid: Callable[[InvalidMessage, bool], None],
        verify: Callable[[bytes, dict[str, Any]], None] | None = None,
        max_bytes: int,
        keeps_snapshots: Callable[[], bool] = lambda: False,
        connection_name: str = "mq_worker",
    ) -> None:
        """`keeps_snapshots`: whether this worker now keeps its pool's snapshots current
        (it is the elected reporter); see mq_worker.cancel_snapshots. `connection_name`
        names the connection the replay opens, as the broker shows it."""
        self._connection_name = connection_name
        self._routing_key = cancel_routing_key(pool)
        self._registry = registry
        self._on_cancel = on_cancel
        self._on_invalid = on_invalid
        self._verify = verify
        self._pool = pool
        self._keeps_snapshots = keeps_snapshots
        # The cancel stream offset the newest snapshot known to this worker covers up to.
        self._snapshot_offset: int | None = None
        self._max_bytes = max_bytes
        self._next_offset: int | None = None
        # What identifies the message at _next_offset - 1 (for snapshots): its body and
        # marker as read, or the fingerprint a restored snapshot gave; None if unknown.
        self._last_message: tuple[bytes, Any] | str | None = None
        self._marker: str | None = None
        self._caught_up = anyio.Event()
        self._consumer_tag: str | None = None
        self._received = 0
        self._unreadable_at: int | None = None
        self._unacked = 0
        # Offset ranges (first, last) a replay that stopped short read past _next_offset:
        # the usual consumer steps over them while it catches up.
        self._already_read: list[tuple[int, int]] = []
        self.replayed = 0
        self.skipped_offsets = 0
        # Replays on a connection of their own that stopped short (the consumer read on).
        self.fast_replays_stopped = 0
        # How many range readers the last such replay used at once (mq_worker.cancel_replay).
        self.replay_readers = 0

    async def follow(
        self,
        channel: aiormq.abc.AbstractChannel,
        publisher: aiormq.abc.AbstractChannel,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consume the stream; report started once every earlier cancel has been read.

        Raises StreamConsumerCancelled when the broker cancels the consumer (the
        stream was deleted): the session ends, and the next one reads the stream
        declared again from the start of the window.
        """
        # A channel of its own: the follower acknowledges many deliveries at once, which
        # on a shared channel would take other consumers' deliveries (a held election token).
        own = await channel.connection.channel(publisher_confirms=False)
        try:
            await self._follow(own, publisher, task_status)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                if not own.is_closed:
                    await own.close()

    async def _follow(
        self,
        channel: aiormq.abc.AbstractChannel,
        publisher: aiormq.abc.AbstractChannel,
        task_status: anyio.abc.TaskStatus[None],
    ) -> None:
        cancelled = anyio.Event()
        closed = anyio.Event()
        channel.closing.add_done_callback(lambda _: closed.set())

        def on_server_cancel(frame: Any) -> None:
            if frame.consumer_tag == self._consumer_tag:
                # The stream is gone; offsets of a new one start again at 0.
                self._next_offset = None
                self._snapshot_offset = None
                self._already_read = []
                cancelled.set()

        channel.on_consumer_cancel_callbacks.add(on_server_cancel)
        try:
            await channel.basic_qos(prefetch_count=1000)
            # Cold (nothing read yet): where the stream ends now, to read it in ranges.
            cold = self._next_offset is None and not len(self._registry)
            end = await cancel_markers.stream_end(channel, publisher) if cold else None
            replayed = await self._catch_up(channel, publisher, end)
            # Caught up already if the replay read its marker: no second marker to wait for.
            await self._consume(channel, publisher, resume=True, caught_up=replayed)
            if not await self._wait_caught_up():
                # Nothing at all came from the stored offset: it is past the end of the
                # stream (one deleted and declared again while we were away).
                log.warning("cancel stream silent at the stored offset; "
                            "reading it again from the start of the window",
                            offset=self._next_offset)
                if self._consumer_tag is not None:
                    await channel.basic_cancel(self._consumer_tag)
                self._next_offset = None
                self._already_read = []
                await self._consume(channel, publisher, resume=False)
                if not await self._wait_caught_up():
                    raise TimeoutError("the cancel stream sent nothing, not even our marker")
            log.debug("cancel stream caught up", registry=len(self._registry))
            task_status.started()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_snapshots, channel.connection)
                await wait_first([cancelled, closed], timeout=None)
                tg.cancel_scope.cancel()
            if not cancelled.is_set():
                raise ConnectionError("the cancel stream's channel closed")
            raise StreamConsumerCancelled(
                "the broker cancelled the consumer of the cancel stream (stream deleted?)")
        finally:
            channel.on_consumer_cancel_callbacks.discard(on_server_cancel)

    @property
    def _snapshots(self) -> bool:
        return self._verify is None

    async def _catch_up(self, channel: aiormq.abc.AbstractChannel,
                        publisher: aiormq.abc.AbstractChannel, end: int | None) -> bool:
        """Restore the pool's newest snapshot if there is one, then replay the stream on from
        it (the whole window without one); True if the replay read its marker.

        Only a stream long enough for a snapshot (it ends at offset `end`) has one worth
        reading: a new pool's first worker does not wait for a snapshot that never comes.
        (Replaying while waiting for one was tried: a joining worker's snapshot then came
        seconds late, behind the replay; docs/benchmarks.md, Scale.)
        """
        if not self._snapshots or end is None or end < cancel_snapshots.SNAPSHOT_EVERY:
            return await self._replay_fast(channel.connection, publisher, end)
        snapshot = await cancel_snapshots.usable_newest(
            channel, self._pool, self._registry.window_seconds, end)
        if snapshot is None:
            return await self._replay_fast(channel.connection, publisher, end)
        # The worker takes no run yet: there is nothing to call on_cancel for.
        restored = self._registry.restore(snapshot.rows())
        self._next_offset = self._snapshot_offset = snapshot.next_offset
        self._last_message = snapshot.last_message
        log.info("cancel snapshot restored", cancels=restored, next_offset=snapshot.next_offset)
        return await self._replay_fast(channel.connection, publisher, end)

    async def _keep_snapshots(self, connection: aiormq.abc.AbstractConnection) -> None:
        """While this worker keeps its pool's snapshots (one worker per pool, so that
        workers starting together do not all publish the same window), snapshot whenever
        the stream has grown by SNAPSHOT_EVERY messages past the last snapshot it knows."""
        if not self._snapshots:
            return
        while True:
            offset, last = self._next_offset, self._last_message
            if offset is not None and last is not None and self._keeps_snapshots():
                known = self._snapshot_offset or 0
                if offset - known >= cancel_snapshots.SNAPSHOT_EVERY:
                    if not isinstance(last, str):
                        last = cancel_snapshots.fingerprint(*last)
                    await self._snapshot(connection, offset, last)
            await anyio.sleep(cancel_snapshots.CHECK_SECONDS)

    async def _snapshot(self, connection: aiormq.abc.AbstractConnection, offset: int,
                        last_message: str) -> None:
        self._snapshot_offset = offset  # too large or refused: not again before SNAPSHOT_EVERY
        try:
            await cancel_snapshots.publish(connection, self._registry, pool=self._pool,
                                           next_offset=offset, last_message=last_message)
        except (aiormq.exceptions.AMQPError, TopologyMismatch, ConnectionError,
                TimeoutError, RuntimeError) as exc:
            log.warning("could not publish a cancel snapshot", error=str(exc))

    async def _consume(
        self, channel: aiormq.abc.AbstractChannel, publisher: aiormq.abc.AbstractChannel,
        *, resume: bool, caught_up: bool = False,
    ) -> None:
        offset = self._start_offset(resume=resume)
        self._marker = uuid.uuid4().hex
        self._caught_up = anyio.Event()
        if caught_up:
            self._caught_up.set()
        self._unacked = 0
        await channel.basic_qos(prefetch_count=1000)
        ok = await channel.basic_consume(
            CANCELS_STREAM, self._on_message, arguments={STREAM_OFFSET: offset}
        )
        self._consumer_tag = ok.consumer_tag
        if not caught_up:
            # A marker published now comes after every cancel already in the stream.
            await cancel_markers.publish(publisher, self._marker)

    def _start_offset(self, *, resume: bool) -> Any:
        if self._next_offset is None or not resume:
            return datetime.fromtimestamp(time.time() - self._registry.window_seconds, tz=UTC)
        return self._next_offset

    async def _replay_fast(self, connection: aiormq.abc.AbstractConnection,
                           publisher: aiormq.abc.AbstractChannel, end: int | None) -> bool:
        """Read the stream up to a marker on connections of its own (mq_worker.cancel_replay),
        into the registry, advancing the next offset; True if the marker came. The usual
        consumer then reads on from the next offset; after a replay stopped short, with a
        marker of its own, as without this replay, so that nothing is lost."""
        target = cancel_replay.target(connection, f"{self._connection_name} (cancel replay)",
                                      self._start_offset(resume=True))

        def on_message(delivery: Delivery) -> None:
            self._received += 1
            self._record(delivery.routing_key, delivery.headers, delivery.body,
                         delivery.timestamp, live=False)

        began = self._received
        try:
            outcome = await cancel_replay.replay_window(
                target, end=end, on_message=on_message,
                publish_marker=lambda marker: cancel_markers.publish(publisher, marker))
        except stream_replay.StreamCancelled:
            self._next_offset = self._snapshot_offset = None
            raise StreamConsumerCancelled("the cancel stream was deleted while it was read") \
                from None
        if outcome.next_offset is not None:
            self._next_offset = outcome.next_offset
            self._last_message = outcome.last_message
        self._already_read = outcome.already_read
        self.replay_readers = outcome.readers
        if not outcome.caught_up:
            self.fast_replays_stopped += 1
        log.debug("fast cancel replay", messages=self._received - began, readers=outcome.readers,
                  next_offset=self._next_offset, caught_up=outcome.caught_up)
        return outcome.caught_up

    async def _wait_caught_up(self) -> bool:
        """Wait for our marker while messages keep coming; False if none came for a while."""
        while not self._caught_up.is_set():
            seen = self._received
            with anyio.move_on_after(cancel_markers.STALL_SECONDS):
                await self._caught_up.wait()
            if not self._caught_up.is_set() and self._received == seen:
                return False
        return True

    def connection_broke_on_an_undecodable_frame(self) -> None:
        """Step past the next offset if the connection died twice on a frame at that offset.

        A message whose properties cannot be decoded ends the connection, and the
        stream would deliver it again at every reconnect, forever. Called when a
        session ends that way: the second time at the same position, the
        follower resumes one offset further (a cancel there is lost, and logged).
        """
        position = self._next_offset
        if position is None:
            return
        if self._unreadable_at != position:
            self._unreadable_at = position
            return
        log.error("skipping a cancel stream message that cannot be decoded", offset=position)
        self._next_offset = position + 1
        self._last_message = None  # not read: no snapshot can name it
        self._unreadable_at = None
        self.skipped_offsets += 1

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        self._received += 1
        headers: dict[str, Any] = dict(message.header.properties.headers or {})
        replaying = not self._caught_up.is_set()
        offset = headers.get(STREAM_OFFSET)
        # Record first, then advance the offset, then acknowledge: an acknowledgement
        # that fails (its channel closing) must not lose the cancel for good.
        if not (self._already_read and cancel_replay.within(offset, self._already_read)):
            self._handle(message, headers)
        if isinstance(offset, int):
            self._next_offset = offset + 1
            self._last_message = (message.body, headers.get(MARKER_HEADER))
        try:
            # One ack frame (a system call) per message costs more than the rest of the
            # work: acknowledge many at once, well inside the prefetch; stream
            # acknowledgements only grant credit, so the last few may wait for more.
            self._unacked += 1
            if (replaying and self._caught_up.is_set()) or self._unacked >= _ACK_EVERY:
                self._unacked = 0
                await message.channel.basic_ack(delivery_tag(message), multiple=True, wait=False)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            # Stream acknowledgements only grant credit; the session ends on its own.
            log.debug("cancel stream acknowledgement failed", error=str(exc))

    def _handle(self, message: aiormq.abc.DeliveredMessage, headers: dict[str, Any]) -> None:
        marker = headers.get(MARKER_HEADER)
        if marker is not None:
            if header_text(marker) == self._marker:
                self._caught_up.set()
                self._already_read = []
            return
        timestamp = message.header.properties.timestamp
        self._record(deliver_frame(message).routing_key or "", headers, message.body,
                     timestamp.timestamp() if isinstance(timestamp, datetime) else None,
                     live=self._caught_up.is_set())

    def _record(self, routing_key: str, headers: dict[str, Any], body: bytes,
                timestamp: float | None, *, live: bool) -> None:
        """Remember the cancel in a message of the stream (its broker timestamp, if any)."""
        if routing_key != self._routing_key:
            return
        try:
            verify = self._verify
            cancel = parse_cancel(
                body, max_bytes=self._max_bytes,
                verify=(lambda body: verify(body, headers)) if verify else None,
            )
        except InvalidMessage as exc:
            self._on_invalid(exc, live)
            return
        if headers.get(CANCEL_REPORTED_HEADER) is not None:
            self._registry.mark_reported(cancel.id)
            return
        record = CancelRecord(cancel.id, cancel.reason,
                              time.time() if timestamp is None else timestamp)
        if not live:
            self.replayed += 1
        if self._registry.add(record):
            self._on_cancel(record)
