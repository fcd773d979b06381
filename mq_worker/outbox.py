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
import contextlib
import os
from collections import deque
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import anyio
import orjson
import structlog
from pamqp import commands as spec

from mq_worker.events import CONTENT_TYPE, OutgoingEvent, extra_routing_keys
from mq_worker.topology import EVENTS_EXCHANGE

log = structlog.get_logger("mq_worker.outbox")

DEFAULT_CAPACITY = 10_000
_BATCH = 512


class Spool:
    """An append-only file of the events not yet confirmed."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab")
        self._confirmed_in_file = 0

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
        record = {
            "id": event.id,
            "type": event.type,
            "run_id": event.run_id,
            "event": orjson.Fragment(event.body),
        }
        self._file.write(orjson.dumps(record) + b"\n")
        self._file.flush()

    def confirmed(self, count: int, pending: deque[OutgoingEvent]) -> None:
        self._confirmed_in_file += count
        if not pending:
            self._file.truncate(0)
            self._confirmed_in_file = 0
        elif self._confirmed_in_file > 10_000 and self._confirmed_in_file > len(pending):
            self.rewrite(pending)

    def rewrite(self, pending: deque[OutgoingEvent]) -> None:
        self._file.close()
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("wb") as file:
            for event in pending:
                file.write(
                    orjson.dumps(
                        {
                            "id": event.id,
                            "type": event.type,
                            "run_id": event.run_id,
                            "event": orjson.Fragment(event.body),
                        }
                    )
                    + b"\n"
                )
        os.replace(tmp, self.path)
        self._file = self.path.open("ab")
        self._confirmed_in_file = 0

    def close(self) -> None:
        self._file.close()


class Outbox:
    """Ordered, bounded-intake, never-dropping queue of events to publish."""

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        spool_path: Path | None = None,
        on_pressure: Callable[[bool], None] | None = None,
    ) -> None:
        self.capacity = capacity
        self._events: deque[OutgoingEvent] = deque()
        self._wakeup = anyio.Event()
        self._empty = anyio.Event()
        self._empty.set()
        self._on_pressure = on_pressure
        self._pressure = False
        self._spool = Spool(spool_path) if spool_path else None
        self.published = 0
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

    async def publish_forever(self, channel: object) -> None:
        """Publish queued events on `channel` (confirm mode) until it fails or we are cancelled."""
        while True:
            if not self._events:
                await self._wakeup.wait()
                self._wakeup = anyio.Event()
                continue
            batch = list(islice(self._events, _BATCH))
            results = await asyncio.gather(
                *(self._publish(channel, event) for event in batch), return_exceptions=True
            )
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

    @staticmethod
    async def _publish(channel: object, event: OutgoingEvent) -> None:
        properties = spec.Basic.Properties(
            content_type=CONTENT_TYPE,
            delivery_mode=2,
            message_id=event.id,
            headers={"BCC": list(event.also_routed_to)} if event.also_routed_to else None,
        )
        await channel.basic_publish(  # type: ignore[attr-defined]
            event.body,
            exchange=EVENTS_EXCHANGE,
            routing_key=event.type,
            properties=properties,
            wait=False,
        )

    def close(self) -> None:
        if self._spool:
            with contextlib.suppress(OSError):
                self._spool.close()
