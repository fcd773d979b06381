"""The channels and operations of the AsyncAPI document: where each message goes."""

from __future__ import annotations

from typing import Any

from mq_worker import topology
from mq_worker.events import EventType
from mq_worker.schema.models import EVENT_SUMMARIES, EVENT_TYPES, camel
from mq_worker.topology import PING

AMQP_BINDING_VERSION = "0.3.0"


def exchange(name: str) -> dict[str, Any]:
    return {
        "amqp": {
            "is": "routingKey",
            "exchange": {"name": name, "type": "topic", "durable": True, "autoDelete": False},
            "bindingVersion": AMQP_BINDING_VERSION,
        }
    }


def ref(*path: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in path)}


_NAME_PARAMETER = "1-64 characters from A-Z a-z 0-9 _ -"


def channels() -> dict[str, Any]:
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
            "messages": {"run": ref("components", "messages", "run")},
            "bindings": exchange(topology.RUNS_EXCHANGE),
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
            "messages": {"cancel": ref("components", "messages", "cancel")},
            "bindings": exchange(topology.RUNS_EXCHANGE),
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
            "messages": {"control": ref("components", "messages", "control")},
            "bindings": exchange(topology.RUNS_EXCHANGE),
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
        "messages": {"output": ref("components", "messages", "output")},
        "bindings": exchange(topology.OUTPUT_EXCHANGE),
    }
    for event_type in [*EVENT_TYPES, PING]:
        key = camel(event_type)
        channels[key] = {
            "address": event_type,
            "title": event_type,
            "description": (
                f"Published to `{topology.EVENTS_EXCHANGE}` with the event type as routing key."
            ),
            "messages": {key: ref("components", "messages", key)},
            "bindings": exchange(topology.EVENTS_EXCHANGE),
        }
    channels[camel(PING)]["description"] = (
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
        "messages": {camel(PING): ref("components", "messages", camel(PING))},
        "bindings": exchange(topology.PING_EXCHANGE),
    }
    channels["cancelSnapshots"] = {
        "address": topology.cancel_snapshot_stream_name("{pool}"),
        "title": "Snapshots of a pool's cancel window",
        "description": (
            f"A stream per pool, written and read by its workers through the default exchange. "
            f"A starting worker reads the newest snapshot (a part from "
            f"`{topology.STREAM_OFFSET}: last`, then its other parts), checks that "
            f"`{topology.CANCELS_STREAM}` holds the snapshot's `last_message` at "
            f"`next_offset - 1`, and reads it on from `next_offset`. Workers started "
            f"with --signing-key-file neither write nor read it."
        ),
        "parameters": {"pool": {"description": f"Work pool name ({_NAME_PARAMETER})."}},
        "messages": {"cancelSnapshot": ref("components", "messages", "cancelSnapshot")},
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
        "messages": {camel(t): ref("components", "messages", camel(t))
                     for t in EVENT_TYPES if t.startswith(topology.WORKER_EVENT_PREFIX)},
        "bindings": exchange(topology.EVENTS_EXCHANGE),
    }
    return channels


def _operation(action: str, channel: str, message: str, summary: str,
               bindings: dict[str, Any]) -> dict[str, Any]:
    return {
        "action": action,
        "channel": ref("channels", channel),
        "summary": summary,
        "messages": [ref("channels", channel, "messages", message)],
        "bindings": {"amqp": {**bindings, "bindingVersion": AMQP_BINDING_VERSION}},
    }


def operations() -> dict[str, Any]:
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
            "receive", camel(PING), camel(PING),
            "Every worker answers with a heartbeat, at most one per second.", {"ack": False}),
        "answerPoolPing": _operation(
            "receive", "pings", camel(PING),
            "Every worker the ping reaches answers with a heartbeat, at most one per second.",
            {"ack": False}),
    }
    for event_type in EVENT_TYPES:
        key = camel(event_type)
        operations["send" + key[0].upper() + key[1:]] = _operation(
            "send", key, key, EVENT_SUMMARIES[EventType(event_type)], {"deliveryMode": 2})
    operations["sendRunOutput"] = _operation(
        "send", "runOutput", "output",
        "A worker publishes a running run's output lines in numbered batches.",
        {"deliveryMode": 2})
    return operations
