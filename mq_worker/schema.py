"""The wire contract as data: JSON Schemas of every message and the AsyncAPI 3.0 document.

Everything here is generated from the pydantic models (`mq_worker.messages`
and `mq_worker.events`), so the published contract cannot drift from what
workers parse and send. `docs/asyncapi.yaml` is this module's `asyncapi_yaml()`.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.json_schema import models_json_schema

from mq_worker import topology
from mq_worker.cancel_snapshots import CancelSnapshotMessage
from mq_worker.control import ControlMessage
from mq_worker.events import CONTENT_TYPE, DATA_MODELS, Event, EventType
from mq_worker.messages import CancelMessage, RunMessage
from mq_worker.monitor import PING
from mq_worker.output import OutputMessage
from mq_worker.signing import SIGNATURE_HEADER, SIGNATURE_V2_HEADER

ASYNCAPI_VERSION = "3.0.0"
CONTRACT_VERSION = "1"
AMQP_BINDING_VERSION = "0.3.0"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class EventEnvelope(Event):
    """A lifecycle event: a CloudEvents 1.0 event in structured JSON mode."""

    specversion: Literal["1.0"] = Field(description="CloudEvents version.")
    id: str = Field(description="Unique per event; redelivered events keep theirs.")
    source: str = Field(description="`/mq_worker/workers/<worker name>` for worker events.")
    type: str = Field(description="The event type; also the routing key.")
    subject: str | None = Field(
        default=None,
        description="Run id for run events, worker name for worker events; absent for a "
        "rejected message without a readable id.",
    )
    datacontenttype: Literal["application/json"] = "application/json"


class PingData(BaseModel):
    """Anything: workers ignore the body of a ping."""

    model_config = ConfigDict(extra="allow")


def _camel(event_type: str) -> str:
    words = event_type.removeprefix("mq_worker.").split(".")
    return words[0] + "".join(w.capitalize() for w in words[1:])


def event_model(event_type: str) -> type[EventEnvelope]:
    """The envelope of `event_type` with its `type` fixed and its `data` model."""
    data_model = PingData if event_type == PING else DATA_MODELS[event_type]
    name = _camel(event_type)
    fixed_type: Any = Literal[event_type]
    return create_model(
        name[0].upper() + name[1:] + "Event",
        __base__=EventEnvelope,
        __doc__=f"The `{event_type}` event.",
        type=(fixed_type, Field(description="The event type; also the routing key.")),
        data=(data_model, ...),
    )


EVENT_TYPES: list[str] = [t.value for t in EventType]
_WHEN = {
    EventType.WORKER_STARTED: "A worker is connected and consuming.",
    EventType.WORKER_STOPPED: "A worker stopped gracefully.",
    EventType.WORKER_HEARTBEAT: "Every --heartbeat-seconds, and at once when pinged.",
    EventType.WORKER_LOST: "A worker missed 3 heartbeats (published by one elected peer).",
    EventType.RUN_PENDING: "A worker has taken the run.",
    EventType.RUN_SUBMITTED: "The run's process started.",
    EventType.RUN_COMPLETED: "The run's process exited with 0.",
    EventType.RUN_CRASHED: "Non-zero exit, failed start, timeout, failed kill or lost worker "
                           "(after the last attempt).",
    EventType.RUN_RETRYING: "An attempt failed and the next one is parked until its start time.",
    EventType.RUN_CANCELLED: "A cancel stopped or dropped the run.",
    EventType.RUN_REJECTED: "An invalid run or cancel message was dead-lettered.",
}


_PING_SUMMARY = "Ask workers for a heartbeat now (not a lifecycle event)."


def _models() -> dict[str, type[BaseModel]]:
    """Every message model by the name `mq-worker schema NAME` knows it."""
    models: dict[str, type[BaseModel]] = {
        "run": RunMessage,
        "cancel": CancelMessage,
        "control": ControlMessage,
        "event": EventEnvelope,
        "output": OutputMessage,
        "cancel-snapshot": CancelSnapshotMessage,
    }
    for event_type in [*EVENT_TYPES, PING]:
        models[event_type] = event_model(event_type)
    return models


def schema_names() -> list[str]:
    return list(_models())


def json_schema(name: str) -> dict[str, Any]:
    """The standalone JSON Schema (draft 2020-12) of one message: `run`, `cancel`,
    `event` or an event type (with or without its `mq_worker.` prefix)."""
    models = _models()
    model = models.get(name) or models.get(f"mq_worker.{name}")
    if model is None:
        raise KeyError(name)
    return {"$schema": JSON_SCHEMA_DIALECT, **model.model_json_schema()}


def json_schemas() -> dict[str, dict[str, Any]]:
    """Every message's JSON Schema, by name."""
    return {name: json_schema(name) for name in schema_names()}


