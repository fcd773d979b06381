"""Pings: `mq-worker status` asking the workers for a heartbeat now, answered at a bounded rate.

Each worker binds a private queue to `mq_worker.ping` (routing keys `ping`, to
all pools, and `ping.<pool>`) and, for `mq-worker status` of earlier
versions, to `mq_worker.worker.ping` on the events exchange. Idle, the queue
costs nothing; a ping costs one delivery per worker it reaches. However many
pings arrive, a worker answers at most one per `min_interval`: a flood of pings
must not turn into a flood of heartbeats that fills the outbox and stops intake.
"""

from __future__ import annotations

from collections.abc import Callable

import aiormq.abc
import anyio
import anyio.abc
import structlog

from mq_worker.topology import (
    EVENTS_EXCHANGE,
    LEGACY_PING_ROUTING_KEY,
    PING_EXCHANGE,
    ping_queue_arguments,
    ping_routing_key,
)

log = structlog.get_logger("mq_worker.pings")

DEFAULT_MIN_INTERVAL = 1.0


class PingAnswerer:
    """Answers the pings to one pool's workers, at most one per `min_interval` seconds."""

    def __init__(self, pool: str, answer: Callable[[], None],
                 min_interval: float = DEFAULT_MIN_INTERVAL) -> None:
        self.pool = pool
        self.min_interval = min_interval
        self.received = 0
        self.answered = 0
        self._answer = answer
        self._wanted = anyio.Event()

    async def run(
        self,
        channel: aiormq.abc.AbstractChannel,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        declared = await channel.queue_declare(
            "", exclusive=True, auto_delete=True, arguments=ping_queue_arguments()
        )
        assert declared is not None and declared.queue
        queue = declared.queue
        for routing_key in (ping_routing_key(None), ping_routing_key(self.pool)):
            await channel.queue_bind(queue, PING_EXCHANGE, routing_key=routing_key)
        await channel.queue_bind(queue, EVENTS_EXCHANGE, routing_key=LEGACY_PING_ROUTING_KEY)
        await channel.basic_consume(queue, self._on_ping, no_ack=True)
        task_status.started()
        while True:
            await self._wanted.wait()
            self._wanted = anyio.Event()
            self.answered += 1
            self._answer()
            # Pings arriving meanwhile are folded into one answer after the pause.
            await anyio.sleep(self.min_interval)

    async def _on_ping(self, message: aiormq.abc.DeliveredMessage) -> None:
        # The body is not read: a ping carries nothing to act on.
        self.received += 1
        self._wanted.set()
