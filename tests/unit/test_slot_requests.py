"""How a worker counts the runs waiting for a shared limit (no broker).

RabbitMQ 3.10 answers a passive declare of a quorum queue with the count of the queue's
leader as the broker last recorded it, and with 0 when that leader cannot answer within
250 ms (a node being lost, a leader just moved): a 0 that is no count at all. A run that
believed it would take a free slot ahead of the runs waiting, possibly the slot of a run
whose worker is reconnecting. Such an answer cannot be produced on purpose on a broker,
so the broker's two answers are given here by a channel that answers like it.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import aiormq.abc
import pytest
from pamqp import commands as spec

from mq_worker.slot_requests import SlotRequests
from mq_worker.topology import waiting_queue_name

TARGET = "key:db"


class WaitingQueueChannel:
    """A channel to a waiting queue holding `runs` runs, whose passive declare answers
    `declared` (what the broker counted, or 0 when it could not ask the leader)."""

    def __init__(self, runs: int, declared: int) -> None:
        self.runs = runs
        self.declared = declared
        self.gets = 0
        self.given_back: list[int] = []

    async def queue_declare(self, name: str, passive: bool) -> spec.Queue.DeclareOk:
        assert name == waiting_queue_name(TARGET) and passive
        return spec.Queue.DeclareOk(name, message_count=self.declared, consumer_count=0)

    async def basic_get(self, queue: str, no_ack: bool) -> Any:
        assert queue == waiting_queue_name(TARGET) and not no_ack
        self.gets += 1
        if not self.runs:
            return SimpleNamespace(delivery=spec.Basic.GetEmpty())
        return SimpleNamespace(delivery=spec.Basic.GetOk(
            delivery_tag=self.gets, redelivered=False, exchange="", routing_key=queue,
            message_count=self.runs - 1))

    async def basic_nack(self, delivery_tag: int, requeue: bool, wait: bool = True) -> None:
        assert requeue
        self.given_back.append(delivery_tag)


async def count(channel: WaitingQueueChannel) -> int | None:
    return await SlotRequests.waiting(cast(aiormq.abc.AbstractChannel, channel), TARGET)


@pytest.mark.anyio
async def test_a_count_of_zero_from_the_declare_is_checked_with_the_queue_leader() -> None:
    channel = WaitingQueueChannel(runs=2, declared=0)  # the leader could not be asked
    assert await count(channel) == 2
    assert channel.given_back == [1]  # the run looked at is given back, not taken


@pytest.mark.anyio
async def test_an_empty_waiting_queue_counts_zero() -> None:
    channel = WaitingQueueChannel(runs=0, declared=0)
    assert await count(channel) == 0
    assert channel.given_back == []


@pytest.mark.anyio
async def test_a_count_above_zero_is_taken_as_the_declare_gives_it() -> None:
    # A count from a follower that has not yet applied a wake can only be too high:
    # the run then waits (safe); no get is paid for it.
    channel = WaitingQueueChannel(runs=3, declared=3)
    assert await count(channel) == 3
    assert channel.gets == 0


@pytest.mark.anyio
async def test_a_zero_is_taken_as_it_comes_where_the_caller_needs_no_more() -> None:
    # A run taking this worker's spare, or a run that ended and wakes others: a get there
    # would be a Raft round on the path of every run while nobody waits.
    channel = WaitingQueueChannel(runs=2, declared=0)
    assert await SlotRequests.waiting(cast(aiormq.abc.AbstractChannel, channel), TARGET,
                                      confirm_none=False) == 0
    assert channel.gets == 0