# -- AsyncAPI ------------------------------------------------------------------------


def _exchange(name: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {"name": name, "type": "topic", "durable": True, "autoDelete": False},
            "bindingVersion": AMQP_BINDING_VERSION,
        }
    }


def _ref(*path: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in path)}


_NAME_PARAMETER = "1-64 characters from A-Z a-z 0-9 _ -"


def _channels() -> dict[str, Any]:
    channels: dict[str, Any] = {
        "runs": {
            "address": "run.scheduled.{pool}.{queue}",
            "title": "Scheduled runs",
            "description": (
                f"Runs published to `{topology.RUNS_EXCHANGE}`. Each (pool, queue) has a quorum "
                f"queue `mq_worker.<pool>.<queue>` bound with this key; the workers of the pool "
                f"compete for its runs. Publish persistent, mandatory, with publisher confirms."
            ),
            "parameters": {
                "pool": {"description": f"Work pool name ({_NAME_PARAMETER}).",
                         "default": topology.DEFAULT_POOL},
                "queue": {"description": f"Work queue name ({_NAME_PARAMETER}).",
                          "default": topology.DEFAULT_QUEUE},
            },
            "messages": {"run": _ref("components", "messages", "run")},
            "bindings": _exchange(topology.RUNS_EXCHANGE),
        },
        "cancels": {
            "address": "run.cancel.{pool}",
            "title": "Cancels",
            "description": (
                f"Cancels published to `{topology.RUNS_EXCHANGE}`; they go to the stream "
                f"`{topology.CANCELS_STREAM}` (bound with `run.cancel.*`), which every worker "
                f"of the pool reads."
            ),
            "parameters": {"pool": {"description": f"Work pool name ({_NAME_PARAMETER})."}},
            "messages": {"cancel": _ref("components", "messages", "cancel")},
            "bindings": _exchange(topology.RUNS_EXCHANGE),
        },
        "control": {
            "address": "control.{kind}",
            "title": "Pauses and shared limits",
            "description": (
                f"Pauses, resumes and limits published to `{topology.RUNS_EXCHANGE}` "
                f"(`mq-worker pause/resume/limit`); they go to the stream "
                f"`{topology.CONTROL_STREAM}` (bound with `{topology.CONTROL_BINDING}`, no age "
                f"limit), which every worker replays and follows. The last message per target "
                f"holds. A limit's free slots are token messages in the quorum queue "
                f"`mq_worker.limit-<digest>`, runs waiting for one are in "
                f"`mq_worker.waiting-<digest>` (docs/pools.md)."
            ),
            "parameters": {"kind": {"description": "pause, resume or limit.",
                                    "enum": ["pause", "resume", "limit"]}},
            "messages": {"control": _ref("components", "messages", "control")},
            "bindings": _exchange(topology.RUNS_EXCHANGE),
        },
    }
    channels["runOutput"] = {
        "address": "output.{pool}.{runId}",
        "title": "Run output",
        "description": (
            f"Batches of a run's stdout/stderr lines, published to `{topology.OUTPUT_EXCHANGE}` "
            f"by the worker that runs it when `stream_output` is on. Bind `output.*.<run id>` "
            f"to follow one run, `output.#` for all. Best effort: capped per run, dropped (and "
            f"counted) rather than ever slowing a run."
        ),
        "parameters": {"pool": {"description": f"Work pool name ({_NAME_PARAMETER})."},
                       "runId": {"description": "The run's id."}},
        "messages": {"output": _ref("components", "messages", "output")},
        "bindings": _exchange(topology.OUTPUT_EXCHANGE),
    }
    for event_type in [*EVENT_TYPES, PING]:
        key = _camel(event_type)
        channels[key] = {
            "address": event_type,
            "title": event_type,
            "description": (
                f"Published to `{topology.EVENTS_EXCHANGE}` with the event type as routing key."
            ),
            "messages": {key: _ref("components", "messages", key)},
            "bindings": _exchange(topology.EVENTS_EXCHANGE),
        }
    channels[_camel(PING)]["description"] = (
        f"Earlier form of a ping, still answered: any message published to "
        f"`{topology.EVENTS_EXCHANGE}` with this routing key makes every worker publish a "
        f"heartbeat (at most one per second). `mq-worker status` now pings on "
        f"`{topology.PING_EXCHANGE}` instead, which needs no right to publish events."
    )
    channels["pings"] = {
        "address": "ping.{pool}",
        "title": "Pings",
        "description": (
            f"Published to `{topology.PING_EXCHANGE}` (topic exchange, declared by workers) "
            f"with routing key `ping.<pool>` (the workers of one pool) or "
            f"`{topology.PING_ALL_ROUTING_KEY}` (every worker). Not a lifecycle event: "
            f"subscribers of `{topology.EVENTS_EXCHANGE}` never see it. The body is ignored."
        ),
        "parameters": {"pool": {"description": f"Work pool name ({_NAME_PARAMETER})."}},
        "messages": {_camel(PING): _ref("components", "messages", _camel(PING))},
        "bindings": _exchange(topology.PING_EXCHANGE),
    }
    channels["cancelSnapshots"] = {
        "address": topology.cancel_snapshot_stream_name("{pool}"),
        "title": "Snapshots of a pool's cancel window",
        "description": (
            f"A stream per pool, written and read by its workers through the default exchange. "
            f"A starting worker reads the newest snapshot (`x-stream-offset: last`), then "
            f"`{topology.CANCELS_STREAM}` from the snapshot's `next_offset`. Workers started "
            f"with --signing-key-file neither write nor read it."
        ),
        "parameters": {"pool": {"description": f"Work pool name ({_NAME_PARAMETER})."}},
        "messages": {"cancelSnapshot": _ref("components", "messages", "cancelSnapshot")},
        "bindings": {"amqp": {
            "is": "routingKey",
            "exchange": {"name": "amq.default", "type": "direct", "durable": True,
                         "autoDelete": False},
            "bindingVersion": AMQP_BINDING_VERSION,
        }},
    }
    channels["poolWorkerEvents"] = {
        "address": "workers.{pool}",
        "title": "Worker events of one pool",
        "description": (
            f"The worker events (started, heartbeat, stopped, lost) of one pool also carry "
            f"this routing key on `{topology.EVENTS_EXCHANGE}` (a `BCC` header, removed by "
            f"the broker), which puts them in the pool's stream "
            f"`mq_worker.heartbeats-<pool>`. Bind it to follow one pool's workers only; a "
            f"queue bound with both keys receives each event once."
        ),
        "parameters": {"pool": {"description": f"Work pool name ({_NAME_PARAMETER})."}},
        "messages": {_camel(t): _ref("components", "messages", _camel(t))
                     for t in EVENT_TYPES if t.startswith("mq_worker.worker.")},
        "bindings": _exchange(topology.EVENTS_EXCHANGE),
    }
    return channels


