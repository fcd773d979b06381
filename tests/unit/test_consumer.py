"""The run consumer against a stand-in channel: what happens when the client hands it a
delivery (aiormq calls the consumer's callback, then runs what it returns in a task)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiormq.abc
import anyio
import pytest
from pamqp import commands as spec
from pamqp.header import ContentHeader

from mq_worker.consumer import Delivery, RunConsumer
from tests.helpers import wait_until

pytestmark = pytest.mark.anyio


class StandInChannel:
    """What the consumer uses of an aiormq channel; keeps the consumers' callbacks."""

    is_closed = False

    def __init__(self) -> None:
        self.on_consumer_cancel_callbacks: set[Callable[..., Any]] = set()
        self.consumers: dict[str, Callable[[aiormq.abc.DeliveredMessage], Any]] = {}
        self.acks: list[int] = []

    async def basic_qos(self, prefetch_count: int) -> None:
        pass

    async def basic_consume(self, queue: str, callback: Callable[..., Any], *,
                            consumer_tag: str) -> None:
        self.consumers[consumer_tag] = callback

    async def basic_cancel(self, consumer_tag: str) -> None:
        self.consumers.pop(consumer_tag, None)

    async def basic_ack(self, delivery_tag: int, multiple: bool = False,
                        wait: bool = True) -> None:
        self.acks.append(delivery_tag)


def delivered(channel: StandInChannel, tag: str, delivery_tag: int) -> Any:
    return aiormq.abc.DeliveredMessage(
        delivery=spec.Basic.Deliver(consumer_tag=tag, delivery_tag=delivery_tag,
                                    exchange="mq_worker.runs", routing_key="run.scheduled.p.q"),
        header=ContentHeader(properties=spec.Basic.Properties()), body=b"{}",
        channel=channel)  # type: ignore[arg-type]


async def test_a_delivery_takes_its_slot_and_starts_its_handler_when_handed_over() -> None:
    """No loop turn between the client handing a delivery over and its handler's task:
    the callback takes the slot and starts the handler before it returns."""
    handled: list[int] = []
    done = anyio.Event()

    async def handle(delivery: Delivery) -> None:
        handled.append(delivery.delivery_tag)
        await delivery.ack_started()
        done.set()

    channel = StandInChannel()
    async with anyio.create_task_group() as tg:
        consumer = RunConsumer(limit=2, window=2, ack_grace=1.0, handle=handle, spawn=tg)
        tg.start_soon(consumer.run, channel, ["q"])
        await wait_until(lambda: channel.consumers)
        [(tag, callback)] = channel.consumers.items()
        returned = callback(delivered(channel, tag, 1))
        assert consumer.slots_in_use == 1 and handled == []
        await returned  # what aiormq's task for the delivery runs: nothing left to do
        await done.wait()
        assert handled == [1]
        await wait_until(lambda: channel.acks == [1])
        tg.cancel_scope.cancel()


class ClosedTaskGroup:
    """A task group that has ended: it starts no task."""

    def start_soon(self, *_: Any, **__: Any) -> None:
        raise RuntimeError("This task group is not active; no new tasks can be started.")


async def test_a_delivery_that_cannot_be_taken_fails_in_its_own_task_not_in_the_reader() -> None:
    """aiormq calls the callback from its channel's reader: an error there would end the
    channel. It is raised where it was before, in the task aiormq runs for the delivery."""

    async def handle(delivery: Delivery) -> None:
        raise AssertionError("never started")

    channel = StandInChannel()
    async with anyio.create_task_group() as tg:
        consumer = RunConsumer(limit=2, window=2, ack_grace=1.0, handle=handle,
                               spawn=ClosedTaskGroup())  # type: ignore[arg-type]
        tg.start_soon(consumer.run, channel, ["q"])
        await wait_until(lambda: channel.consumers)
        [(tag, callback)] = channel.consumers.items()
        returned = callback(delivered(channel, tag, 1))
        with pytest.raises(RuntimeError, match="not active"):
            await returned
        tg.cancel_scope.cancel()


