"""Cancels: the stream that keeps them, and the registry that remembers them.

A cancel must reach a run wherever it is: running on a worker, held by one,
still in a queue, parked until its start time, or not yet published. So
cancels go to a RabbitMQ stream (`mq_worker.cancels`) that keeps them for a
retention window. Every worker reads the stream: at start it replays the
window into its registry (and does not take runs before it has caught up),
then it follows new cancels as they come. A run that reaches a worker is
checked against the registry before anything else.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import aiormq.abc
import anyio
import anyio.abc
import structlog
from pamqp import commands as spec

from mq_worker.broker import deliver_frame, delivery_tag
from mq_worker.errors import InvalidMessage
from mq_worker.messages import parse_cancel
from mq_worker.topology import CANCEL_REPORTED_HEADER, CANCELS_STREAM, cancel_routing_key

log = structlog.get_logger("mq_worker.cancellation")

MARKER_HEADER = "x-mq-worker-marker"
DEFAULT_WINDOW_SECONDS = 30 * 24 * 3600
DEFAULT_MAX_ENTRIES = 1_000_000
# The marker's confirmation can be lost when the stream's leader fails; without it
# the session could wait forever. A TimeoutError ends the session: the worker reconnects.
MARKER_CONFIRM_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class CancelRecord:
    run_id: UUID
    reason: str | None
    at: float
    reported: bool = False  # a worker has published the run's `cancelled` event already


class CancelRegistry:
    """The cancels of the retention window, at most `max_entries` of them."""

    def __init__(
        self,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self.window_seconds = window_seconds
        self.max_entries = max_entries
        self._records: OrderedDict[UUID, CancelRecord] = OrderedDict()

    def __len__(self) -> int:
        return len(self._records)

    def add(self, record: CancelRecord) -> bool:
        """Remember `record`; False if its run was already cancelled."""
        if record.run_id in self._records:
            return False
        self._records[record.run_id] = record
        self._expire()
        return True

    def get(self, run_id: UUID) -> CancelRecord | None:
        return self._records.get(run_id)

    def mark_reported(self, run_id: UUID) -> None:
        record = self._records.get(run_id)
        if record is not None:
            self._records[run_id] = replace(record, reported=True)

    def _expire(self) -> None:
        horizon = time.time() - self.window_seconds
        while self._records:
            oldest = next(iter(self._records.values()))
            if oldest.at >= horizon and len(self._records) <= self.max_entries:
                break
            self._records.popitem(last=False)
            if oldest.at >= horizon:
                log.warning("cancel registry full: forgetting the oldest cancel",
                            max_entries=self.max_entries)


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
    ) -> None:
        self._routing_key = cancel_routing_key(pool)
        self._registry = registry
        self._on_cancel = on_cancel
        self._on_invalid = on_invalid
        self._verify = verify
        self._max_bytes = max_bytes
        self._next_offset: int | None = None
        self._marker: str | None = None
        self._caught_up = anyio.Event()
        self.replayed = 0

    async def follow(
        self,
        channel: aiormq.abc.AbstractChannel,
        publisher: aiormq.abc.AbstractChannel,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consume the stream; report started once every earlier cancel has been read."""
        offset: Any
        if self._next_offset is None:
            offset = datetime.fromtimestamp(
                time.time() - self._registry.window_seconds, tz=UTC
            )
        else:
            offset = self._next_offset
        self._marker = uuid.uuid4().hex
        self._caught_up = anyio.Event()
        await channel.basic_qos(prefetch_count=1000)
        await channel.basic_consume(
            CANCELS_STREAM, self._on_message, arguments={"x-stream-offset": offset}
        )
        # A marker published now comes after every cancel already in the stream.
        await publisher.basic_publish(
            b"",
            exchange="",
            routing_key=CANCELS_STREAM,
            properties=spec.Basic.Properties(headers={MARKER_HEADER: self._marker}),
            timeout=MARKER_CONFIRM_TIMEOUT,
        )
        await self._caught_up.wait()
        log.debug("cancel stream caught up", registry=len(self._registry))
        task_status.started()
        await anyio.sleep_forever()

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        headers: dict[str, Any] = dict(message.header.properties.headers or {})
        offset = headers.get("x-stream-offset")
        if isinstance(offset, int):
            self._next_offset = offset + 1
        frame = deliver_frame(message)
        await message.channel.basic_ack(delivery_tag(message), wait=False)
        marker = headers.get(MARKER_HEADER)
        if marker is not None:
            if isinstance(marker, bytes):
                marker = marker.decode()
            if marker == self._marker:
                self._caught_up.set()
            return
        if frame.routing_key != self._routing_key:
            return
        live = self._caught_up.is_set()
        try:
            verify = self._verify
            cancel = parse_cancel(
                message.body, max_bytes=self._max_bytes,
                verify=(lambda body: verify(body, headers)) if verify else None,
            )
        except InvalidMessage as exc:
            self._on_invalid(exc, live)
            return
        if headers.get(CANCEL_REPORTED_HEADER) is not None:
            self._registry.mark_reported(cancel.id)
            return
        timestamp = message.header.properties.timestamp
        at = timestamp.timestamp() if isinstance(timestamp, datetime) else time.time()
        record = CancelRecord(cancel.id, cancel.reason, at)
        if not live:
            self.replayed += 1
        if self._registry.add(record):
            self._on_cancel(record)