def _operation(action: str, channel: str, message: str, summary: str,
               bindings: dict[str, Any]) -> dict[str, Any]:
    return {
        "action": action,
        "channel": _ref("channels", channel),
        "summary": summary,
        "messages": [_ref("channels", channel, "messages", message)],
        "bindings": {"amqp": {**bindings, "bindingVersion": AMQP_BINDING_VERSION}},
    }


def _operations() -> dict[str, Any]:
    operations = {
        "takeRun": _operation(
            "receive", "runs", "run",
            "A worker takes a run from its work queue and starts it when due.", {"ack": True}),
        "takeCancel": _operation(
            "receive", "cancels", "cancel",
            "Every worker of the pool receives every cancel of the pool.", {"ack": True}),
        "keepCancelSnapshots": _operation(
            "send", "cancelSnapshots", "cancelSnapshot",
            "The pool's elected reporter publishes a snapshot whenever the cancel stream "
            "has grown by 10,000 messages past the last one.", {"deliveryMode": 2}),
        "followControl": _operation(
            "receive", "control", "control",
            "Every worker replays and follows every pause, resume and limit.", {"ack": True}),
        "answerPing": _operation(
            "receive", _camel(PING), _camel(PING),
            "Every worker answers with a heartbeat, at most one per second.", {"ack": False}),
        "answerPoolPing": _operation(
            "receive", "pings", _camel(PING),
            "Every worker the ping reaches answers with a heartbeat, at most one per second.",
            {"ack": False}),
    }
    for event_type in EVENT_TYPES:
        key = _camel(event_type)
        operations["send" + key[0].upper() + key[1:]] = _operation(
            "send", key, key, _WHEN[EventType(event_type)], {"deliveryMode": 2})
    operations["sendRunOutput"] = _operation(
        "send", "runOutput", "output",
        "A worker publishes a running run's output lines in numbered batches.",
        {"deliveryMode": 2})
    return operations