class SlowCancelChannel(StandInChannel):
    """Two queues with runs ready; cancel-ok comes only when the test says so (what the
    broker pushed before it saw the cancel still arrives meanwhile)."""

    def __init__(self, ready: dict[str, int]) -> None:
        super().__init__()
        self.ready = ready
        self.queue_of: dict[str, str] = {}
        self.cancelling: list[str] = []
        self.callbacks: dict[str, Callable[..., Any]] = {}
        self.cancel_ok = anyio.Event()

    async def queue_declare(self, queue: str, passive: bool) -> spec.Queue.DeclareOk:
        return spec.Queue.DeclareOk(queue, message_count=self.ready[queue], consumer_count=0)

    async def basic_consume(self, queue: str, callback: Callable[..., Any], *,
                            consumer_tag: str) -> None:
        await super().basic_consume(queue, callback, consumer_tag=consumer_tag)
        self.queue_of[consumer_tag] = queue
        self.callbacks[consumer_tag] = callback  # kept after the cancel: late deliveries

    async def push(self, consumer_tag: str, delivery_tag: int) -> None:
        """Hand a delivery over as aiormq does: the callback, then what it returns."""
        await self.callbacks[consumer_tag](delivered(self, consumer_tag, delivery_tag))

    async def basic_cancel(self, consumer_tag: str) -> None:
        self.cancelling.append(consumer_tag)
        await self.cancel_ok.wait()
        await super().basic_cancel(consumer_tag)


async def test_a_consumer_being_cancelled_counts_what_the_broker_may_still_push_on_it() -> None:
    """Until cancel-ok, runs the broker pushed on a cancelled consumer still arrive: an
    acknowledgement decided meanwhile must not hand their room to another window."""
    start_first = anyio.Event()
    first_started = anyio.Event()

    async def handle(delivery: Delivery) -> None:
        if delivery.delivery_tag == 1:
            await start_first.wait()
            await delivery.ack_started()
            first_started.set()
        await anyio.sleep_forever()  # every run goes on, holding its slot

    channel = SlowCancelChannel({"a": 2, "b": 2})
    async with anyio.create_task_group() as tg:
        consumer = RunConsumer(limit=4, window=2, ack_grace=60.0, handle=handle, spawn=tg)
        tg.start_soon(consumer.run, channel, ["a", "b"])
        await wait_until(lambda: sorted(channel.queue_of.values()) == ["a", "b"])
        on = {queue: tag for tag, queue in channel.queue_of.items()}
        await channel.push(on["a"], 1)
        consumer.pause_queues({"b"})
        await wait_until(lambda: channel.cancelling == [on["b"]])
        start_first.set()
        await first_started.wait()
        # b's window was open for 2 when the cancel went: both arrive before cancel-ok.
        await channel.push(on["b"], 2)
        await channel.push(on["b"], 3)
        # The first run's acknowledgement is decided: deferred, or written.
        await wait_until(lambda: consumer.statistics().deferred_acks + len(channel.acks) == 1)
        # The broker pushes on a as far as a's window, as the acknowledgements written
        # so far reopened it.
        for tag in range(4, 4 + 2 - (1 - len(channel.acks))):
            await channel.push(on["a"], tag)
        assert consumer.statistics().overshoot == 0
        assert consumer.slots_in_use <= 4
        channel.cancel_ok.set()
        tg.cancel_scope.cancel()


async def test_a_run_held_for_its_start_time_counts_its_length_from_its_start() -> None:
    """A run held before it starts, then ending at once, is a short run towards widening
    the window: its length runs from its process's start, not from its delivery."""
    lengths: list[float] = []
    ended = anyio.Event()

    async def handle(delivery: Delivery) -> None:
        delivery.received_at -= 30.0  # delivered half a minute before its start time
        await delivery.ack_started()
        delivery.release_slot()  # the run ended at once
        ended.set()

    channel = StandInChannel()
    async with anyio.create_task_group() as tg:
        consumer = RunConsumer(limit=4, window=2, wide_window=4, ack_grace=1.0,
                               handle=handle, spawn=tg)
        run_ended = consumer._width.run_ended

        def recording(seconds: float) -> bool:
            lengths.append(seconds)
            return run_ended(seconds)

        consumer._width.run_ended = recording  # type: ignore[method-assign]
        tg.start_soon(consumer.run, channel, ["q"])
        await wait_until(lambda: channel.consumers)
        [(tag, callback)] = channel.consumers.items()
        await callback(delivered(channel, tag, 1))
        await ended.wait()
        assert len(lengths) == 1 and lengths[0] < 5.0
        tg.cancel_scope.cancel()
