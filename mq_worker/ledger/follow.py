"""Following one run's output live from `mq_worker.output`, until the run ends.

A private queue is bound to the run's output (`output.*.<run id>`) and to the
terminal run events, before the run is published or looked up, so nothing
is missed in between. Batches are printed in sequence order; the follower is
done when the run's terminal event has come and the batch marked `eof` from
the worker that ran it (or, for output that never comes, a short grace after
the terminal event).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Self
from uuid import UUID

import aiormq.abc
import anyio
import orjson

from mq_worker import topology
from mq_worker.broker import Link, TlsOptions, deliver_frame, delivery_tag
from mq_worker.events import TERMINAL_TYPES, Event
from mq_worker.ledger.records import OutputAssembler, OutputBatch, OutputLine

# How long to wait for output still on its way once the run's terminal event is in.
AFTER_END_GRACE_SECONDS = 3.0


class OutputFollower:
    """Prints (through `on_line`) one run's output as it comes, until the run ends."""

    def __init__(self, urls: Sequence[str], run_id: UUID | str,
                 on_line: Callable[[OutputLine], None], *, tls: TlsOptions | None = None) -> None:
        self.run_id = str(run_id)
        self._link = Link(list(urls), name="mq_worker output follower", tls=tls,
                          publisher_confirms=False)
        # Unbounded: the prefetch bounds what the broker delivers before acknowledgements.
        self._deliveries, self._messages = anyio.create_memory_object_stream[
            aiormq.abc.DeliveredMessage](math.inf)
        self._assembler = OutputAssembler(on_line)
        self.terminal: Event | None = None
        self._complete = anyio.Event()

    async def __aenter__(self) -> Self:
        try:
            channel = await self._link.channel()
            await topology.declare_output_exchange(channel)
            await channel.exchange_declare(topology.EVENTS_EXCHANGE, exchange_type="topic",
                                           durable=True)
            declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
            assert declared is not None and declared.queue
            name = declared.queue
            await channel.queue_bind(name, topology.OUTPUT_EXCHANGE,
                                     routing_key=topology.run_output_binding(self.run_id))
            for event_type in TERMINAL_TYPES:
                await channel.queue_bind(name, topology.EVENTS_EXCHANGE, routing_key=event_type)
            await channel.basic_qos(prefetch_count=200)
            await channel.basic_consume(name, self._deliveries.send)
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self._close()

    async def _close(self) -> None:
        await self._link.close()
        self._deliveries.close()
        self._messages.close()

    def show(self, batch: OutputBatch) -> None:
        """Print a batch (stored ones first, then live ones); one already shown is skipped."""
        self._assembler.add(batch)

    async def follow(self, on_line: Callable[[OutputLine], None] | None = None) -> Event:
        """Deliver lines until the run has ended and its output is complete; its terminal event."""
        try:
            return await self._follow(on_line)
        finally:
            self._complete.set()

    async def wait_complete(self) -> None:
        """Return once `follow` has delivered the run's whole output (or given up on it)."""
        await self._complete.wait()

    async def _follow(self, on_line: Callable[[OutputLine], None] | None) -> Event:
        if on_line is not None:
            self._assembler = OutputAssembler(on_line)
        while True:
            if self.terminal is not None:
                if str(self.terminal.data.get("worker")) in self._assembler.eof:
                    return self.terminal
                with anyio.move_on_after(AFTER_END_GRACE_SECONDS) as grace:
                    message = await self._messages.receive()
                if grace.cancelled_caught:
                    return self.terminal
            else:
                message = await self._messages.receive()
            await message.channel.basic_ack(delivery_tag(message), wait=False)
            if deliver_frame(message).exchange == topology.OUTPUT_EXCHANGE:
                try:
                    self._assembler.add(OutputBatch.from_message(orjson.loads(message.body)))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError,
                        AttributeError):
                    continue
            else:
                event = Event.from_body(message.body)
                if event.subject == self.run_id and event.is_terminal:
                    self.terminal = event


@asynccontextmanager
async def printing_output(
    urls: Sequence[str], run_id: UUID | str, on_line: Callable[[OutputLine], None], *,
    enabled: bool = True, tls: TlsOptions | None = None,
) -> AsyncIterator[OutputFollower | None]:
    """Follow a run's output in the background while the block runs (`submit --wait --logs`).

    Subscribed on entry, so output of a run published inside the block is not
    missed; on exit, waits (briefly) for the output still on its way.
    """
    if not enabled:
        yield None
        return
    async with OutputFollower(urls, run_id, on_line, tls=tls) as follower, \
            anyio.create_task_group() as tg:
        done = anyio.Event()

        async def _follow() -> None:
            await follower.follow()
            done.set()

        tg.start_soon(_follow)
        try:
            yield follower
        except BaseException:
            tg.cancel_scope.cancel()
            raise
        with anyio.move_on_after(AFTER_END_GRACE_SECONDS + 1):
            await done.wait()
        tg.cancel_scope.cancel()