def _message(name: str, title: str, summary: str, content_type: str, schema: str,
             **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "title": title,
        "summary": summary,
        "contentType": content_type,
        "payload": _ref("components", "schemas", schema),
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


def _messages(names: dict[str, str]) -> dict[str, Any]:
    signature_headers = {
        SIGNATURE_V2_HEADER: {
            "type": "string",
            "pattern": "^t=[0-9]{1,12},sha256=[0-9a-f]{64}$",
            "description": "Signature v2: t is the issued-at time (Unix seconds), sha256 "
            "the hex HMAC-SHA256 under a shared key of 'mq_worker.v2', the message kind "
            "(run or cancel), the pool, t and the exact body, joined by LF; required by "
            "workers started with --signing-key-file.",
        },
        SIGNATURE_HEADER: {
            "type": "string",
            "pattern": "^sha256=[0-9a-f]{64}$",
            "description": "Signature v1 (legacy): HMAC-SHA256 of the body only. Workers "
            "ignore it; publishers may add it for workers of older versions.",
        },
    }
    signature = {"type": "object", "properties": signature_headers}
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
        "run": _message("run", "Run", "A run to start now or at its scheduled start time.",
                        "application/json", names["run"], headers=signature,
                        examples=[{"name": "nightly", "payload": _RUN_EXAMPLE}]),
        "cancel": _message("cancel", "Cancel", "Cancel a run wherever it is.",
                           "application/json", names["cancel"], headers=cancel_headers,
                           examples=[{"name": "cancel", "payload": _CANCEL_EXAMPLE}]),
        "control": _message("control", "Control", "Pause, resume or limit a target.",
                            "application/json", names["control"],
                            examples=[{"name": "pause", "payload": _PAUSE_EXAMPLE}]),
    }
    messages["cancelSnapshot"] = _message(
        "cancelSnapshot", "Cancel snapshot", "Every cancel of a pool's window up to an offset.",
        "application/json", names["cancel-snapshot"])
    messages["output"] = _message(
        "output", "Run output", "A batch of a run's output lines.", "application/json",
        names["output"])
    for event_type in [*EVENT_TYPES, PING]:
        key = _camel(event_type)
        summary = _WHEN[EventType(event_type)] if event_type != PING else _PING_SUMMARY
        messages[key] = _message(key, event_type, summary, CONTENT_TYPE, names[event_type])
    return messages


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the wire contract, seen from a worker."""
    models = _models()
    ref_template = "#/components/schemas/{model}"
    keys, definitions = models_json_schema(
        [(model, "validation") for model in models.values()], ref_template=ref_template
    )
    schema_of = {
        name: keys[(model, "validation")]["$ref"].rsplit("/", 1)[-1]
        for name, model in models.items()
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:mq_worker:wire-contract",
        "info": {
            "title": "mq_worker wire contract",
            "version": CONTRACT_VERSION,
            "description": (
                "Runs and cancels that orchestrators publish to workers, and the lifecycle "
                "events (CloudEvents 1.0, structured JSON mode) that workers publish. "
                "Generated from mq_worker's pydantic models by `mq-worker schema --asyncapi`; "
                "docs/protocol.md explains it."
            ),
            "license": {"name": "Apache-2.0",
                        "url": "https://www.apache.org/licenses/LICENSE-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "broker": {"host": "localhost:5672", "protocol": "amqp", "protocolVersion": "0.9.1",
                       "description": "RabbitMQ; any vhost."},
            "brokerTls": {"host": "localhost:5671", "protocol": "amqps",
                          "protocolVersion": "0.9.1", "description": "RabbitMQ over TLS."},
        },
        "channels": _channels(),
        "operations": _operations(),
        "components": {
            "schemas": definitions["$defs"],
            "messages": _messages(schema_of),
        },
    }


# -- YAML --------------------------------------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_./ -]*$")
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        if _PLAIN.match(value) and not value.endswith(" ") and value.lower() not in _RESERVED:
            return value
        return json.dumps(value)
    return json.dumps(value)


def _yaml_lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            label = f"{pad}{_scalar(str(key))}:"
            if isinstance(item, dict | list) and item:
                lines.append(label)
                lines.extend(_yaml_lines(item, indent + 2))
            else:
                lines.append(f"{label} {_inline(item)}")
    else:
        for item in value:
            if isinstance(item, dict | list) and item:
                nested = _yaml_lines(item, indent + 2)
                lines.append(f"{pad}- {nested[0].lstrip()}")
                lines.extend(nested[1:])
            else:
                lines.append(f"{pad}- {_inline(item)}")
    return lines


def _inline(value: Any) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


def to_yaml(document: dict[str, Any]) -> str:
    """`document` (JSON-like data) as block-style YAML; strings quoted where YAML needs it."""
    return "\n".join(_yaml_lines(document, 0)) + "\n"


def asyncapi_yaml() -> str:
    """The AsyncAPI document as `docs/asyncapi.yaml` holds it."""
    header = (
        "# Generated by `mq-worker schema --asyncapi` from mq_worker's models: do not edit.\n"
        "# Regenerate: mq-worker schema --asyncapi > docs/asyncapi.yaml\n"
    )
    return header + to_yaml(asyncapi())
