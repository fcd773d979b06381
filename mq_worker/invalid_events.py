"""What the elected reporter does with a worker event it cannot trust.

The event is not acted upon. It is logged with its reason, copied to
`mq_worker.dead` (headers as for rejected runs), and published as
`mq_worker.run.rejected` with `message_kind: worker-event`. Logging and the
event are limited to one per `min_interval` (the next one says how many were
folded into it), so a flood of forged heartbeats cannot fill the outbox; every
one is still dead-lettered.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import aiormq.abc
import structlog
from pamqp import commands as spec

from mq_worker.peer_events import InvalidWorkerEvent
from mq_worker.topology import (
    DEAD_QUEUE,
    dead_letter_headers,
    heartbeat_stream_name,
    pool_routing_key,
)

log = structlog.get_logger("mq_worker.invalid_events")


class InvalidWorkerEvents:
    """Reports worker events refused by the elected reporter of `pool`."""

    def __init__(
        self,
        *,
        pool: str,
        me: str,
        publisher: Callable[[], aiormq.abc.AbstractChannel | None],
        emit: Callable[[str], None],
        min_interval: float = 1.0,
    ) -> None:
        self.pool = pool
        self.me = me
        self.min_interval = min_interval
        self.refused = 0
        self._publisher = publisher
        self._emit = emit
        self._last_reported = float("-inf")
        self._folded = 0

    async def __call__(self, exc: InvalidWorkerEvent, body: bytes) -> None:
        self.refused += 1
        reason = f"invalid worker event: {exc.reason}"
        await self._dead_letter(body, reason)
        now = time.monotonic()
        if now - self._last_reported < self.min_interval:
            self._folded += 1
            return
        folded, self._folded = self._folded, 0
        self._last_reported = now
        log.warning("worker event refused", reason=exc.reason, from_worker=exc.worker,
                    also_refused_since_last_report=folded)
        self._emit(reason if not folded else f"{reason} (and {folded} more since the last)")

    async def _dead_letter(self, body: bytes, reason: str) -> None:
        channel = self._publisher()
        if channel is None:
            return
        headers = dead_letter_headers(
            reason=reason, worker=self.me, queue=heartbeat_stream_name(self.pool),
            routing_key=pool_routing_key(self.pool),
        )
        await channel.basic_publish(
            body, exchange="", routing_key=DEAD_QUEUE,
            properties=spec.Basic.Properties(headers=headers, delivery_mode=2), timeout=15,
        )
