"""The ledger service: records every run from the event and output streams into a database.

It consumes the durable quorum queue `mq_worker.ledger`, bound to the run
events on `mq_worker.events` and to all of `mq_worker.output`, so what is
published while the ledger is down waits for it. Messages are written in
batches, one transaction each, and acknowledged only after the commit: a
ledger killed mid-batch gets the batch again, and the idempotent writes
ignore what was already recorded. A message the ledger cannot read is logged
and dead-lettered to `mq_worker.dead`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import aiormq.abc
import aiormq.exceptions
import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from mq_worker import topology
from mq_worker.broker import TlsOptions, connect, deliver_frame
from mq_worker.errors import BrokerError
from mq_worker.ledger.records import (
    EventRow,
    InvalidLedgerMessage,
    OutputRow,
    WriteResult,
    parse_event,
    parse_output,
)
from mq_worker.ledger.store import DEFAULT_MAX_OUTPUT_BYTES, AsyncLedgerStore, redact

log = structlog.get_logger("mq_worker.ledger")



@dataclass(frozen=True)
class LedgerOptions:
    urls: Sequence[str]
    db: str
    keep_days: float = 30.0  # 0: keep everything
    prune_interval_seconds: float = 3600.0
    batch_size: int = 500
    batch_seconds: float = 0.05
    prefetch: int = 2000
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    tls: TlsOptions | None = None
    name: str = "mq_worker ledger"


@dataclass(frozen=True)
class LedgerStats:
    messages: int = 0
    events: int = 0
    duplicates: int = 0
    output_batches: int = 0
    invalid: int = 0
    transactions: int = 0
    pruned_runs: int = 0


class LedgerService:
    """`mq-worker ledger`: serve until `stop()`."""

    def __init__(self, options: LedgerOptions) -> None:
        self.options = options
        self.stats = LedgerStats()
        self.ready = anyio.Event()
        self._stop = anyio.Event()
        self._store: AsyncLedgerStore | None = None

    def stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        store = self._store = await self._open_store()
        version = await store.migrate()
        log.info("ledger database ready", db=redact(self.options.db), schema_version=version)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._sessions_forever)
                if self.options.keep_days > 0:
                    tg.start_soon(self._prune_forever)
                await self._stop.wait()
                tg.cancel_scope.cancel()
        finally:
            if self._store is not None:
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await self._store.close()

    async def _open_store(self) -> AsyncLedgerStore:
        return await AsyncLedgerStore.open(self.options.db,
                                           max_output_bytes=self.options.max_output_bytes)

    async def _sessions_forever(self) -> None:
        index, backoff = 0, 0.2
        while True:
            try:
                connection, index = await connect(self.options.urls, name=self.options.name,
                                                  tls=self.options.tls, start=index)
            except BrokerError as exc:
                log.warning("broker unreachable; retrying", error=str(exc), retry_in=backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            began = time.monotonic()
            try:
                await self._serve_session(connection)
            except* (aiormq.exceptions.AMQPError, ConnectionError, OSError) as group:
                log.warning("connection lost; reconnecting",
                            error="; ".join(str(e) for e in group.exceptions))
            finally:
                self.ready = anyio.Event() if self.ready.is_set() else self.ready
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await connection.close()
            index += 1
            if time.monotonic() - began < 10:
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                backoff = 0.2

    async def _serve_session(self, connection: Any) -> None:
        wrapper = await connection.channel(publisher_confirms=False)
        channel: aiormq.abc.AbstractChannel = await wrapper.get_underlay_channel()
        await declare_ledger_queue(channel)
        await channel.basic_qos(prefetch_count=self.options.prefetch)
        # Unbounded: the prefetch bounds what the broker delivers before acknowledgements.
        deliveries, messages = anyio.create_memory_object_stream[aiormq.abc.DeliveredMessage](
            math.inf)
        with deliveries, messages:
            await channel.basic_consume(topology.LEDGER_QUEUE, deliveries.send)
            log.info("recording runs", queue=topology.LEDGER_QUEUE)
            self.ready.set()
            async with anyio.create_task_group() as tg:
                async def _watch(closed: Any) -> None:
                    await closed
                    raise ConnectionError("the broker closed the connection or the channel")

                tg.start_soon(_watch, connection.closed())
                tg.start_soon(_watch, wrapper.closed())
                while True:
                    batch = await self._next_batch(messages)
                    await self._record(channel, batch)

    async def _next_batch(
        self, messages: MemoryObjectReceiveStream[aiormq.abc.DeliveredMessage]
    ) -> list[aiormq.abc.DeliveredMessage]:
        batch = [await messages.receive()]
        with anyio.move_on_after(self.options.batch_seconds):
            while len(batch) < self.options.batch_size:
                batch.append(await messages.receive())
        while len(batch) < self.options.batch_size:
            try:
                batch.append(messages.receive_nowait())
            except anyio.WouldBlock:
                break
        return batch

    async def _record(self, channel: aiormq.abc.AbstractChannel,
                      batch: list[aiormq.abc.DeliveredMessage]) -> None:
        rows: list[EventRow | OutputRow] = []
        invalid = 0
        last_valid: int | None = None
        for message in batch:
            frame = deliver_frame(message)
            tag = frame.delivery_tag
            assert tag is not None
            try:
                if frame.exchange == topology.OUTPUT_EXCHANGE:
                    rows.append(parse_output(message.body))
                else:
                    rows.append(parse_event(message.body))
                last_valid = tag
            except InvalidLedgerMessage as exc:
                invalid += 1
                log.warning("message not recorded; dead-lettered", reason=str(exc),
                            exchange=frame.exchange, routing_key=frame.routing_key)
                await channel.basic_reject(tag, requeue=False)
        result = await self._write(rows) if rows else WriteResult()
        if last_valid is not None:  # settles the batch: its invalid ones are already rejected
            await channel.basic_ack(last_valid, multiple=True)
        s = self.stats
        self.stats = replace(
            s, messages=s.messages + len(batch), events=s.events + result.events,
            duplicates=s.duplicates + result.duplicates,
            output_batches=s.output_batches + result.output_batches,
            invalid=s.invalid + invalid, transactions=s.transactions + 1)

    async def _write(self, rows: list[EventRow | OutputRow]) -> WriteResult:
        """Write until it is committed: a database that is away is waited for, not skipped."""
        backoff = 0.2
        while True:
            try:
                if self._store is None:
                    self._store = await self._open_store()
                return await self._store.write(rows)
            except Exception as exc:
                log.warning("cannot write to the ledger database; retrying",
                            db=redact(self.options.db), error=str(exc), retry_in=backoff)
                store, self._store = self._store, None
                if store is not None:
                    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                        await store.close()
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _prune_forever(self) -> None:
        while True:
            cutoff = time.time() - self.options.keep_days * 86400
            try:
                pruned = await self._store.prune(cutoff) if self._store is not None else 0
            except Exception as exc:
                log.warning("pruning failed; trying again later", error=str(exc))
            else:
                if pruned:
                    log.info("pruned old runs", runs=pruned, keep_days=self.options.keep_days)
                self.stats = replace(self.stats, pruned_runs=self.stats.pruned_runs + pruned)
            await anyio.sleep(self.options.prune_interval_seconds)


async def declare_ledger_queue(channel: aiormq.abc.AbstractChannel) -> None:
    """The ledger's durable quorum queue with its bindings (and what they need)."""
    await topology.declare_exchanges(channel)
    await topology.declare_output_exchange(channel)
    await topology.declare_dead_queue(channel)
    await topology.declare_queue(channel, topology.LEDGER_QUEUE,
                                  topology.quorum_arguments(dead_letter=True))
    await channel.queue_bind(topology.LEDGER_QUEUE, topology.EVENTS_EXCHANGE,
                             routing_key=topology.RUN_EVENTS_BINDING)
    await channel.queue_bind(topology.LEDGER_QUEUE, topology.OUTPUT_EXCHANGE,
                             routing_key=topology.ALL_OUTPUT_BINDING)
