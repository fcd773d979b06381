"""What the dashboard learns live from the broker: worker and run events, and run output.

One exclusive queue, bound to the worker and run events on `mq_worker.events`,
feeds the worker table and every open page. A run's output is bound only
while some page follows that run (`output.*.<run id>`), so a dashboard does
not receive the whole fleet's output. The session is re-established when the
broker goes away; pages keep their stream and see no event in between.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiormq.abc
import aiormq.exceptions
import anyio
import orjson
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from mq_worker import topology
from mq_worker.broker import Link, TlsOptions, deliver_frame, wait_closing
from mq_worker.errors import BrokerError
from mq_worker.events import Event, EventType
from mq_worker.status import WorkerTable, send_ping

log = structlog.get_logger("mq_worker.dashboard")

BINDINGS = (topology.RUN_EVENTS_BINDING, EventType.WORKER_STARTED, EventType.WORKER_HEARTBEAT,
            EventType.WORKER_STOPPED, EventType.WORKER_LOST)
# A page that cannot keep up loses its stream (and reconnects) instead of growing memory.
SUBSCRIBER_BACKLOG = 2000
WORKERS_INTERVAL = 0.25


@dataclass(eq=False)
class Subscription:
    """One open page's stream: run and worker events, and the output of `run_id` if set."""

    run_id: str | None = None
    overflowed: bool = False
    _sent: MemoryObjectSendStream[dict[str, Any]] = field(init=False, repr=False)
    _received: MemoryObjectReceiveStream[dict[str, Any]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._sent, self._received = anyio.create_memory_object_stream[dict[str, Any]](
            SUBSCRIBER_BACKLOG)

    def offer(self, message: dict[str, Any]) -> None:
        try:
            self._sent.send_nowait(message)
        except anyio.WouldBlock:
            self.overflowed = True

    async def next(self) -> dict[str, Any]:
        """The next message for the page, waiting for it."""
        return await self._received.receive()

    def close(self) -> None:
        self._sent.close()
        self._received.close()


@dataclass
class WorkerExtras:
    version: str | None = None
    type: str | None = None
    in_flight: set[str] = field(default_factory=set)


class LiveFeed:
    """The dashboard's live view of the fleet, shared by every page."""

    def __init__(self, urls: Sequence[str], *, tls: TlsOptions | None = None) -> None:
        self.urls = list(urls)
        self.tls = tls
        self.workers = WorkerTable()
        self.extras: dict[str, WorkerExtras] = {}
        self.connected = False
        self.ready = anyio.Event()
        self._subscriptions: set[Subscription] = set()
        self._followed: Counter[str] = Counter()
        self._link = Link(self.urls, name="mq_worker dashboard", tls=tls,
                          publisher_confirms=False)
        self._queue: str | None = None
        self._workers_changed = anyio.Event()

    # -- pages -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def subscribe(self, run_id: str | None = None) -> AsyncIterator[Subscription]:
        """A stream for one page; with `run_id`, that run's output is bound while it is open."""
        subscription = Subscription(run_id)
        self._subscriptions.add(subscription)
        try:
            if run_id is not None:
                self._followed[run_id] += 1
                if self._followed[run_id] == 1:
                    await self._bind_output(run_id)
            yield subscription
        finally:
            self._subscriptions.discard(subscription)
            subscription.close()
            if run_id is not None:
                self._followed[run_id] -= 1
                if self._followed[run_id] <= 0:
                    del self._followed[run_id]
                    with anyio.CancelScope(shield=True):
                        await self._unbind_output(run_id)

    def worker_rows(self, now: float | None = None) -> list[dict[str, Any]]:
        """Every worker seen, with what the overview shows."""
        now = time.time() if now is None else now
        self.workers.check(now)
        rows = []
        for status in self.workers.rows():
            extras = self.extras.get(status.name, WorkerExtras())
            in_flight = extras.in_flight | set(status.in_flight)
            rows.append({
                "name": status.name, "pool": status.pool, "queues": status.queues,
                "host": status.hostname, "state": status.state, "limit": status.limit,
                "in_flight": len(in_flight) if status.state == "live" else 0,
                "last_seen_age": None if status.last_seen is None
                else round(max(0.0, now - status.last_seen), 1),
                "heartbeat_seconds": status.heartbeat_seconds,
                "version": extras.version, "type": extras.type,
            })
        return rows

    # -- the broker session ----------------------------------------------------------

    async def serve(self) -> None:
        """Follow the broker until cancelled, reconnecting when it goes away."""
        backoff = 0.2
        while True:
            began = time.monotonic()
            try:
                await self._session()
            except* (BrokerError, aiormq.exceptions.AMQPError, ConnectionError, OSError) as group:
                log.warning("dashboard lost the broker; reconnecting", retry_in=backoff,
                            error="; ".join(str(e) for e in group.exceptions))
            finally:
                self.connected = False
                self._queue = None
                with anyio.CancelScope(shield=True):
                    await self._link.close()
            backoff = 0.2 if time.monotonic() - began > 30 else min(backoff * 2, 5.0)
            await anyio.sleep(backoff)

    async def _session(self) -> None:
        channel = await self._link.channel()
        await topology.declare_exchanges(channel)
        await topology.declare_output_exchange(channel)
        declared = await channel.queue_declare("", exclusive=True, auto_delete=True)
        assert declared is not None and declared.queue
        self._queue = declared.queue
        for key in BINDINGS:
            await channel.queue_bind(self._queue, topology.EVENTS_EXCHANGE, routing_key=key)
        for run_id in list(self._followed):
            await self._bind_output(run_id)
        await channel.basic_qos(prefetch_count=500)
        deliveries, inbox = anyio.create_memory_object_stream[aiormq.abc.DeliveredMessage](
            math.inf)
        with deliveries, inbox:
            await channel.basic_consume(self._queue, deliveries.send, no_ack=True)
            self.connected = True
            self.ready.set()
            await send_ping(self.urls, self.tls)  # every live worker answers with a heartbeat
            async with anyio.create_task_group() as tg:
                async def _watch() -> None:
                    await wait_closing(channel)
                    raise ConnectionError("the broker closed the dashboard's connection")

                tg.start_soon(_watch)
                tg.start_soon(self._send_workers)
                while True:
                    self._handle(await inbox.receive())

    async def _bind_output(self, run_id: str) -> None:
        if self._queue is None or not self.connected:
            return  # bound when the session is (re-)established
        channel = await self._link.channel()
        await channel.queue_bind(self._queue, topology.OUTPUT_EXCHANGE,
                                 routing_key=topology.run_output_binding(run_id))

    async def _unbind_output(self, run_id: str) -> None:
        if self._queue is None or not self.connected:
            return
        with contextlib.suppress(BrokerError, aiormq.exceptions.AMQPError, OSError):
            channel = await self._link.channel()
            await channel.queue_unbind(self._queue, topology.OUTPUT_EXCHANGE,
                                       routing_key=topology.run_output_binding(run_id))

    def _handle(self, message: aiormq.abc.DeliveredMessage) -> None:
        if deliver_frame(message).exchange == topology.OUTPUT_EXCHANGE:
            self._handle_output(message.body)
            return
        try:
            event = Event.from_body(message.body)
        except ValueError:
            return  # not an event of ours; the ledger dead-letters what it cannot read
        if event.type.startswith(topology.WORKER_EVENT_PREFIX):
            self._observe_worker(event)
            self._workers_changed.set()
        elif event.type.startswith(topology.RUN_EVENT_PREFIX):
            self._observe_run(event)
            summary = run_summary(event)
            for subscription in list(self._subscriptions):
                subscription.offer(summary)

    def _observe_worker(self, event: Event) -> None:
        self.workers.observe(event)
        name = event.data.get("worker")
        if not isinstance(name, str):
            return
        extras = self.extras.setdefault(name, WorkerExtras())
        if isinstance(event.data.get("version"), str):
            extras.version = event.data["version"]
        if isinstance(event.data.get("type"), str):
            extras.type = event.data["type"]
        if event.type.endswith((".heartbeat", ".started", ".stopped")):
            extras.in_flight = {str(r) for r in event.data.get("in_flight") or []}

    def _observe_run(self, event: Event) -> None:
        """Runs in flight change between heartbeats: follow them from the run events."""
        worker, run_id = event.data.get("worker"), event.subject
        if not isinstance(worker, str) or run_id is None or worker not in self.extras:
            return
        if event.is_terminal:
            self.extras[worker].in_flight.discard(run_id)
        else:
            self.extras[worker].in_flight.add(run_id)
        self._workers_changed.set()

    async def _send_workers(self) -> None:
        """The worker table to every page when it changed, at most every WORKERS_INTERVAL:
        a busy fleet changes it with every run."""
        while True:
            await self._workers_changed.wait()
            self._workers_changed = anyio.Event()
            self._broadcast({"kind": "workers", "workers": self.worker_rows()})
            await anyio.sleep(WORKERS_INTERVAL)

    def _handle_output(self, body: bytes) -> None:
        try:
            batch = orjson.loads(body)
            run_id = str(batch["run_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        message = {"kind": "output", "run_id": run_id, "batch": batch}
        for subscription in list(self._subscriptions):
            if subscription.run_id == run_id:
                subscription.offer(message)

    def _broadcast(self, message: dict[str, Any]) -> None:
        for subscription in list(self._subscriptions):
            subscription.offer(message)


def run_summary(event: Event) -> dict[str, Any]:
    """What a page needs of a run event: the run's new state and the event for its timeline."""
    data = event.data
    return {
        "kind": "run",
        "id": event.subject,
        "state": event.type.rsplit(".", 1)[-1],
        "type": event.type,
        "time": event.time.timestamp(),
        "name": data.get("run_name"),
        "pool": data.get("pool"),
        "queue": data.get("queue"),
        "worker": data.get("worker"),
        "status_code": data.get("status_code"),
        "reason": data.get("reason"),
        "event": {"id": event.id, "type": event.type, "time": event.time.isoformat(),
                  "data": data},
    }
