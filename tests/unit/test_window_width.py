"""The window's width: the whole limit while runs are short, half of it once they are not."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import pytest

from mq_worker.consumer import Delivery, RunConsumer
from mq_worker.window_width import SHORT_RUN, WIDE_GRACE, WIDEN_AFTER, WindowWidth
from tests.helpers import wait_until
from tests.unit.test_consumer import StandInChannel, delivered


def test_a_window_starts_wide_and_narrows_once_an_acknowledgement_waited_its_grace() -> None:
    width = WindowWidth(narrow=4, wide=8)
    assert (width.width, width.ack_grace(1.0, width.width)) == (8, WIDE_GRACE)
    assert width.acknowledgement_overdue()
    assert (width.width, width.ack_grace(1.0, width.width)) == (4, 1.0)
    assert width.ack_grace(1.0, 8) == WIDE_GRACE  # a consumer still that wide
    assert not width.acknowledgement_overdue()  # narrow already: nothing to re-size


def test_a_narrow_window_widens_after_short_runs_in_a_row_only() -> None:
    width = WindowWidth(narrow=4, wide=8)
    width.acknowledgement_overdue()
    short, long = SHORT_RUN / 2, SHORT_RUN * 2
    for _ in range(WIDEN_AFTER * 8 - 1):
        assert not width.run_ended(short)
    assert not width.run_ended(long)  # a long one starts the count again
    for _ in range(WIDEN_AFTER * 8 - 1):
        assert not width.run_ended(short)
    assert width.width == 4
    assert width.run_ended(short)
    assert (width.width, width.ack_grace(1.0, width.width)) == (8, WIDE_GRACE)
    assert not width.run_ended(short)  # wide already


def test_a_window_given_keeps_its_width_and_grace() -> None:
    width = WindowWidth(narrow=8, wide=8)
    assert not width.acknowledgement_overdue()
    assert (width.width, width.ack_grace(1.0, 8)) == (8, 1.0)


async def wide_consumer(channel: QosChannel, handle: Any, tg: anyio.abc.TaskGroup, *,
                        limit: int) -> tuple[RunConsumer, str, Callable[..., Any]]:
    """A consumer of `limit` serving "q" on `channel`, narrow at half the limit; its
    consumer's tag and callback once it consumes."""
    consumer = RunConsumer(limit=limit, window=limit // 2, wide_window=limit, ack_grace=60.0,
                           handle=handle, spawn=tg)
    tg.start_soon(consumer.run, channel, ["q"])
    await wait_until(lambda: channel.consumers)
    [(tag, callback)] = channel.consumers.items()
    assert channel.prefetch[tag] == limit
    return consumer, tag, callback


class QosChannel(StandInChannel):
    """Keeps the prefetch of every consumer it registers, and every acknowledgement."""

    def __init__(self) -> None:
        super().__init__()
        self.prefetch: dict[str, int] = {}
        self.multiple: list[tuple[int, bool]] = []
        self._next_prefetch = 0

    async def basic_qos(self, prefetch_count: int) -> None:
        self._next_prefetch = prefetch_count

    async def basic_consume(self, queue: str, callback: Callable[..., Any], *,
                            consumer_tag: str) -> None:
        await super().basic_consume(queue, callback, consumer_tag=consumer_tag)
        self.prefetch[consumer_tag] = self._next_prefetch

    async def basic_ack(self, delivery_tag: int, multiple: bool = False,
                        wait: bool = True) -> None:
        self.multiple.append((delivery_tag, multiple))

    def settled(self) -> set[int]:
        tags: set[int] = set()
        for tag, multiple in self.multiple:
            tags |= set(range(1, tag + 1)) if multiple else {tag}
        return tags


@pytest.mark.anyio
async def test_long_runs_that_fill_a_wide_window_are_acknowledged_and_the_window_narrows() -> None:
    """Every slot busy with runs that go on: their acknowledgements wait WIDE_GRACE, not
    the second of --ack-grace, then the consumer is cancelled (they all go) and the next
    window is the narrow one."""
    started: list[Delivery] = []

    async def handle(delivery: Delivery) -> None:
        await delivery.ack_started()
        started.append(delivery)
        await anyio.sleep_forever()

    channel = QosChannel()
    async with anyio.create_task_group() as tg:
        consumer, wide, callback = await wide_consumer(channel, handle, tg, limit=4)
        for delivery_tag in range(1, 5):
            await callback(delivered(channel, wide, delivery_tag))
        with anyio.fail_after(5):  # far less than --ack-grace
            await wait_until(lambda: channel.settled() == {1, 2, 3, 4} and not channel.consumers)
        assert consumer.unsettled() == []
        started[0].release_slot()  # a run ends: its slot goes to a narrow window
        await wait_until(lambda: bool(channel.consumers))
        [narrow] = channel.consumers
        assert channel.prefetch[narrow] == 1  # the one free slot, of a window of 2 at most
        for run in started[1:3]:
            run.release_slot()
        await wait_until(lambda: len(channel.prefetch) == 3)
        assert max(channel.prefetch[t] for t in channel.prefetch if t != wide) == 2
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_only_runs_that_started_and_ended_quickly_widen_the_window_again() -> None:
    ends = {tag: anyio.Event() for tag in (1, 2)}

    async def handle(delivery: Delivery) -> None:
        tag = delivery.delivery_tag
        if tag <= 2:  # long runs
            await delivery.ack_started()
            await ends[tag].wait()
            delivery.release_slot()
        elif tag <= 2 + WIDEN_AFTER * 2:  # handed on without running (parked, rejected)
            await delivery.settle()
        else:  # short runs
            await delivery.ack_started()
            delivery.release_slot()

    channel = QosChannel()
    async with anyio.create_task_group() as tg:
        consumer, wide, callback = await wide_consumer(channel, handle, tg, limit=2)
        for tag in (1, 2):
            await callback(delivered(channel, wide, tag))
        await wait_until(lambda: not channel.consumers)  # narrowed: its acks waited WIDE_GRACE
        for event in ends.values():
            event.set()
        await wait_until(lambda: bool(channel.consumers))
        [(narrow, callback)] = channel.consumers.items()
        assert channel.prefetch[narrow] == 1
        tags = iter(range(3, 3 + WIDEN_AFTER * 4))
        for _ in range(WIDEN_AFTER * 2):
            await callback(delivered(channel, narrow, next(tags)))
            await wait_until(lambda: consumer.slots_in_use == 0)
        assert consumer.statistics().window.max_window == 1
        for _ in range(WIDEN_AFTER * 2):
            await callback(delivered(channel, narrow, next(tags)))
            await wait_until(lambda: consumer.slots_in_use == 0)
        assert consumer.statistics().window.max_window == 2
        await wait_until(lambda: narrow not in channel.consumers and bool(channel.consumers))
        [widened] = channel.consumers
        assert channel.prefetch[widened] == 2
        tg.cancel_scope.cancel()
