"""Raw AMQP, as an outside client: publishing runs and cancels, and watching events.

Plain aio-pika and the names of the wire contract (docs/protocol.md), typed here again on
purpose: never mq_worker's own publisher or subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import aio_pika
import aio_pika.abc
import aiormq.abc
import orjson

from benchmarks._probe import run_body
from benchmarks._workers import WorkerProcess

# The wire contract (docs/protocol.md).
RUNS_EXCHANGE = "mq_worker.runs"
EVENTS_EXCHANGE = "mq_worker.events"
SCHEDULED_KEY = "run.scheduled.default.default"
CANCEL_KEY = "run.cancel.default"
WORKER_STARTED = "mq_worker.worker.started"
RUN_PENDING = "mq_worker.run.pending"
RUN_SUBMITTED = "mq_worker.run.submitted"
RUN_COMPLETED = "mq_worker.run.completed"
RUN_CRASHED = "mq_worker.run.crashed"
RUN_CANCELLED = "mq_worker.run.cancelled"
RUN_REJECTED = "mq_worker.run.rejected"
FAILURES = (RUN_CRASHED, RUN_REJECTED)


class Publisher:
    """Publishes runs and cancels with plain aio-pika: persistent, mandatory, confirmed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    async def __aenter__(self) -> Self:
        self._connection = await aio_pika.connect_robust(self.url)
        channel = await self._connection.channel(publisher_confirms=True)
        self._exchange = await channel.declare_exchange(
            RUNS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def publish(self, body: bytes, routing_key: str = SCHEDULED_KEY) -> float:
        """Publish and wait for the broker's confirm; return the time just before publishing."""
        assert self._exchange is not None
        message = aio_pika.Message(
            body, content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        sent = time.time()
        await self._exchange.publish(message, routing_key=routing_key, mandatory=True)
        return sent

    async def publish_run(self, run_id: str, command: str, **variables: Any) -> float:
        return await self.publish(run_body(run_id, command, **variables))

    async def cancel(self, run_id: str, reason: str = "benchmark") -> float:
        body = orjson.dumps({"id": run_id, "reason": reason})
        return await self.publish(body, CANCEL_KEY)

    async def publish_many(self, bodies: Iterable[bytes], outstanding: int = 256) -> list[float]:
        """Publish as fast as confirms allow, with up to `outstanding` unconfirmed at once."""
        gate = asyncio.Semaphore(outstanding)

        async def one(body: bytes) -> float:
            try:
                return await self.publish(body)
            finally:
                gate.release()

        tasks = []
        for body in bodies:
            await gate.acquire()
            tasks.append(asyncio.ensure_future(one(body)))
        return list(await asyncio.gather(*tasks))


@dataclass(slots=True)
class Seen:
    """An event as the watcher received it."""

    type: str
    subject: str | None
    received: float  # time.time() when it reached the watcher
    produced: float  # the event's own `time`
    data: dict[str, Any]


class EventWatch:
    """A private queue bound to `mq_worker.events` for `types`; records every event's arrival."""

    def __init__(self, url: str, types: Sequence[str]) -> None:
        self.url = url
        self.types = list(types)
        self.events: dict[str, dict[str, Seen]] = defaultdict(dict)
        self.counts: dict[str, int] = defaultdict(int)
        self._waiters: dict[tuple[str, str], asyncio.Future[Seen]] = {}
        self._count_waiters: list[tuple[str, int, asyncio.Event]] = []
        self.on_event: Callable[[Seen], None] | None = None
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def __aenter__(self) -> Self:
        self._connection = await aio_pika.connect(self.url)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=0)
        exchange = await channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        for event_type in self.types:
            await queue.bind(exchange, routing_key=event_type)
        await queue.consume(self._on_message, no_ack=True)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        received = time.time()
        event = orjson.loads(message.body)
        produced = datetime.fromisoformat(event["time"]).timestamp()
        seen = Seen(event["type"], event.get("subject"), received, produced,
                    event.get("data") or {})
        subject = seen.subject or ""
        self.events[seen.type][subject] = seen
        self.counts[seen.type] += 1
        waiter = self._waiters.pop((seen.type, subject), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(seen)
        for event_type, count, done in self._count_waiters:
            if event_type == seen.type and self.counts[event_type] >= count:
                done.set()
        if self.on_event is not None:
            self.on_event(seen)

    async def wait_for(self, event_type: str, subject: str, timeout: float = 30.0) -> Seen:
        seen = self.events[event_type].get(subject)
        if seen is not None:
            return seen
        future: asyncio.Future[Seen] = asyncio.get_running_loop().create_future()
        self._waiters[(event_type, subject)] = future
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise TimeoutError(f"no {event_type} for {subject} within {timeout} s") from None

    async def wait_count(self, event_type: str, count: int, timeout: float,
                         check: Callable[[], None] | None = None) -> None:
        """Wait until `count` events of `event_type` have arrived; `check` runs every second."""
        done = asyncio.Event()
        entry = (event_type, count, done)
        self._count_waiters.append(entry)
        deadline = time.monotonic() + timeout
        try:
            while self.counts[event_type] < count:
                if time.monotonic() > deadline:
                    failures = {t: self.counts[t] for t in FAILURES if self.counts[t]}
                    raise TimeoutError(
                        f"{self.counts[event_type]}/{count} {event_type} after {timeout} s"
                        + (f"; failures: {failures}" if failures else "")
                    )
                if check is not None:
                    check()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 1.0)
        finally:
            self._count_waiters.remove(entry)


async def wait_workers_started(watch: EventWatch, names: Iterable[str],
                               started: Sequence[WorkerProcess] = (),
                               timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for name in names:
        while name not in watch.events[WORKER_STARTED]:
            for worker in started:
                worker.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {name} did not start within {timeout} s")
            await asyncio.sleep(0.05)


def new_id() -> str:
    return str(uuid.uuid4())


async def publish_cancel_window(channel: aiormq.abc.AbstractChannel, count: int) -> float:
    """Declare the cancel stream and publish `count` cancels of pool `default` into it, the
    last one confirmed; the seconds that took."""
    from mq_worker.topology import QueueOptions, declare_cancel_stream, declare_exchanges

    await declare_exchanges(channel)
    await declare_cancel_stream(channel, QueueOptions())
    began = time.monotonic()
    for index in range(count):
        await channel.basic_publish(orjson.dumps({"id": new_id()}), exchange=RUNS_EXCHANGE,
                                    routing_key="run.cancel.default", wait=index == count - 1)
    return time.monotonic() - began
