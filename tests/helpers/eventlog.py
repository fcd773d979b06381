"""Every event published in a vhost, as a subscriber receives them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import anyio

from mq_worker.events import Event
from mq_worker.topology import EVENTS_EXCHANGE


@dataclass
class EventLog:
    """Every event published in a vhost, as subscribers receive them."""

    events: list[Event] = field(default_factory=list)
    raw: list[aio_pika.abc.AbstractIncomingMessage] = field(default_factory=list)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    def _add(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.raw.append(message)
        self.events.append(Event.from_body(message.body))
        self._changed.set()
        self._changed = anyio.Event()

    def of(self, run_id: Any) -> list[Event]:
        return [e for e in self.events if e.subject == str(run_id)]

    def types(self, run_id: Any) -> list[str]:
        return [e.type.removeprefix("mq_worker.") for e in self.of(run_id)]

    def terminal(self, run_id: Any) -> list[Event]:
        return [e for e in self.of(run_id) if e.is_terminal]

    async def wait_for(self, predicate: Callable[[list[Event]], Any], timeout: float = 15) -> Any:
        """Wait until predicate(events) is truthy; return its value."""
        with anyio.fail_after(timeout):
            while True:
                value = predicate(self.events)
                if value:
                    return value
                await self._changed.wait()

    async def wait_terminal(self, run_ids: Any, timeout: float = 15) -> None:
        ids = [str(r) for r in run_ids]
        await self.wait_for(lambda _: all(self.terminal(r) for r in ids), timeout)


def unique(events: list[Event]) -> list[Event]:
    """Events without the copies a reconnection may publish again (same id)."""
    seen: set[str] = set()
    kept = []
    for event in events:
        if event.id not in seen:
            seen.add(event.id)
            kept.append(event)
    return kept


@asynccontextmanager
async def event_log(url: str) -> AsyncIterator[EventLog]:
    log = EventLog()
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EVENTS_EXCHANGE, "topic", durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "#")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            log._add(message)

        await queue.consume(on_message, no_ack=True)
        yield log
    finally:
        with anyio.move_on_after(10, shield=True):
            await connection.close()
