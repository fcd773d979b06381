"""Electing a pool's lost-worker reporter with a token nobody needs to watch.

The election queue `mq_worker.monitor-<pool>` is a quorum queue with a single
active consumer; every worker of the pool consumes it, and each puts one small
token message in it when it connects. Only the active consumer receives
tokens: it keeps the newest unacknowledged (receiving one is how it learns it
is elected) and acknowledges the others, so the queue holds one token however
many workers come and go. When the elected worker dies, the broker gives its
unacknowledged token back to the queue and to the next consumer, which is then
elected at once. Idle, the election costs one delivery per refresh: the
elected worker replaces its token every `refresh_seconds`, well inside the
queue's message TTL and the broker's consumer timeout.
"""

from __future__ import annotations

import aiormq.abc
import anyio
import anyio.abc
import structlog
from pamqp import commands as spec

from mq_worker.broker import delivery_tag
from mq_worker.topology import ELECTION_TOKEN_HEADER, monitor_queue_name

log = structlog.get_logger("mq_worker.election")

DEFAULT_REFRESH_SECONDS = 60.0
_CONFIRM_TIMEOUT = 15.0


class ReporterElection:
    """This worker's part in electing its pool's reporter of lost workers."""

    def __init__(self, pool: str, me: str,
                 refresh_seconds: float = DEFAULT_REFRESH_SECONDS) -> None:
        self.queue = monitor_queue_name(pool)
        self.me = me
        self.refresh_seconds = refresh_seconds
        self.won = anyio.Event()
        self._held: tuple[aiormq.abc.AbstractChannel, int] | None = None

    @property
    def elected(self) -> bool:
        return self.won.is_set()

    async def run(
        self,
        channel: aiormq.abc.AbstractChannel,
        publisher: aiormq.abc.AbstractChannel,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Take part until cancelled (the channel's end gives the token back)."""
        await channel.basic_consume(self.queue, self._on_token)
        await self._put_token(publisher)
        task_status.started()
        await self.won.wait()
        log.info("elected to report lost workers", queue=self.queue)
        while True:
            await anyio.sleep(self.refresh_seconds)
            await self._put_token(publisher)

    async def _put_token(self, publisher: aiormq.abc.AbstractChannel) -> None:
        await publisher.basic_publish(
            b"", exchange="", routing_key=self.queue,
            properties=spec.Basic.Properties(headers={ELECTION_TOKEN_HEADER: self.me}),
            timeout=_CONFIRM_TIMEOUT,
        )

    async def _on_token(self, message: aiormq.abc.DeliveredMessage) -> None:
        # Any message counts: queues of earlier versions hold heartbeats instead.
        previous = self._held
        self._held = (message.channel, delivery_tag(message))
        if previous is not None:
            channel, tag = previous
            await channel.basic_ack(tag, wait=False)
        self.won.set()
