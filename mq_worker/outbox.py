"""The outbox: every event waits here until the broker confirms it.

Events are published in order, many in flight at once (pipelined publisher
confirms). When a connection is lost, everything from the first unconfirmed
event on stays in the outbox and is published again on the next connection,
so events of one run keep their order and none is lost; a subscriber may see
one twice (at-least-once) and can tell by the event id.

The outbox never drops an event. Its capacity is the depth at which the worker
stops taking new runs; events of runs already taken are still accepted. With a
spool file, events also survive a restart of the worker.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import anyio
import structlog
from pamqp import commands as spec

from mq_worker import confirmed_batch
from mq_worker.events import CONTENT_TYPE, EventType, OutgoingEvent
from mq_worker.spool import Spool
from mq_worker.topology import EVENTS_EXCHANGE

log = structlog.get_logger("mq_worker.outbox")

DEFAULT_CAPACITY = 10_000
# Seconds to wait for the broker's confirmation of an event (as for parks and dead letters).
CONFIRM_TIMEOUT = 15.0
_BATCH = 512
# The events that end a run (a rejection is not one: it may be about a cancel of the run).
_RUN_ENDINGS = frozenset({EventType.RUN_COMPLETED, EventType.RUN_CRASHED, EventType.RUN_CANCELLED})


class Outbox:
    """Ordered, bounded-intake, never-dropping queue of events to publish."""

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        spool_path: Path | None = None,
        on_pressure: Callable[[bool], None] | None = None,
        *,
        spool: Spool | None = None,
        sign: Callable[[OutgoingEvent], Mapping[str, str]] | None = None,
    ) -> None:
        self.capacity = capacity
        # Headers signing an event, added when it is published (so spooled events too).
        self._sign = sign
        self._events: deque[OutgoingEvent] = deque()
        self._wakeup = anyio.Event()
        self._empty = anyio.Event()
        self._empty.set()
        self._on_pressure = on_pressure
        self._pressure = False
        self._spool = spool or (Spool(spool_path) if spool_path else None)
        self.published = 0
        # How many events at the head are on the wire, awaiting their confirmation.
        self._in_flight = 0
        # The channel the outbox's task waits on for events to publish; None while it
        # publishes, or without a session. Only then may `send_now` publish.
        self._idle_on: object | None = None
        # A batch `send_now` put on the wire: its confirmations, for the outbox's task.
        self._sent: list[asyncio.Future[object]] | None = None
        if self._spool:
            for event in self._spool.load():
                self._events.append(event)
            if self._events:
                log.info("events restored from the outbox spool", count=len(self._events))
                self._spool.rewrite(self._events)
                self._empty = anyio.Event()
                self._wakeup.set()

    def __len__(self) -> int:
        return len(self._events)

    @property
    def under_pressure(self) -> bool:
        """True while the outbox is too deep for the worker to take new runs."""
        return self._pressure

    def put(self, event: OutgoingEvent) -> None:
        """Queue `event` for publishing; never blocks, never drops."""
        self._events.append(event)
        if self._spool:
            self._spool.append(event)
        if self._empty.is_set():
            self._empty = anyio.Event()
        self._wakeup.set()
        self._check_pressure()

    def pending_terminal(self, run_id: str) -> OutgoingEvent | None:
        """The run's terminal event if the broker has not confirmed it yet."""
        for event in reversed(self._events):
            if event.run_id == run_id and event.type in _RUN_ENDINGS:
                return event
        return None

    def replace_unconfirmed(self, run_id: str, event: OutgoingEvent, *, drop: bool = False) -> bool:
        """Put `event` in the place of the run's unconfirmed terminal event, or with
        `drop` remove that event instead.

        Used when peers may have reported the run crashed with this worker: the run
        must end as they report it. An event already on the wire is replaced, never
        dropped (the batch awaiting confirmation must not shift). False if the run
        has no unconfirmed terminal event.
        """
        for index in range(len(self._events) - 1, -1, -1):
            pending = self._events[index]
            if pending.run_id != run_id or pending.type not in _RUN_ENDINGS:
                continue
            if drop and index >= self._in_flight:
                del self._events[index]
            else:
                self._events[index] = event
            if self._spool:
                self._spool.rewrite(self._events)
            if not self._events:
                self._empty.set()
            return True
        return False

    def _check_pressure(self) -> None:
        depth = len(self._events)
        pressure = depth >= self.capacity if not self._pressure else depth > self.capacity * 0.8
        if pressure != self._pressure:
            self._pressure = pressure
            log.warning("outbox full: not taking new runs" if pressure else "outbox drained")
            if self._on_pressure:
                self._on_pressure(pressure)

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def send_now(self) -> bool:
        """Publish the queued events now, in the caller's loop turn, if the outbox's task
        is idle on a channel that batches (nothing on the wire unconfirmed): that saves
        the task's turn and, when nothing is queued ahead of them, the turn of the
        connection's writer (`confirmed_batch.publish_now`). The task then awaits their
        confirmation as if it had published them. False if left to the task, as on any
        error: it never raises.
        """
        channel = self._idle_on
        if channel is None or self._in_flight or not self._events:
            return False
        batch = list(islice(self._events, _BATCH))
        try:
            sent = confirmed_batch.publish_now(channel, self._messages(batch))
        except Exception as exc:
            # Not the caller's failure (a run's start): the outbox's task publishes them,
            # and a failure it meets ends the session as any other.
            log.warning("events not sent at once; left to the outbox's task", error=str(exc))
            return False
        if sent is None:
            return False
        self._in_flight, self._sent, self._idle_on = len(batch), sent, None
        self._wakeup.set()
        return True

    async def publish_forever(self, channel: object) -> None:
        """Publish queued events on `channel` (confirm mode) until it fails or we are cancelled."""
        batched = confirmed_batch.supports(channel)
        # For the whole connection: what its channels queue in one loop turn (acks, event
        # batches, heartbeats) then goes out in one socket write.
        confirmed_batch.coalesce_writes(channel)
        self._in_flight, self._sent = 0, None
        try:
            while True:
                if not self._events and self._sent is None:
                    self._idle_on = channel if batched else None
                    await self._wakeup.wait()
                    self._wakeup = anyio.Event()
                    continue
                await self._publish_head(channel, batched)
        finally:
            self._idle_on, self._sent, self._in_flight = None, None, 0

    async def _publish_head(self, channel: object, batched: bool) -> None:
        """Publish the events at the head (or await those `send_now` published); drop
        those confirmed, raise the first failure."""
        self._idle_on = None
        sent, self._sent = self._sent, None
        batch = list(islice(self._events, self._in_flight if sent is not None else _BATCH))
        self._in_flight = len(batch)
        try:
            if sent is not None:
                results = await self._confirmed(sent)
            elif batched:
                results = await self._publish_batch(channel, batch)
            else:
                results = await asyncio.gather(
                    *(self._publish(channel, event) for event in batch),
                    return_exceptions=True)
        finally:
            self._in_flight = 0
        confirmed = 0
        for result in results:
            if isinstance(result, BaseException):
                break
            confirmed += 1
        for _ in range(confirmed):
            self._events.popleft()
        self.published += confirmed
        if self._spool:
            self._spool.confirmed(confirmed, self._events)
        if not self._events:
            self._empty.set()
        self._check_pressure()
        if confirmed < len(batch):
            failure = results[confirmed]
            assert isinstance(failure, BaseException)
            raise failure

    async def _publish_batch(self, channel: object,
                             batch: list[OutgoingEvent]) -> list[object | BaseException]:
        """The batch in one socket write; each event's confirmation or why it has none."""
        return await self._confirmed(
            await confirmed_batch.publish(channel, self._messages(batch)))

    def _messages(self, batch: list[OutgoingEvent]) -> list[confirmed_batch.Message]:
        return [confirmed_batch.Message(EVENTS_EXCHANGE, event.type, event.body, CONTENT_TYPE,
                                        event.id, headers=_headers(event, self._sign))
                for event in batch]

    @staticmethod
    async def _confirmed(
            confirmations: list[asyncio.Future[object]]) -> list[object | BaseException]:
        # A confirm lost on an open channel must not stall every later event: the
        # TimeoutError ends the session and the unconfirmed events are published again.
        await asyncio.wait(confirmations, timeout=CONFIRM_TIMEOUT)
        return [_outcome(c) for c in confirmations]

    async def _publish(self, channel: object, event: OutgoingEvent) -> None:
        await channel.basic_publish(  # type: ignore[attr-defined]
            event.body,
            exchange=EVENTS_EXCHANGE,
            routing_key=event.type,
            properties=_properties(event, self._sign),
            wait=False,
            # A confirm lost on an open channel must not stall every later event:
            # the TimeoutError ends the session and the event is published again.
            timeout=CONFIRM_TIMEOUT,
        )

    def close(self) -> None:
        if self._spool:
            self._spool.close()


def _outcome(confirmation: asyncio.Future[object]) -> object | BaseException:
    if not confirmation.done():
        return TimeoutError(f"no confirmation within {CONFIRM_TIMEOUT} s")
    if confirmation.cancelled():
        return ConnectionError("the channel closed before the broker confirmed")
    return confirmation.exception() or confirmation.result()


def _headers(event: OutgoingEvent,
             sign: Callable[[OutgoingEvent], Mapping[str, str]] | None) -> dict[str, Any] | None:
    headers: dict[str, Any] = {"BCC": list(event.also_routed_to)} if event.also_routed_to else {}
    if sign is not None:
        headers.update(sign(event))
    return headers or None


def _properties(event: OutgoingEvent,
                sign: Callable[[OutgoingEvent], Mapping[str, str]] | None) -> spec.Basic.Properties:
    return spec.Basic.Properties(content_type=CONTENT_TYPE, delivery_mode=2,
                                 message_id=event.id, headers=_headers(event, sign))
