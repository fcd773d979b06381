"""The run consumer: deliveries from the work queues, never more than the free slots.

A worker must not sit on runs it cannot start while a peer is idle, yet it
acknowledges a run as soon as its process has started (runs may outlive
RabbitMQ's consumer timeout), and every acknowledgement lets the broker send
one more message. The consumer therefore keeps one invariant:

    slots in use + messages the broker may still send us  <=  limit

where "messages the broker may still send" is, summed over our active
consumers, their prefetch minus their unacknowledged deliveries. A delivery
takes a slot and uses one unit of its consumer's window, so it keeps the
invariant. Settling a message whose run will not run here (rejected, parked,
cancelled, given back) frees a slot and reopens a window: it keeps it too.
Acknowledging a *started* run reopens a window without freeing a slot; when
that would break the invariant the acknowledgement waits (at most
`ack_grace` seconds) for a slot to free, and after that the consumer is
cancelled, which closes its window, and consumed again with a smaller one.
Near full capacity a run can therefore stay unacknowledged up to `ack_grace`
seconds after its start; everywhere else it is acknowledged at once.

Consumer registration on a quorum queue costs a Raft round (milliseconds), so
windows are only re-sized when capacity forces it.

With several queues, the free slots are shared out by `mq_worker.priority`
(first-listed queue first) from the queues' ready counts, read on each
reconciliation and every PROBE_SECONDS while some queue has no window.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiormq
import aiormq.abc
import anyio
import anyio.abc
import structlog

from mq_worker.priority import PROBE_SECONDS, allocate_windows

log = structlog.get_logger("mq_worker.consumer")


@dataclass(eq=False)
class _Consumer:
    queue: str
    tag: str
    prefetch: int
    unacked: int = 0
    held: int = 0
    active: bool = True
    since: float = field(default_factory=time.monotonic)

    @property
    def window(self) -> int:
        return self.prefetch - self.unacked if self.active else 0


class Delivery:
    """A run message delivered to this worker, with the slot it holds."""

    __slots__ = (
        "_consumer",
        "_deadline",
        "_held",
        "_slot_held",
        "body",
        "channel",
        "consumer_tag",
        "delivery_tag",
        "headers",
        "lost",
        "properties",
        "queue",
        "received_at",
        "redelivered",
        "routing_key",
        "settled",
    )

    def __init__(
        self, consumer: RunConsumer, message: aiormq.abc.DeliveredMessage, queue: str
    ) -> None:
        delivery: Any = message.delivery
        self._consumer = consumer
        self.channel = message.channel
        self.consumer_tag: str = delivery.consumer_tag
        self.delivery_tag: int = delivery.delivery_tag
        self.redelivered: bool = bool(delivery.redelivered)
        self.routing_key: str = delivery.routing_key
        self.queue = queue
        self.body: bytes = message.body
        self.properties = message.header.properties
        self.headers: dict[str, Any] = dict(self.properties.headers or {})
        self.received_at = time.monotonic()
        self.settled = False
        self.lost = anyio.Event()
        self._slot_held = True
        self._held = False
        self._deadline = 0.0

    @property
    def delivery_count(self) -> int:
        """Earlier deliveries of this message, as counted by a quorum queue."""
        value = self.headers.get("x-delivery-count", 0)
        return value if isinstance(value, int) else 0

    def hold(self) -> None:
        """Say this message will stay unacknowledged a while (its run waits for its start
        time), so that it does not keep the window closed for runs that could start now."""
        if not self._held and not self.settled:
            self._held = True
            self._consumer._on_hold(self)

    async def ack_started(self) -> None:
        """Acknowledge a run whose process has started; it keeps its slot."""
        await self._consumer._ack_started(self)

    async def settle(self, *, requeue: bool = False, failed: bool = False) -> None:
        """Acknowledge (or give back) a message whose run will not run here; free its slot.

        A message given back because handling it failed (`failed`) counts towards
        its queue's delivery limit; one given back for any other reason does not
        (on brokers that tell the two apart: RabbitMQ 4.3 and later).
        """
        await self._consumer._settle(self, requeue=requeue, failed=failed)
        self.release_slot()

    def release_slot(self) -> None:
        """Free the slot of a run that has ended."""
        if self._slot_held:
            self._slot_held = False
            self._consumer._release_slot(self)


Handler = Callable[[Delivery], Coroutine[Any, Any, None]]


class RunConsumer:
    """Consumes `queues` with prefetch windows that never exceed the free slots of `limit`."""

    def __init__(
        self,
        *,
        limit: int,
        window: int,
        ack_grace: float,
        handle: Handler,
        spawn: anyio.abc.TaskGroup,
        redeclare: Callable[[aiormq.abc.AbstractChannel, str], Awaitable[None]] | None = None,
    ) -> None:
        self._limiter = anyio.CapacityLimiter(limit)
        self._max_window = max(1, window)
        self._ack_grace = ack_grace
        self._handle = handle
        self._spawn = spawn
        self._redeclare = redeclare
        self._paused: set[str] = set()
        self._paused_queues: set[str] = set()
        self._wakeup = anyio.Event()
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._queues: list[str] = []
        self._consumers: dict[str, _Consumer] = {}
        self._deferred: list[Delivery] = []
        self._unsettled: set[Delivery] = set()
        self._needs_declare: set[str] = set()
        self._tags = itertools.count(1)
        self.consuming = anyio.Event()
        self._idle = anyio.Event()
        self.stats = {"consumes": 0, "cancels": 0, "deferred_acks": 0, "overshoot": 0}

    # -- slots -----------------------------------------------------------------

    @property
    def limit(self) -> int:
        return int(self._limiter.total_tokens)

    @property
    def slots_in_use(self) -> int:
        """Slots held by deliveries: runs being handled, held or running."""
        return self._limiter.borrowed_tokens

    @property
    def free_slots(self) -> int:
        return int(self._limiter.available_tokens)

    # -- control ---------------------------------------------------------------

    def pause(self, reason: str) -> None:
        """Stop taking runs until `resume(reason)`; held runs are unaffected."""
        if reason not in self._paused:
            self._paused.add(reason)
            self.wake()

    def resume(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            self.wake()

    def pause_queues(self, queues: set[str]) -> None:
        """Take no runs from `queues` (work queue names) until they are left out again."""
        if queues != self._paused_queues:
            self._paused_queues = set(queues)
            self.wake()

    @property
    def paused(self) -> frozenset[str]:
        return frozenset(self._paused)

    @property
    def active_consumers(self) -> int:
        return sum(1 for c in self._consumers.values() if c.active)

    def wake(self) -> None:
        self._wakeup.set()

    async def idle(self) -> None:
        """Wait until no consumer is registered (after a pause, or without a connection)."""
        while self.active_consumers and self._channel is not None:
            self._idle = anyio.Event()
            await self._idle.wait()

    def unsettled(self) -> list[Delivery]:
        return list(self._unsettled)

    async def run(self, channel: aiormq.abc.AbstractChannel, queues: list[str]) -> None:
        """Consume on `channel` until cancelled; on exit every unsettled delivery is lost."""
        self._channel = channel
        self._queues = list(queues)
        self._consumers.clear()
        channel.on_consumer_cancel_callbacks.add(self._on_server_cancel)
        try:
            while True:
                await self._reconcile()
                timeout = math.inf
                if self._deferred:
                    timeout = max(0.0, min(d._deadline for d in self._deferred) - time.monotonic())
                if self._should_probe():
                    timeout = min(timeout, PROBE_SECONDS)
                with anyio.move_on_after(timeout):
                    await self._wakeup.wait()
                self._wakeup = anyio.Event()
        finally:
            self._channel = None
            self._consumers.clear()
            self._deferred.clear()
            self.consuming = anyio.Event()
            self._idle.set()
            for delivery in list(self._unsettled):
                delivery.lost.set()
            self._unsettled.clear()

    # -- the window ------------------------------------------------------------

    def _outstanding(self) -> int:
        return sum(c.window for c in self._consumers.values())

    def _room(self) -> int:
        return int(self._limiter.total_tokens) - self._limiter.borrowed_tokens - self._outstanding()

    async def _reconcile(self) -> None:
        channel = self._channel
        if channel is None or channel.is_closed:
            return
        await self._flush_deferred()
        now = time.monotonic()
        overdue = {d.consumer_tag for d in self._deferred if d._deadline <= now}
        for tag in overdue:
            await self._cancel(self._consumers.get(tag))
        await self._flush_deferred()

        serving = self._serving()
        if self._paused or not serving:
            for consumer in list(self._consumers.values()):
                await self._cancel(consumer)
            self._idle.set()
            return
        for queue in self._paused_queues:
            await self._cancel(self._active_on(queue))

        if len(serving) > 1:
            await self._reconcile_by_priority(channel, serving)
        else:
            await self._reconcile_single()
        if self.active_consumers:
            self.consuming.set()

    def _serving(self) -> list[str]:
        return [q for q in self._queues if q not in self._paused_queues]

    async def _reconcile_single(self) -> None:
        queue = self._serving()[0]
        room = self._room()
        if room <= 0:
            return
        current = self._active_on(queue)
        share = self._max_window
        if current is not None:
            if current.window == 0 and current.held:
                # Its window is closed by runs waiting for their start time: retire it
                # (they stay unacknowledged on the channel) and open a new one.
                await self._cancel(current)
            elif current.prefetch >= share or room < share - current.prefetch:
                return
            else:
                await self._cancel(current)  # grow a window shrunk by a capacity crunch
            room = self._room()
            if room <= 0:
                return
        await self._consume(queue, min(share, room))

    async def _reconcile_by_priority(
        self, channel: aiormq.abc.AbstractChannel, queues: list[str]
    ) -> None:
        """Give the free slots to the first-listed queues with runs waiting (see priority)."""
        free = int(self._limiter.total_tokens) - self._limiter.borrowed_tokens
        if free <= 0:
            return
        ready = [await self._ready_count(channel, queue) for queue in queues]
        targets = allocate_windows(free, ready, self._max_window)
        for queue, target in zip(queues, targets, strict=True):
            current = self._active_on(queue)
            if current is not None and (
                target == 0 or current.window > target or (current.window == 0 and current.held)
            ):
                await self._cancel(current)
        for queue, target in zip(queues, targets, strict=True):
            if target == 0:
                continue
            current = self._active_on(queue)
            if current is not None:
                if current.window >= target:
                    continue
                await self._cancel(current)  # grow it: more runs wait than its window
            room = self._room()
            if room <= 0:
                break
            await self._consume(queue, min(target, room))

    async def _ready_count(self, channel: aiormq.abc.AbstractChannel, queue: str) -> int:
        declared = await channel.queue_declare(queue, passive=True)
        return int(declared.message_count or 0)

    def _should_probe(self) -> bool:
        """A queue nobody listens to while a window waits idle: look for runs there."""
        serving = self._serving()
        return (
            len(serving) > 1
            and not self._paused
            and self._outstanding() > 0
            and any(self._active_on(q) is None for q in serving)
        )

    def _active_on(self, queue: str) -> _Consumer | None:
        for consumer in self._consumers.values():
            if consumer.queue == queue and consumer.active:
                return consumer
        return None

    async def _consume(self, queue: str, prefetch: int) -> None:
        channel = self._channel
        assert channel is not None
        if queue in self._needs_declare and self._redeclare is not None:
            await self._redeclare(channel, queue)
            self._needs_declare.discard(queue)
        tag = f"mq_worker.{next(self._tags)}"
        # Counted before the broker hears of it, so concurrent decisions see the window.
        consumer = _Consumer(queue=queue, tag=tag, prefetch=prefetch)
        self._consumers[tag] = consumer
        await channel.basic_qos(prefetch_count=prefetch)
        await channel.basic_consume(
            queue, lambda message: self._on_message(message, consumer), consumer_tag=tag
        )
        self.stats["consumes"] += 1

    async def _cancel(self, consumer: _Consumer | None) -> None:
        if consumer is None or self._channel is None:
            return
        consumer.active = False
        if consumer.tag in getattr(self._channel, "consumers", {}):
            await self._channel.basic_cancel(consumer.tag)
            self.stats["cancels"] += 1
        if consumer.unacked == 0:
            self._consumers.pop(consumer.tag, None)

    def _on_server_cancel(self, frame: Any) -> None:
        consumer = self._consumers.get(frame.consumer_tag)
        if consumer is None:
            return
        log.warning("the broker cancelled our consumer; declaring the queue and consuming again",
                    queue=consumer.queue)
        consumer.active = False
        self._needs_declare.add(consumer.queue)
        self.wake()

    # -- deliveries ------------------------------------------------------------

    async def _on_message(self, message: aiormq.abc.DeliveredMessage, consumer: _Consumer) -> None:
        if message.channel is not self._channel or message.channel.is_closed:
            # Its channel closed before this callback ran (a lost connection, a broker
            # node going down): the broker has taken the message back and delivers it
            # again, here or to a peer. Running it now could start the run twice.
            log.info("delivery on a closed channel ignored; the broker delivers it again",
                     queue=consumer.queue)
            return
        delivery = Delivery(self, message, consumer.queue)
        consumer.unacked += 1
        try:
            self._limiter.acquire_on_behalf_of_nowait(delivery)
        except anyio.WouldBlock:
            # Cannot happen while the invariant holds; give it back rather than hoard it.
            self.stats["overshoot"] += 1
            delivery._slot_held = False
            log.warning("delivery beyond capacity given back", queue=consumer.queue)
            await self._settle(delivery, requeue=True)
            return
        self._unsettled.add(delivery)
        self._spawn.start_soon(self._handle, delivery)

    def _usable(self, delivery: Delivery) -> bool:
        channel = self._channel
        if delivery.settled:
            return False
        if channel is None or delivery.channel is not channel or channel.is_closed:
            # Delivery tags belong to their channel: the broker has requeued this message.
            delivery.settled = True
            delivery.lost.set()
            self._unsettled.discard(delivery)
            return False
        return True

    async def _ack_started(self, delivery: Delivery) -> None:
        if not self._usable(delivery):
            return
        consumer = self._consumers.get(delivery.consumer_tag)
        if consumer is None or not consumer.active or self._fits_one_more():
            await self._ack(delivery, consumer)
        else:
            delivery._deadline = time.monotonic() + self._ack_grace
            self._deferred.append(delivery)
            self.stats["deferred_acks"] += 1
            self.wake()

    def _fits_one_more(self) -> bool:
        return self._limiter.borrowed_tokens + self._outstanding() + 1 <= self._limiter.total_tokens

    async def _flush_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for delivery in deferred:
            if not self._usable(delivery):
                continue
            consumer = self._consumers.get(delivery.consumer_tag)
            if consumer is None or not consumer.active or self._fits_one_more():
                await self._ack(delivery, consumer)
            else:
                self._deferred.append(delivery)

    async def _ack(self, delivery: Delivery, consumer: _Consumer | None) -> None:
        self._finish(delivery, consumer)
        try:
            await delivery.channel.basic_ack(delivery.delivery_tag, wait=False)
        except (aiormq.exceptions.AMQPError, RuntimeError):
            delivery.lost.set()

    async def _settle(self, delivery: Delivery, *, requeue: bool, failed: bool = False) -> None:
        if not self._usable(delivery):
            return
        if delivery in self._deferred:
            self._deferred.remove(delivery)
        consumer = self._consumers.get(delivery.consumer_tag)
        self._finish(delivery, consumer)
        try:
            if requeue and failed:
                await delivery.channel.basic_reject(delivery.delivery_tag, requeue=True, wait=False)
            elif requeue:
                await delivery.channel.basic_nack(delivery.delivery_tag, requeue=True, wait=False)
            else:
                await delivery.channel.basic_ack(delivery.delivery_tag, wait=False)
        except (aiormq.exceptions.AMQPError, RuntimeError):
            delivery.lost.set()

    def _on_hold(self, delivery: Delivery) -> None:
        consumer = self._consumers.get(delivery.consumer_tag)
        if consumer is not None:
            consumer.held += 1
            self.wake()

    def _finish(self, delivery: Delivery, consumer: _Consumer | None) -> None:
        delivery.settled = True
        self._unsettled.discard(delivery)
        if consumer is not None:
            consumer.unacked -= 1
            if delivery._held:
                consumer.held -= 1
            if not consumer.active and consumer.unacked == 0:
                self._consumers.pop(consumer.tag, None)

    def _release_slot(self, delivery: Delivery) -> None:
        self._limiter.release_on_behalf_of(delivery)
        self.wake()
