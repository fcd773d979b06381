"""Several runs of one worker giving back slot tokens at once, on the real broker.

A worker's runs share its session's slots channel, in `tx.select` mode, and give their
tokens back on it (acknowledged and published again, then committed) as they end.
RabbitMQ 3.10 closes the connection of a channel that receives any command while a
`tx.commit` on it waits for its reply (CHANNEL_ERROR "unexpected command while
processing 'tx.commit'"): every limited run of the worker would go through a
reconnection.
"""

from __future__ import annotations

from typing import Any, cast

import aiormq
import aiormq.abc
import anyio
import pytest
from pamqp import commands as spec

from mq_worker import pool_admin
from mq_worker.control import TokenMessage
from mq_worker.slot_requests import Lease, SlotRequests
from mq_worker.spares import HeldToken
from mq_worker.topology import limit_queue_name
from tests.helpers import VHost

TARGET = "key:db"
RUNS = 20
pytestmark = pytest.mark.anyio


class SlotsChannel:
    """The worker's slots channel, telling when a commit is on its way to the broker."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._channel = channel
        self.committing = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    async def tx_commit(self) -> spec.Tx.CommitOk:
        self.committing.set()
        self.committing = anyio.Event()
        return await self._channel.tx_commit()


def as_channel(slots: SlotsChannel) -> aiormq.abc.AbstractChannel:
    return cast(aiormq.abc.AbstractChannel, slots)


async def test_runs_ending_together_keep_their_worker_s_slots_channel(vhost: VHost) -> None:
    await pool_admin.set_limit([vhost.url], TARGET, RUNS)
    connection = await aiormq.connect(vhost.url)
    try:
        requests = SlotRequests(await pool_admin.read_state(await connection.channel()))
        channel = await connection.channel(publisher_confirms=False)
        await channel.tx_select()
        slots = SlotsChannel(channel)
        lease = Lease(as_channel(slots))
        for _ in range(RUNS):
            assert await requests.take(TARGET, lease)
        failed: list[str] = []

        async def run_ends(token: HeldToken) -> None:
            try:
                await SlotRequests.settle(as_channel(slots), [token])
            except Exception as exc:  # (what the run would see)
                failed.append(repr(exc))
                slots.committing.set()  # (no commit follows: the next one goes on)

        # Each run ends as the one before it commits (a worker's runs end at any time).
        async with anyio.create_task_group() as tg:
            for token in lease.tokens:
                committing = slots.committing
                tg.start_soon(run_ends, token)
                await committing.wait()
        assert failed == []
        assert not channel.is_closed
        # Every slot is back and free: a new message each, none put back as if lost.
        check = await connection.channel()
        back: list[tuple[int, bool]] = []
        while True:
            message = await check.basic_get(limit_queue_name(TARGET), no_ack=False)
            if not isinstance(message.delivery, spec.Basic.GetOk):
                break
            token = TokenMessage.model_validate_json(message.body)
            back.append((token.number, bool(message.delivery.redelivered)))
        assert sorted(back) == [(number, False) for number in range(RUNS)]
    finally:
        await connection.close()
