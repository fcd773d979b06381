"""Parking the next attempt of a failed run in the delay ladder.

The wait between two attempts is held by the broker, not by a worker: the next
attempt is the same run message (same run id, unknown fields kept) with `attempt`
one higher and `scheduled_start_time` at the end of the wait, published into the
delay ladder (confirmed) and coming back to its work queue when due, where any
worker of the pool takes it. A worker stopped or lost during the wait loses
nothing, and a cancel published meanwhile is found by the worker that takes it.

A cancel of a run waiting for its next attempt ends it at once: the worker that
parked the attempt (it remembers the runs it parked, in memory) copies the cancel
back into the cancel stream marked as reported, then publishes `cancelled`; the
worker that takes the parked attempt later finds the mark and drops it silently.
It does so only while the attempt is more than `REPORT_MARGIN_SECONDS` from leaving
the ladder, so that the mark reaches every worker first; closer to that (or when
the parking worker is gone) the worker that takes it reports the cancel, as for
any parked run.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson
from pamqp import commands as spec

from mq_worker.delay import park, park_seconds
from mq_worker.policies import next_attempt_body, next_attempt_headers
from mq_worker.signing import Signer
from mq_worker.topology import (
    CANCEL_REPORTED_HEADER,
    JSON_CONTENT_TYPE,
    RUNS_EXCHANGE,
    cancel_routing_key,
)

REPORT_MARGIN_SECONDS = 3.0
_MAX_WAITING = 100_000


async def park_next_attempt(
    channel: Any,
    *,
    body: bytes,
    properties: spec.Basic.Properties,
    signer: Signer | None,
    pool: str,
    target_routing_key: str,
    attempt: int,
    start_at: datetime,
    prefetch_seconds: float,
) -> int:
    """Publish attempt `attempt` of the run in `body` into the ladder, due at `start_at`.

    Returns the seconds it is parked for (the worker that takes it holds it for the rest).
    Raises what the publish raises when the broker does not confirm it.
    """
    next_body = next_attempt_body(body, attempt, start_at)
    headers = next_attempt_headers(dict(properties.headers or {}))
    if signer is not None:
        headers.update(signer.headers(next_body, kind="run", pool=pool))
    next_properties = spec.Basic.Properties(
        content_type=properties.content_type or JSON_CONTENT_TYPE,
        content_encoding=properties.content_encoding,
        headers=headers,
        delivery_mode=2,
        timestamp=datetime.now(UTC),
        app_id=properties.app_id,
    )
    seconds = park_seconds(start_at.timestamp() - time.time(), prefetch_seconds)
    await park(
        channel,
        body=next_body,
        properties=next_properties,
        target_routing_key=target_routing_key,
        delay_seconds=seconds,
    )
    return seconds


@dataclass(frozen=True, slots=True)
class WaitingRetry:
    """A run whose next attempt this worker parked, as its `cancelled` event would show it."""

    run_id: UUID
    queue: str
    event_data: dict[str, Any]
    back_at: float  # wall-clock time at which the attempt leaves the ladder

    def reportable(self) -> bool:
        """Whether this worker may still report a cancel itself (see the module docstring)."""
        return time.time() < self.back_at - REPORT_MARGIN_SECONDS


class WaitingRetries:
    """The runs whose next attempt this worker parked and that are not back yet."""

    def __init__(self, max_entries: int = _MAX_WAITING) -> None:
        self._runs: OrderedDict[UUID, WaitingRetry] = OrderedDict()
        self._max = max_entries

    def __len__(self) -> int:
        return len(self._runs)

    def add(self, waiting: WaitingRetry) -> None:
        self._runs.pop(waiting.run_id, None)
        self._runs[waiting.run_id] = waiting
        now = time.time()
        while self._runs:  # in order of parking; a later one may be back sooner, kept anyway
            oldest = next(iter(self._runs.values()))
            if oldest.back_at >= now and len(self._runs) <= self._max:
                break
            self._runs.popitem(last=False)

    def pop(self, run_id: UUID) -> WaitingRetry | None:
        return self._runs.pop(run_id, None)


async def publish_cancel_reported(
    channel: Any, *, run_id: UUID, reason: str | None, pool: str, worker: str,
    signer: Signer | None,
) -> None:
    """Copy a cancel back into the cancel stream, marked as reported by `worker` (confirmed)."""
    body = orjson.dumps({"id": str(run_id), "reason": reason})
    headers: dict[str, Any] = {CANCEL_REPORTED_HEADER: worker}
    if signer is not None:
        headers.update(signer.headers(body, kind="cancel", pool=pool))
    await channel.basic_publish(
        body,
        exchange=RUNS_EXCHANGE,
        routing_key=cancel_routing_key(pool),
        properties=spec.Basic.Properties(
            content_type=JSON_CONTENT_TYPE, delivery_mode=2, headers=headers,
            timestamp=datetime.now(UTC),
        ),
        mandatory=True,
    )
