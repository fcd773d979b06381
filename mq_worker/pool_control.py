"""A worker's side of work pool control: pauses and shared limits from the control stream."""

from __future__ import annotations

from collections.abc import Callable

import aiormq.abc
import anyio
import anyio.abc
import structlog
from prometheus_client import CollectorRegistry, Gauge

from mq_worker import topology
from mq_worker.consumer import RunConsumer
from mq_worker.control import ControlFollower
from mq_worker.limits import ControlState, pool_target, queue_target

log = structlog.get_logger("mq_worker.pool_control")


class PoolControl:
    """Follows the control stream for one worker and applies pauses to its consumer."""

    def __init__(self, pool: str, queues: list[str],
                 consumer: Callable[[], RunConsumer | None]) -> None:
        self.pool = pool
        self.queues = list(queues)
        self.state = ControlState()
        self._consumer = consumer
        self._follower = ControlFollower(self.state, self._apply)
        self._paused_gauge: Gauge | None = None

    def bind_metrics(self, registry: CollectorRegistry) -> None:
        self._paused_gauge = Gauge(
            "mq_worker_paused", "1 while an operator's pause stops intake of the target.",
            ["target"], registry=registry,
        )
        for target in (pool_target(self.pool), *(queue_target(self.pool, q) for q in self.queues)):
            self._paused_gauge.labels(target).set(0)

    async def declare(self, channel: aiormq.abc.AbstractChannel) -> None:
        await topology.declare_control_stream(channel)

    async def follow(
        self,
        channel: aiormq.abc.AbstractChannel,
        publisher: aiormq.abc.AbstractChannel,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        await self._follower.follow(channel, publisher, task_status=task_status)

    def paused_targets(self) -> list[str]:
        """The pauses that stop this worker's intake, as `pool:...` / `queue:.../...`."""
        mine = {pool_target(self.pool), *(queue_target(self.pool, q) for q in self.queues)}
        return sorted(self.state.paused & mine)

    def paused_queues(self) -> set[str]:
        return self.state.paused_queues(self.pool, self.queues)

    def _apply(self) -> None:
        if self._paused_gauge is not None:
            paused = set(self.paused_targets())
            for target in (pool_target(self.pool),
                           *(queue_target(self.pool, q) for q in self.queues)):
                self._paused_gauge.labels(target).set(1 if target in paused else 0)
        consumer = self._consumer()
        if consumer is None:
            return
        paused = self.paused_queues()
        consumer.pause_queues({topology.work_queue_name(self.pool, q) for q in paused})
