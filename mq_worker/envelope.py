"""The CloudEvents envelope of what a worker publishes: built once, serialized once.

An event's data is a plain dict built by the data functions in `mq_worker.events`;
the envelope around it is written here, straight to JSON bytes, so the hot path
does no model work.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import orjson

from mq_worker.event_ids import new_event_id
from mq_worker.topology import (
    JSON_CONTENT_TYPE,
    RUN_EVENT_PREFIX,
    WORKER_EVENT_PREFIX,
    pool_routing_key,
)

SPECVERSION = "1.0"
CONTENT_TYPE = "application/cloudevents+json"


def worker_source(worker: str) -> str:
    """The CloudEvents `source` of a worker's events."""
    return f"/mq_worker/workers/{worker}"


@dataclass(slots=True)
class OutgoingEvent:
    """An event serialized and ready to publish."""

    id: str
    type: str
    body: bytes
    run_id: str | None = None
    # Routing keys it also takes on the events exchange (sent as a `BCC` header).
    also_routed_to: tuple[str, ...] = ()


def extra_routing_keys(event_type: str, data: object) -> tuple[str, ...]:
    """A worker event also goes to its pool's heartbeat stream (`workers.<pool>`)."""
    if event_type.startswith(WORKER_EVENT_PREFIX) and isinstance(data, dict):
        pool = data.get("pool")
        if isinstance(pool, str):
            return (pool_routing_key(pool),)
    return ()


def build_event(
    event_type: str,
    *,
    source: str,
    subject: str | None,
    data: dict[str, Any],
    event_id: str | None = None,
    traceparent: str | None = None,
) -> OutgoingEvent:
    event_id = event_id or new_event_id()
    envelope: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": event_id,
        "source": source,
        "type": event_type,
        "time": datetime.now(UTC),
        "datacontenttype": JSON_CONTENT_TYPE,
        "data": data,
    }
    if subject is not None:
        envelope["subject"] = subject
    if traceparent is not None:  # the CloudEvents distributed tracing extension
        envelope["traceparent"] = traceparent
    body = orjson.dumps(envelope, option=orjson.OPT_UTC_Z)
    run_id = subject if event_type.startswith(RUN_EVENT_PREFIX) else None
    return OutgoingEvent(event_id, event_type, body, run_id,
                         extra_routing_keys(event_type, data))


class Omitted(Enum):
    """A field left out of an event's data, as opposed to one given as null: a run cancelled
    before it started has no `status_code` at all, a stopped one may have a null one."""

    OMITTED = "omitted"


OMITTED = Omitted.OMITTED


def given(**fields: Any) -> dict[str, Any]:
    """The fields given, without those left out."""
    return {name: value for name, value in fields.items() if value is not OMITTED}
