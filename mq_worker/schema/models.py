"""The message models of the wire contract and their standalone JSON Schemas.

Everything here comes from the pydantic models (`mq_worker.messages`,
`mq_worker.events`, `mq_worker.control`, `mq_worker.output`), so the published
schemas cannot drift from what workers parse and send.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from mq_worker.cancel_snapshots import CancelSnapshotMessage
from mq_worker.control import ControlMessage
from mq_worker.events import DATA_MODELS, Event, EventType
from mq_worker.messages import CancelMessage, RunMessage
from mq_worker.output import OutputMessage
from mq_worker.topology import EVENT_TYPE_PREFIX, PING

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


def camel(event_type: str) -> str:
    """`mq_worker.run.completed` -> `runCompleted`: an event's key in the AsyncAPI document."""
    words = event_type.removeprefix(EVENT_TYPE_PREFIX).split(".")
    return words[0] + "".join(w.capitalize() for w in words[1:])


def event_model(event_type: str) -> type[EventEnvelope]:
    """The envelope of `event_type` with its `type` fixed and its `data` model."""
    data_model = PingData if event_type == PING else DATA_MODELS[event_type]
    name = camel(event_type)
    fixed_type: Any = Literal[event_type]
    return create_model(
        name[0].upper() + name[1:] + "Event",
        __base__=EventEnvelope,
        __doc__=f"The `{event_type}` event.",
        type=(fixed_type, Field(description="The event type; also the routing key.")),
        data=(data_model, ...),
    )


EVENT_TYPES: list[str] = [t.value for t in EventType]
EVENT_SUMMARIES = {
    EventType.WORKER_STARTED: "A worker is connected and consuming.",
    EventType.WORKER_STOPPED: "A worker stopped gracefully.",
    EventType.WORKER_HEARTBEAT: "Every --heartbeat-seconds, and at once when pinged.",
    EventType.WORKER_LOST: "A worker missed 3 heartbeats (published by one elected peer).",
    EventType.RUN_PENDING: "A worker has taken the run (not with --run-events outcomes).",
    EventType.RUN_SUBMITTED: "The run's process started (not with --run-events outcomes).",
    EventType.RUN_COMPLETED: "The run's process exited with 0.",
    EventType.RUN_CRASHED: "Non-zero exit, failed start, timeout, failed kill or lost worker "
                           "(after the last attempt).",
    EventType.RUN_RETRYING: "An attempt failed and the next one is parked until its start time.",
    EventType.RUN_CANCELLED: "A cancel stopped or dropped the run.",
    EventType.RUN_REJECTED: "An invalid run or cancel message was dead-lettered.",
}
PING_SUMMARY = "Ask workers for a heartbeat now (not a lifecycle event)."


def message_models() -> dict[str, type[BaseModel]]:
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
    return list(message_models())


def json_schema(name: str) -> dict[str, Any]:
    """The standalone JSON Schema (draft 2020-12) of one message: `run`, `cancel`,
    `event` or an event type (with or without its `mq_worker.` prefix)."""
    models = message_models()
    model = models.get(name) or models.get(EVENT_TYPE_PREFIX + name)
    if model is None:
        raise KeyError(name)
    return {"$schema": JSON_SCHEMA_DIALECT, **model.model_json_schema()}


def json_schemas() -> dict[str, dict[str, Any]]:
    """Every message's JSON Schema, by name."""
    return {name: json_schema(name) for name in schema_names()}
