"""Parking the next attempt of a failed run in the delay ladder.

The wait between two attempts is held by the broker, not by a worker: the next
attempt is the same run message (same run id, unknown fields kept) with `attempt`
one higher and `scheduled_start_time` at the end of the wait, published into the
delay ladder (confirmed) and coming back to its work queue when due, where any
worker of the pool takes it. A worker stopped or lost during the wait loses
nothing, and a cancel published meanwhile is found by the worker that takes it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from pamqp import commands as spec

from mq_worker.delay import park, park_seconds
from mq_worker.policies import next_attempt_body, next_attempt_headers
from mq_worker.signing import Signer


async def park_next_attempt(
    channel: Any,
    *,
    body: bytes,
    properties: spec.Basic.Properties,
    signer: Signer | None,
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
        headers.update(signer.headers(next_body))
    next_properties = spec.Basic.Properties(
        content_type=properties.content_type or "application/json",
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
