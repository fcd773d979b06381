"""Subscribing to lifecycle events: an async iterator of typed events."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Self
from uuid import UUID

import aiormq.abc
import aiormq.exceptions
import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from pydantic import ValidationError

from mq_worker import topology
from mq_worker.broker import DEFAULT_URL, Link, TlsOptions, delivery_tag, split_urls, wait_closing
from mq_worker.errors import BrokerError
from mq_worker.events import TERMINAL_TYPES, Event

log = structlog.get_logger("mq_worker.subscriber")


class EventSubscriber:
    """Receives events from `mq_worker.events`, filtered by type and run.

        async with EventSubscriber(types=[EventType.RUN_COMPLETED]) as events:
            async for event in events:
                print(event.subject, event.data["status_code"])

    By default the subscription is a private queue that exists while the
    subscriber is connected. Give `queue` a name for a durable subscription
    that keeps events while the subscriber is away (delete it when done).
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        types: Iterable[str] | None = None,
        run_id: UUID | str | None = None,
        queue: str | None = None,
        name: str = "mq_worker subscriber",
        tls: TlsOptions | None = None,
        prefetch: int = 500,
    ) -> None:
        self._link = Link(split_urls(url), name=name, tls=tls, publisher_confirms=False)
        self._types = [str(t) for t in types] if types else ["#"]
        self._run_id = str(run_id) if run_id else None
        self._queue_name = queue
        self._prefetch = prefetch
        self._deliveries, self._received = _delivery_stream()
        self._channel: aiormq.abc.AbstractChannel | None = None

    async def __aenter__(self) -> Self:
        try:
            await self._subscribe()
        except aiormq.exceptions.AMQPError as exc:
            await self.close()
            raise BrokerError(f"cannot subscribe: {exc}") from None
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._link.close()
        self._deliveries.close()
        self._received.close()

    async def _subscribe(self) -> None:
        channel = await self._link.channel()
        await channel.exchange_declare(
            topology.EVENTS_EXCHANGE, exchange_type="topic", durable=True
        )
        if self._queue_name:
            arguments = topology.quorum_arguments(dead_letter=False)
            await channel.queue_declare(self._queue_name, durable=True, arguments=arguments)
            name = self._queue_name
        else:
            declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
            assert declared is not None and declared.queue
            name = declared.queue
        for routing_key in self._types:
            await channel.queue_bind(name, topology.EVENTS_EXCHANGE, routing_key=routing_key)
        await channel.basic_qos(prefetch_count=self._prefetch)
        await channel.basic_consume(name, self._deliveries.send)
        self._channel = channel

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        while True:
            message = await self._next_message()
            await message.channel.basic_ack(delivery_tag(message), wait=False)
            try:
                event = Event.from_body(message.body)
            except ValidationError as exc:
                log.warning("not a CloudEvent; skipped", error=str(exc).splitlines()[0])
                continue
            if self._run_id is None or event.subject == self._run_id:
                return event

    async def _next_message(self) -> aiormq.abc.DeliveredMessage:
        while True:
            channel = self._channel
            if channel is None or channel.is_closed:
                await self._reconnect()
                continue
            message: aiormq.abc.DeliveredMessage | None = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_when_closing, channel, tg.cancel_scope)
                message = await self._received.receive()
                tg.cancel_scope.cancel()
            if message is not None:
                return message

    async def _reconnect(self) -> None:
        log.warning("event subscription lost; subscribing again")
        # What the lost channel delivered can no longer be acknowledged: start afresh.
        self._deliveries.close()
        self._received.close()
        self._deliveries, self._received = _delivery_stream()
        await self._link.reset()
        while True:
            try:
                await self._subscribe()
                return
            except (BrokerError, aiormq.exceptions.AMQPError, ConnectionError, OSError) as exc:
                log.warning("cannot subscribe yet", error=str(exc))
                await anyio.sleep(1)

    async def wait_for(
        self, run_id: UUID | str, *, types: Iterable[str] | None = None, timeout: float = 60
    ) -> Event:
        """The next event of `run_id` with one of `types` (default: terminal ones)."""
        wanted = {str(t) for t in types} if types else set(TERMINAL_TYPES)
        with anyio.fail_after(timeout):
            async for event in self:
                if event.subject == str(run_id) and event.type in wanted:
                    return event
        raise RuntimeError("unreachable")


def _delivery_stream() -> tuple[MemoryObjectSendStream[aiormq.abc.DeliveredMessage],
                                MemoryObjectReceiveStream[aiormq.abc.DeliveredMessage]]:
    # Unbounded: the channel's prefetch is what bounds it.
    return anyio.create_memory_object_stream[aiormq.abc.DeliveredMessage](math.inf)


async def _cancel_when_closing(channel: aiormq.abc.AbstractChannel,
                               scope: anyio.CancelScope) -> None:
    await wait_closing(channel)
    scope.cancel()
