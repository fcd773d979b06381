"""Settling a run message that does not run here: dead-lettered (rejected) or parked."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from mq_worker import topology
from mq_worker.consumer import Delivery
from mq_worker.delay import park, park_seconds
from mq_worker.errors import InvalidMessage
from mq_worker.handoff import CONFIRM_TIMEOUT, HandoffReturned, fit_headers, frame_max_of, hand_off
from mq_worker.messages import RunMessage
from mq_worker.metrics import WorkerMetrics
from mq_worker.workers.link import Link
from mq_worker.workers.reporter import Reporter

_MAX_REASON_CHARS = 2048


class Settler:
    """Copies messages to the dead-letter queue or the delay ladder, then settles them."""

    def __init__(self, *, link: Link, reporter: Reporter, metrics: WorkerMetrics, pool: str,
                 worker: str, prefetch_seconds: float, log: Any) -> None:
        self._link = link
        self._report = reporter
        self._metrics = metrics
        self._pool = pool
        self._worker = worker
        self._prefetch_seconds = prefetch_seconds
        self._log = log

    async def reject(
        self, delivery: Delivery, queue: str, exc: InvalidMessage, run: RunMessage | None = None
    ) -> None:
        run_id = run.id if run else exc.run_id
        self._log.warning("run message rejected", reason=exc.reason,
                          run_id=str(run_id) if run_id else None, queue=queue)
        if await self.dead_letter(delivery, exc.reason):
            self._metrics.rejected.labels(self._pool, queue).inc()
            self._report.rejected(queue, exc.reason, run_id, run=run)

    async def dead_letter(self, delivery: Delivery, reason: str) -> bool:
        """Copy the message to mq_worker.dead with `reason`, then settle it.

        False if it was not copied: it is given back to its queue (or gone with its connection).
        """
        session = self._link.current
        if session is None or delivery.lost.is_set():
            await delivery.settle()  # frees its slot; the broker delivers it again
            return False
        channel = session.publish
        properties, dropped = fit_headers(
            delivery.properties,
            delivery.headers,
            topology.dead_letter_headers(reason=reason[:_MAX_REASON_CHARS], worker=self._worker,
                                         queue=delivery.queue, routing_key=delivery.routing_key),
            body_size=len(delivery.body),
            frame_max=frame_max_of(channel),
        )
        if dropped:
            self._log.warning("dead letter too large for one frame: received headers left out",
                              dropped=len(dropped), queue=delivery.queue)

        async def publish() -> None:
            await channel.basic_publish(
                delivery.body, exchange="", routing_key=topology.DEAD_QUEUE,
                properties=properties, mandatory=True, timeout=CONFIRM_TIMEOUT,
            )

        try:
            await hand_off(publish, lambda: topology.declare_dead_queue(channel),
                           what="dead letter", log=self._log)
        except HandoffReturned:
            await delivery.settle(requeue=True, failed=True)
            return False
        await delivery.settle()
        return True

    async def park(self, delivery: Delivery, run: RunMessage, due: datetime, queue: str) -> None:
        """Park a run due after the prefetch horizon in the delay ladder, until nearer `due`."""
        session = self._link.current
        if session is None or delivery.lost.is_set():
            # Gone with its connection: parking a copy now would let the broker's
            # redelivery park a second one.
            await delivery.settle()  # frees its slot; the broker delivers it again
            return
        await session.declare_delay_ladder()
        seconds = park_seconds(due.timestamp() - time.time(), self._prefetch_seconds)

        async def publish() -> None:
            await park(
                session.publish,
                body=delivery.body,
                properties=delivery.properties,
                target_routing_key=topology.scheduled_routing_key(self._pool, queue),
                delay_seconds=seconds,
                timeout=CONFIRM_TIMEOUT,
            )

        async def declare_again() -> None:
            await session.declare_delay_ladder(again=True)

        try:
            await hand_off(publish, declare_again, what="parked run", log=self._log)
        except HandoffReturned:
            await delivery.settle(requeue=True, failed=True)
            return
        await delivery.settle()
        self._metrics.parked.labels(self._pool, queue).inc()
        self._log.info("run parked until due", run_id=str(run.id), queue=queue,
                       due=due.isoformat(), parked_seconds=seconds)
