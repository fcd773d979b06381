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

from mq_worker.limits import ControlState, Limit
from mq_worker.slot_requests import Lease, SlotRequests
from mq_worker.slots import SlotGate
from mq_worker.spares import HeldToken
from mq_worker.topology import QUEUE_HEADER, limit_queue_name, waiting_queue_name

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
    # A run taking this worker's spare: a get there would be a Raft round on its path
    # while nobody waits, for a token no cut-off worker can be about to take back.
    channel = WaitingQueueChannel(runs=2, declared=0)
    assert await SlotRequests.waiting(cast(aiormq.abc.AbstractChannel, channel), TARGET,
                                      confirm_none=False) == 0
    assert channel.gets == 0


class Broker:
    """One worker's session as a run's end sees it: the slots channel holding its token,
    a channel of the gate's own on the same connection (the waiting queue's, whose
    passive declare answers `declared`), and the confirmed channel it publishes on."""

    def __init__(self, runs: int, declared: int) -> None:
        self.connection = SimpleNamespace(channel=self._channel)
        # A token is given back acknowledged and published again, in a transaction.
        self.slots = SimpleNamespace(connection=self.connection, is_closed=False,
                                     basic_ack=self._give_back, basic_publish=self._republish,
                                     tx_commit=self._commit)
        self.publish = SimpleNamespace(basic_publish=self._publish)
        self.waiting = WaitingQueueChannel(runs=runs, declared=declared)
        self.waiting_channel = SimpleNamespace(
            connection=self.connection, is_closed=False,
            queue_declare=self._declare, basic_get=self._get,
            basic_ack=self._ack)
        self.given_back: list[int] = []  # tokens
        self.republished: list[str] = []  # their limit queues
        self.commits = 0
        self.sent_back: list[str] = []  # work queues a waiting run was moved to
        self.acked = 0
        self.declares = 0

    async def _declare(self, name: str, passive: bool) -> spec.Queue.DeclareOk:
        self.declares += 1
        return await self.waiting.queue_declare(name, passive)

    async def _channel(self, publisher_confirms: bool) -> Any:
        return self.waiting_channel

    async def _give_back(self, delivery_tag: int) -> None:
        self.given_back.append(delivery_tag)

    async def _republish(self, body: bytes, *, exchange: str, routing_key: str,
                         properties: Any) -> None:
        self.republished.append(routing_key)

    async def _commit(self) -> None:
        self.commits += 1

    async def _get(self, queue: str, no_ack: bool) -> Any:
        message = await self.waiting.basic_get(queue, no_ack)
        if isinstance(message.delivery, spec.Basic.GetOk):
            self.waiting.runs -= 1
            message.body = b"{}"
            message.header = SimpleNamespace(properties=spec.Basic.Properties(
                headers={QUEUE_HEADER: "mq_worker.p.q"}))
        return message

    async def _ack(self, delivery_tag: int) -> None:
        self.acked += 1

    async def _publish(self, body: bytes, *, exchange: str, routing_key: str,
                       properties: Any, mandatory: bool) -> None:
        self.sent_back.append(routing_key)


async def a_run_ends(broker: Broker) -> None:
    gate = SlotGate(ControlState(limits={TARGET: Limit(TARGET, 1, ((0, 1, 1),))}))
    gate.bind(cast(aiormq.abc.AbstractChannel, broker.slots),
              cast(aiormq.abc.AbstractChannel, broker.publish))
    await gate.release(Lease(cast(aiormq.abc.AbstractChannel, broker.slots),
                             [HeldToken(TARGET, 7, 0, 1)], run_id="r"))
    assert (broker.given_back, broker.republished, broker.commits) == (
        [7], [limit_queue_name(TARGET)], 1)


@pytest.mark.anyio
async def test_a_run_that_ends_wakes_a_waiting_run_even_when_the_declare_answers_zero() -> None:
    broker = Broker(runs=2, declared=0)  # the leader could not be asked
    await a_run_ends(broker)
    assert broker.sent_back == ["mq_worker.p.q"]  # one slot given back: one run woken
    assert (broker.waiting.runs, broker.acked) == (1, 1)


@pytest.mark.anyio
async def test_a_run_that_ends_while_nobody_waits_asks_the_waiting_queue_once() -> None:
    broker = Broker(runs=0, declared=0)
    await a_run_ends(broker)
    assert broker.sent_back == []
    assert broker.declares + broker.waiting.gets == 1
