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
`ack_grace`; 250 ms while a window is wide, `mq_worker.window_width`) for a
slot to free, then the consumer is cancelled and consumed again with a smaller
window. Near full capacity (with a wide window, until a run ends) a run can stay
unacknowledged that long after its start; elsewhere it is acknowledged at once.

Acknowledgements are written once per loop turn, grouped with `multiple` where
no delivery still in hand is covered (`mq_worker.acks`). The window counts an
acknowledgement when it is decided, before it is written: until then the broker
may send fewer messages than counted, never more.

Consumer registration on a quorum queue costs a Raft round (milliseconds), so
windows are only re-sized when capacity forces it.

With several queues, the free slots are shared out by `mq_worker.priority`
(first-listed queue first) from the queues' ready counts, read on each
reconciliation and every PROBE_SECONDS while some queue has no window.

The arithmetic lives in `mq_worker.window`, which has no I/O; this module
owns the slots (an `anyio.CapacityLimiter`), the channel and the deliveries.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import aiormq
import aiormq.abc
import anyio
import anyio.abc
import structlog

from mq_worker.acks import AckWriter
from mq_worker.concurrency import TaskPool
from mq_worker.delivery import Delivery
from mq_worker.priority import PROBE_SECONDS, ReadyCounts
from mq_worker.window import Ack, Cancel, ConsumerWindow, Step, Window, WindowStatistics
from mq_worker.window_width import ACK_GROUP_WAIT, WindowWidth, ack_group

log = structlog.get_logger("mq_worker.consumer")

__all__ = ["ConsumerStatistics", "Delivery", "Handler", "RunConsumer"]


