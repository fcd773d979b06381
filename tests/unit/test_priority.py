"""Queue priority allocation, without a broker."""

from __future__ import annotations

from typing import Any, cast

import aiormq.abc
import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands as spec

from mq_worker.consumer import Delivery, RunConsumer
from mq_worker.priority import UNANSWERED_SECONDS, ReadyCounts, allocate_windows
from tests.helpers import wait_until


def test_a_single_free_slot_goes_to_the_first_queue_with_runs_waiting() -> None:
    assert allocate_windows(1, [0, 0, 3], max_window=1) == [0, 0, 1]
    assert allocate_windows(1, [0, 2, 3], max_window=1) == [0, 1, 0]


def test_lower_queues_get_nothing_while_a_higher_one_has_uncovered_runs() -> None:
    assert allocate_windows(4, [10, 10], max_window=2) == [2, 0]
    assert allocate_windows(4, [1, 10], max_window=4) == [1, 3]


def test_idle_queues_each_listen_with_one_window_and_the_rest_goes_to_the_first() -> None:
    assert allocate_windows(4, [0, 0, 0], max_window=4) == [2, 1, 1]
    assert allocate_windows(1, [0, 0, 0], max_window=4) == [1, 0, 0]
    assert allocate_windows(0, [5, 5], max_window=4) == [0, 0]


@given(
    free=st.integers(min_value=0, max_value=50),
    ready=st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=6),
    max_window=st.integers(min_value=1, max_value=20),
)
def test_allocation_never_exceeds_the_free_slots_and_respects_priority(
    free: int, ready: list[int], max_window: int
) -> None:
    windows = allocate_windows(free, ready, max_window)
    assert sum(windows) <= free
    assert all(w <= max_window for w in windows)
    for index, waiting in enumerate(ready):
        if waiting > windows[index]:  # runs left waiting here: no lower queue is served
            assert all(w == 0 for w in windows[index + 1:])
    first_waiting = next((i for i, w in enumerate(ready) if w), None)
    if free and first_waiting is not None:
        assert windows[first_waiting] >= 1


class QueuesChannel:
    """A consumer's channel to work queues whose passive declares answer `answers[queue]`
    (ready runs, consumers): what RabbitMQ 3.10 counted, or (0, 0) when it could not ask
    a quorum queue's leader within 250 ms, which cannot be produced on purpose on a
    broker."""

    def __init__(self, answers: dict[str, tuple[int, int]]) -> None:
        self.answers = answers
        self.declares: dict[str, int] = dict.fromkeys(answers, 0)
        self.consumed: list[str] = []
        self.consumers: dict[str, str] = {}
        self.on_consumer_cancel_callbacks: set[Any] = set()
        self.is_closed = False

    async def queue_declare(self, queue: str, passive: bool) -> spec.Queue.DeclareOk:
        assert passive
        self.declares[queue] += 1
        ready, consumers = self.answers[queue]
        return spec.Queue.DeclareOk(queue, message_count=ready, consumer_count=consumers)

    async def basic_qos(self, prefetch_count: int) -> None:
        pass

    async def basic_consume(self, queue: str, callback: Any, consumer_tag: str) -> None:
        self.consumed.append(queue)
        self.consumers[consumer_tag] = queue

    async def basic_cancel(self, consumer_tag: str) -> None:
        del self.consumers[consumer_tag]


@pytest.mark.anyio
async def test_a_higher_queue_whose_count_gets_no_answer_is_not_taken_for_empty() -> None:
    """A queue this worker consumes has a consumer: a count of (0 runs, 0 consumers) for it
    is the broker's want of an answer, and must not hand its slots to a lower queue."""
    async def handle(delivery: Delivery) -> None:
        raise AssertionError("nothing is delivered here")

    channel = QueuesChannel({"high": (5, 0), "low": (5, 0)})
    async with anyio.create_task_group() as tg:
        consumer = RunConsumer(limit=2, window=2, ack_grace=1.0, handle=handle, spawn=tg)
        tg.start_soon(consumer.run, cast(aiormq.abc.AbstractChannel, channel), ["high", "low"])
        await wait_until(lambda: channel.consumed == ["high"])
        channel.answers["high"] = (0, 0)  # the leader of high could not be asked
        reads = channel.declares["high"]
        # The worker looks again twice a second while low has no window.
        await wait_until(lambda: channel.declares["high"] >= reads + 2, timeout=10)
        assert channel.consumed == ["high"]
        # A real answer that high is empty (it has its consumer) hands low the slots.
        channel.answers["high"] = (0, 1)
        await wait_until(lambda: "low" in channel.consumed, timeout=10)
        tg.cancel_scope.cancel()


def test_a_count_without_an_answer_stands_for_the_last_answer_for_a_few_seconds_only() -> None:
    counts = ReadyCounts()
    assert counts.read("high", 5, 1, consuming=True, now=0.0) == 5
    assert counts.read("high", 0, 0, consuming=True, now=1.0) == 5  # no answer
    assert allocate_windows(2, [5, 5], max_window=2) == [2, 0]
    # A leader out of reach for longer delivers nothing either: the lower queues go on.
    assert counts.read("high", 0, 0, consuming=True, now=UNANSWERED_SECONDS + 0.1) == 0
    # Other consumers, or none of this worker's: the answer is taken as it comes.
    assert counts.read("high", 0, 2, consuming=True, now=10.0) == 0
    assert counts.read("low", 3, 0, consuming=False, now=10.0) == 3
    assert counts.read("low", 0, 0, consuming=False, now=11.0) == 0
