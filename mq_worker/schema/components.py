"""The message components of the AsyncAPI document: content types, headers, examples."""

from __future__ import annotations

from typing import Any

from mq_worker import topology
from mq_worker.events import CONTENT_TYPE, EventType
from mq_worker.schema.channels import AMQP_BINDING_VERSION, ref
from mq_worker.schema.models import EVENT_SUMMARIES, EVENT_TYPES, PING_SUMMARY, camel
from mq_worker.topology import JSON_CONTENT_TYPE, PING, SIGNATURE_HEADER, SIGNATURE_V2_HEADER


def message(name: str, title: str, summary: str, content_type: str, schema: str,
            **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "title": title,
        "summary": summary,
        "contentType": content_type,
        "payload": ref("components", "schemas", schema),
        **extra,
        "bindings": {"amqp": {"bindingVersion": AMQP_BINDING_VERSION}},
    }


_RUN_EXAMPLE = {
    "id": "6f0f3a40-3c4f-4b8e-9d64-1f3e6a9b1c20",
    "name": "nightly-etl-2026-11-28",
    "flow": {"id": "etl", "name": "ETL"},
    "deployment": {"id": "d-7", "name": "nightly", "job_variables": {"env": {"TIER": "prod"}}},
    "job_variables": {"command": "/opt/flows/etl --day 2026-11-28"},
    "tags": ["etl", "nightly"],
    "scheduled_start_time": "2026-11-29T02:00:00Z",
}
_PAUSE_EXAMPLE = {"kind": "pause", "target": "pool:etl", "version": 1796000000000000000,
                  "by": "ops"}
_CANCEL_EXAMPLE = {"id": "6f0f3a40-3c4f-4b8e-9d64-1f3e6a9b1c20", "reason": "not needed"}


def messages(names: dict[str, str]) -> dict[str, Any]:
    signature_headers = {
        SIGNATURE_V2_HEADER: {
            "type": "string",
            "pattern": "^t=[0-9]{1,12},sha256=[0-9a-f]{64}$",
            "description": "Signature v2: t is the issued-at time (Unix seconds), sha256 "
            "the hex HMAC-SHA256 under a shared key of 'mq_worker.v2', the message kind "
            "(run, cancel, or worker for a worker event), the pool, t and the exact body, "
            "joined by LF; required by workers started with --signing-key-file, which "
            "sign their own worker events so.",
        },
        SIGNATURE_HEADER: {
            "type": "string",
            "pattern": "^sha256=[0-9a-f]{64}$",
            "description": "Signature v1 (legacy): HMAC-SHA256 of the body only. Workers "
            "ignore it; publishers may add it for workers of older versions.",
        },
    }
    signature = {"type": "object", "properties": signature_headers}
    # Worker events carry it when their worker has a key (never the legacy v1).
    worker_signature = {"type": "object",
                        "properties": {SIGNATURE_V2_HEADER: signature_headers[SIGNATURE_V2_HEADER]}}
    cancel_headers = {
        "type": "object",
        "properties": {
            **signature_headers,
            topology.CANCEL_REPORTED_HEADER: {
                "type": "string",
                "description": "Set only by a worker that copies a cancel back into the "
                "stream after publishing the run's cancelled event itself (the run was "
                "waiting for a retry): other workers then drop its parked attempt silently. "
                "Publishers never set it.",
            },
        },
    }
    messages: dict[str, Any] = {
        "run": message("run", "Run", "A run to start now or at its scheduled start time.",
                        JSON_CONTENT_TYPE, names["run"], headers=signature,
                        examples=[{"name": "nightly", "payload": _RUN_EXAMPLE}]),
        "cancel": message("cancel", "Cancel", "Cancel a run wherever it is.",
                           JSON_CONTENT_TYPE, names["cancel"], headers=cancel_headers,
                           examples=[{"name": "cancel", "payload": _CANCEL_EXAMPLE}]),
        "control": message("control", "Control", "Pause, resume or limit a target.",
                            JSON_CONTENT_TYPE, names["control"],
                            examples=[{"name": "pause", "payload": _PAUSE_EXAMPLE}]),
    }
    messages["cancelSnapshot"] = message(
        "cancelSnapshot", "Cancel snapshot", "Every cancel of a pool's window up to an offset.",
        JSON_CONTENT_TYPE, names["cancel-snapshot"])
    messages["output"] = message(
        "output", "Run output", "A batch of a run's output lines.", JSON_CONTENT_TYPE,
        names["output"])
    for event_type in [*EVENT_TYPES, PING]:
        key = camel(event_type)
        summary = EVENT_SUMMARIES[EventType(event_type)] if event_type != PING else PING_SUMMARY
        signed = event_type.startswith(topology.WORKER_EVENT_PREFIX) and event_type != PING
        messages[key] = message(key, event_type, summary, CONTENT_TYPE, names[event_type],
                                **({"headers": worker_signature} if signed else {}))
    return messages