Handler = Callable[[Delivery], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class ConsumerStatistics:
    consumes: int
    cancels: int
    deferred_acks: int
    overshoot: int  # deliveries that found no free slot (given back); 0 while the invariant holds
    ack_frames: int  # basic.ack frames written; one may acknowledge several deliveries
    window: WindowStatistics


async def _nothing() -> None:
    pass


async def _raise(exc: Exception) -> None:  # in aiormq's task for the delivery
    raise exc


class RunConsumer:
    """Consumes `queues` with prefetch windows that never exceed the free slots of `limit`."""

    def __init__(
        self,
        *,
        limit: int,
        window: int,
        wide_window: int | None = None,
        ack_grace: float,
        handle: Handler,
        spawn: anyio.abc.TaskGroup,
        redeclare: Callable[[aiormq.abc.AbstractChannel, str], Awaitable[None]] | None = None,
    ) -> None:
        self._slots = anyio.CapacityLimiter(limit)
        self._width = WindowWidth(window, wide_window or window)  # wide while runs are short
        self._window: Window[Delivery] = Window(
            self._slots, max_window=(width := self._width.width),
            ack_group=ack_group(width, limit), group_wait=ACK_GROUP_WAIT)
        self._ack_grace = ack_grace
        # Each delivery is handled in a task of `spawn`, reused from delivery to delivery.
        self._handlers = TaskPool(spawn, handle, keep=limit)
        self._redeclare = redeclare
        self._paused: set[str] = set()
        self._paused_queues: set[str] = set()
        self._wakeup = anyio.Event()
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._queues: list[str] = []
        self._unsettled: set[Delivery] = set()
        self._acks = AckWriter(self._unsettled)
        self._needs_declare: set[str] = set()
        self._tags = itertools.count(1)
        self.consuming = anyio.Event()
        self._idle = anyio.Event()
        self._counts = {"consumes": 0, "cancels": 0, "deferred_acks": 0, "overshoot": 0}
        self._counts_read = ReadyCounts()  # runs ready per queue, for queue priority

    # -- slots -----------------------------------------------------------------

    @property
    def limit(self) -> int:
        return int(self._slots.total_tokens)

    @property
    def slots_in_use(self) -> int:
        """Slots held by deliveries: runs being handled, held or running."""
        return self._slots.borrowed_tokens

    @property
    def free_slots(self) -> int:
        return int(self._slots.available_tokens)

    def statistics(self) -> ConsumerStatistics:
        return ConsumerStatistics(**self._counts, ack_frames=self._acks.frames,
                                  window=self._window.statistics())

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
        return self._window.active_consumers()

    def wake(self) -> None:
        self._wakeup.set()

    async def idle(self) -> None:
        """Wait until no consumer is registered (after a pause, or without a connection)."""
        while self.active_consumers and self._channel is not None:
            self._idle = anyio.Event()
            await self._idle.wait()

    def end_handlers(self) -> None:
        """No more deliveries come (the worker stops serving): the handler tasks waiting for
        one end, so that the task group they belong to can end; busy ones end after theirs."""
        self._handlers.close()

    def unsettled(self) -> list[Delivery]:
        return list(self._unsettled)

    async def run(self, channel: aiormq.abc.AbstractChannel, queues: list[str]) -> None:
        """Consume on `channel` until cancelled; on exit every unsettled delivery is lost."""
        self._channel = channel
        self._queues = list(queues)
        self._window.clear()
        channel.on_consumer_cancel_callbacks.add(self._on_server_cancel)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._acks.write_forever, channel)
                while True:
                    await self._reconcile()
                    timeout = math.inf
                    if (deadline := self._window.next_deadline()) is not None:
                        timeout = max(0.0, deadline - time.monotonic())
                    if self._should_probe():
                        timeout = min(timeout, PROBE_SECONDS)
                    if timeout == math.inf:  # a cancel scope costs ~10 µs, once per run
                        await self._wakeup.wait()
                    else:
                        with anyio.move_on_after(timeout):
                            await self._wakeup.wait()
                    self._wakeup = anyio.Event()
        finally:
            self._channel = None
            self._window.clear()
            self.consuming = anyio.Event()
            self._idle.set()
            for delivery in self._unsettled:
                delivery.lost.set()
            self._unsettled.clear()
            self._acks.lose_all()

    # -- reconciling the windows with the free slots ---------------------------

    async def _reconcile(self) -> None:
        channel = self._channel
        if channel is None or channel.is_closed:
            return
        serving = self._serving()
        stopped = bool(self._paused)
        free = self._window.free_slots()
        ready = None
        if not stopped and len(serving) > 1 and free > 0:
            ready = [await self._ready_count(channel, queue) for queue in serving]
        await self._carry_out(self._window.reconcile(
            now=time.monotonic(), stopped=stopped, serving=serving,
            paused_queues=self._paused_queues, ready=ready, free=free,
        ))
        if stopped or not serving:
            self._idle.set()
        elif self.active_consumers:
            self.consuming.set()

    def _serving(self) -> list[str]:
        return [q for q in self._queues if q not in self._paused_queues]

    async def _carry_out(self, steps: Iterator[Step[Delivery]]) -> None:
        for step in steps:
            if isinstance(step, Ack):
                if self._usable(step.delivery):
                    await self._ack(step.delivery)
            elif isinstance(step, Cancel):
                if step.overdue and self._width.acknowledgement_overdue():
                    self._resize()  # before the steps that open the next window
                await self._cancel(step.consumer)
            else:
                await self._consume(step.queue, step.prefetch)

    async def _ready_count(self, channel: aiormq.abc.AbstractChannel, queue: str) -> int:
        declared = await channel.queue_declare(queue, passive=True)
        return self._counts_read.read(
            queue, int(declared.message_count or 0), int(declared.consumer_count or 0),
            consuming=self._window.active_on(queue) is not None, now=time.monotonic())

    def _should_probe(self) -> bool:
        return not self._paused and self._window.should_probe(self._serving())

    async def _consume(self, queue: str, prefetch: int) -> None:
        channel = self._channel
        assert channel is not None
        if queue in self._needs_declare and self._redeclare is not None:
            await self._redeclare(channel, queue)
            self._needs_declare.discard(queue)
        tag = f"mq_worker.{next(self._tags)}"
        # Counted before the broker hears of it, so concurrent decisions see the window.
        consumer = self._window.opened(queue, tag, prefetch)
        await channel.basic_qos(prefetch_count=prefetch)
        await channel.basic_consume(
            queue, lambda message: self._on_message(message, consumer), consumer_tag=tag
        )
        self._counts["consumes"] += 1

    async def _cancel(self, consumer: ConsumerWindow) -> None:
        if self._channel is None:
            return
        if consumer.tag in getattr(self._channel, "consumers", {}):
            # aiormq writes the cancel a turn later: a settlement decided meanwhile may reach
            # the broker first, which the window counts (`Window.acknowledged`).
            self._window.cancelling(consumer)
            await self._channel.basic_cancel(consumer.tag)
            self._counts["cancels"] += 1
        self._window.retire(consumer)

    def _on_server_cancel(self, frame: Any) -> None:
        consumer = self._window.consumer(frame.consumer_tag)
        if consumer is None:
            return
        log.warning("the broker cancelled our consumer; declaring the queue and consuming again",
                    queue=consumer.queue)
        self._window.retire(consumer)
        self._needs_declare.add(consumer.queue)
        self.wake()

    # -- deliveries ------------------------------------------------------------

    def _on_message(
        self, message: aiormq.abc.DeliveredMessage, consumer: ConsumerWindow
    ) -> Coroutine[Any, Any, None]:
        """Take `message` as soon as the client hands it over, before anything it returns
        runs: its slot is taken and its handler started before this returns."""
        try:
            return self._take(message, consumer)
        except Exception as exc:  # raised in aiormq's task for it, not in its channel's reader
            return _raise(exc)

    def _take(
        self, message: aiormq.abc.DeliveredMessage, consumer: ConsumerWindow
    ) -> Coroutine[Any, Any, None]:
        if message.channel is not self._channel or message.channel.is_closed:
            # Its channel closed before this callback ran (a lost connection, a broker
            # node going down): the broker has taken the message back and delivers it
            # again, here or to a peer. Running it now could start the run twice.
            log.info("delivery on a closed channel ignored; the broker delivers it again",
                     queue=consumer.queue)
            return _nothing()
        delivery = Delivery(self, message, consumer.queue)
        self._window.delivered(consumer)
        try:
            self._slots.acquire_on_behalf_of_nowait(delivery)
        except anyio.WouldBlock:
            # Cannot happen while the invariant holds; give it back rather than hoard it.
            # It never reaches the handler, so its slot is never released.
            self._counts["overshoot"] += 1
            log.warning("delivery beyond capacity given back", queue=consumer.queue)
            return self.settle(delivery, requeue=True)
        self._unsettled.add(delivery)
        self._handlers.start_soon(delivery)
        return _nothing()

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

    async def ack_started(self, delivery: Delivery) -> None:
        """Acknowledge `delivery`, whose run has started: now, or once a slot frees."""
        if not self._usable(delivery):
            return
        if self._window.may_ack_new(delivery.consumer_tag, held=delivery.held):
            await self._ack(delivery)
        else:
            consumer = self._window.consumer(delivery.consumer_tag)
            prefetch = consumer.prefetch if consumer is not None else 0
            deadline = time.monotonic() + self._width.ack_grace(self._ack_grace, prefetch)
            self._window.defer_ack(delivery, delivery.consumer_tag, deadline, held=delivery.held)
            self._counts["deferred_acks"] += 1
            self.wake()

    async def _ack(self, delivery: Delivery) -> None:
        self._finish(delivery)
        self._acks.ack(delivery)

    async def settle(self, delivery: Delivery, *, requeue: bool, failed: bool = False) -> None:
        """Acknowledge or give back `delivery`, whose run will not run here; its slot is the
        delivery's to release (`Delivery.settle` does both)."""
        if not self._usable(delivery):
            return
        self._window.drop_deferred(delivery)
        if not requeue:
            await self._ack(delivery)
            return
        self._finish(delivery)
        await self._acks.give_back(delivery, failed=failed)

    def on_hold(self, delivery: Delivery) -> None:
        """`delivery` waits for its start time: open a window beside it."""
        if self._window.consumer(delivery.consumer_tag) is not None:
            self._window.held(delivery.consumer_tag)
            self.wake()

    def _finish(self, delivery: Delivery) -> None:
        delivery.settled = True
        self._unsettled.discard(delivery)
        self._window.acknowledged(delivery.consumer_tag, was_held=delivery.held)

    def release_slot(self, delivery: Delivery) -> None:
        """The slot of `delivery` is free again (its run ended, or it was settled)."""
        self._slots.release_on_behalf_of(delivery)
        started = delivery.started_at
        if started is not None and self._width.run_ended(time.monotonic() - started):
            self._resize()
        self.wake()

    def _resize(self) -> None:
        width = self._width.width
        log.info("consumer window re-sized", window=width)
        self._window.resize(width, ack_group(width, self.limit))

