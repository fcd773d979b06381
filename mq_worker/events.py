"""Lifecycle events: CloudEvents 1.0 in structured JSON mode on `mq_worker.events`.

The routing key of every event is its type. Workers build events as plain
dicts (the hot path); the models below describe them for subscribers and for
the published JSON Schemas, and the contract tests hold the two together.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal
from uuid import UUID, uuid4

import orjson
from pydantic import BaseModel, ConfigDict, Field

SPECVERSION = "1.0"
CONTENT_TYPE = "application/cloudevents+json"


class EventType(StrEnum):
    WORKER_STARTED = "mq_worker.worker.started"
    WORKER_STOPPED = "mq_worker.worker.stopped"
    WORKER_HEARTBEAT = "mq_worker.worker.heartbeat"
    WORKER_LOST = "mq_worker.worker.lost"
    RUN_PENDING = "mq_worker.run.pending"
    RUN_SUBMITTED = "mq_worker.run.submitted"
    RUN_COMPLETED = "mq_worker.run.completed"
    RUN_CRASHED = "mq_worker.run.crashed"
    RUN_RETRYING = "mq_worker.run.retrying"
    RUN_CANCELLED = "mq_worker.run.cancelled"
    RUN_REJECTED = "mq_worker.run.rejected"


class CrashReason(StrEnum):
    """Why a run crashed (`reason` of `run.crashed`), or why an attempt is retried
    (`reason` of `run.retrying`)."""

    EXIT_CODE = "exit-code"  # the process exited non-zero or was killed by a signal
    SUBMISSION_FAILED = "submission-failed"  # the process could not be started
    TIMEOUT = "timeout"  # it ran longer than its timeout_seconds and was stopped
    KILL_FAILED = "kill-failed"  # a cancel or timeout could not stop it
    MONITORING_FAILED = "monitoring-failed"  # the worker failed while watching it
    WORKER_LOST = "worker-lost"  # its worker stopped sending heartbeats
    SLOT_LOST = "slot-lost"  # its shared-limit slot went to another run while cut off


TERMINAL_TYPES = frozenset(
    {
        EventType.RUN_COMPLETED,
        EventType.RUN_CRASHED,
        EventType.RUN_CANCELLED,
        EventType.RUN_REJECTED,
    }
)


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
    if event_type.startswith("mq_worker.worker.") and isinstance(data, dict):
        pool = data.get("pool")
        if isinstance(pool, str):
            return (f"workers.{pool}",)
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
    event_id = event_id or str(uuid4())
    envelope: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": event_id,
        "source": source,
        "type": event_type,
        "time": datetime.now(UTC),
        "datacontenttype": "application/json",
        "data": data,
    }
    if subject is not None:
        envelope["subject"] = subject
    if traceparent is not None:  # the CloudEvents distributed tracing extension
        envelope["traceparent"] = traceparent
    body = orjson.dumps(envelope, option=orjson.OPT_UTC_Z)
    run_id = subject if event_type.startswith("mq_worker.run.") else None
    return OutgoingEvent(event_id, event_type, body, run_id,
                         extra_routing_keys(event_type, data))


# Models of what workers send, for subscribers and the JSON Schemas.


class _EventData(BaseModel):
    model_config = ConfigDict(extra="allow")


class RelatedResource(BaseModel):
    """A resource a run relates to: its flow, deployment, pool, queue or a tag."""

    model_config = ConfigDict(extra="allow")

    role: str = Field(description="flow, deployment, work-pool, work-queue or tag")
    id: str | None = None
    name: str | None = None


class RunEventData(_EventData):
    """Fields every run event carries."""

    run_id: UUID | None
    run_name: str | None = None
    pool: str
    queue: str
    worker: str = Field(description="Name of the worker that holds or held the run.")
    related: list[RelatedResource] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    follows: str | None = Field(
        default=None, description="Id of the previous event of the same run on this worker."
    )
    attempt: int = Field(
        default=1, ge=1, description="Which attempt of the run this is about, from 1."
    )


class PendingData(RunEventData):
    redelivered: bool = Field(description="The message was delivered before, maybe started.")
    delivery_count: int | None = None
    scheduled_start_time: datetime | None = None
    late_by_seconds: float = Field(ge=0, description="How late the run is at this moment.")
    job_variables: dict[str, Any] = Field(
        default_factory=dict,
        description="The job variables the worker runs it with (template defaults, then the "
        "deployment's, then the run's), secrets masked as '****'.",
    )
    waiting_for: str | None = Field(
        default=None,
        description="Set when the run waits for a slot of this shared limit (pool:<pool>, "
        "queue:<pool>/<queue> or key:<key>); it left the worker and starts, with another "
        "pending event, when a slot frees.",
    )


class SubmittedData(RunEventData):
    infrastructure_pid: str = Field(description="'<hostname>:<pid>' for process runs.")
    late_by_seconds: float = Field(ge=0, description="Start time minus scheduled start time.")
    labels: dict[str, str] = Field(default_factory=dict)


class CompletedData(RunEventData):
    status_code: int
    infrastructure_pid: str | None = None
    duration_seconds: float | None = None


class CrashedData(RunEventData):
    status_code: int | None = None
    message: str | None = None
    reason: CrashReason | None = Field(
        default=None, description="Why it crashed: " + ", ".join(CrashReason) + "."
    )
    infrastructure_pid: str | None = None
    reported_by: str | None = Field(
        default=None,
        description="For worker-lost: the peer that reported the lost worker, or the worker "
                    "itself when it stopped the run after its heartbeats went unconfirmed.",
    )


class RetryingData(RunEventData):
    status_code: int | None = Field(
        default=None, description="Exit status of the failed attempt (null if it never ran)."
    )
    message: str | None = None
    reason: CrashReason = Field(
        description="Why the attempt failed: exit-code, submission-failed or timeout."
    )
    infrastructure_pid: str | None = None
    next_attempt: int = Field(ge=2, description="The attempt that will run, from 1.")
    next_start_time: datetime = Field(description="When the next attempt starts, at the earliest.")
    delay_seconds: float = Field(ge=0, description="The wait before it, jitter included.")


class CancelledData(RunEventData):
    reason: str | None = None
    status_code: int | None = Field(default=None, description="Set when a process was stopped.")
    message: str | None = None
    infrastructure_pid: str | None = None


class RejectedData(RunEventData):
    reason: str
    message_kind: Literal["run", "cancel", "worker-event"] = Field(
        default="run",
        description="Whether a run, a cancel or a worker event (refused by the elected "
        "reporter of lost workers) was rejected."
    )


class WorkerData(_EventData):
    worker: str
    pool: str
    queues: list[str]
    type: str
    limit: int
    hostname: str
    pid: int
    version: str
    heartbeat_seconds: float
    follows: str | None = None
    paused: list[str] = Field(
        default_factory=list,
        description="Pauses that stop this worker's intake (pool:<pool>, queue:<pool>/<queue>).",
    )


class HeartbeatRun(BaseModel):
    """A run a worker holds, as its heartbeat lists it."""

    model_config = ConfigDict(extra="allow")

    id: UUID
    name: str | None = None
    queue: str | None = None
    state: str = Field(description="held, starting, running, or retrying (its next attempt "
                                   "is being parked).")
    infrastructure_pid: str | None = None
    attempt: int = Field(default=1, ge=1, description="Which attempt of the run, from 1.")


class HeartbeatData(WorkerData):
    free_slots: int
    in_flight: list[UUID] = Field(description="Runs this worker holds: waiting or running.")
    runs: list[HeartbeatRun] = Field(default_factory=list, description="The same runs, in detail.")
    outbox_depth: int = 0


class WorkerLostData(_EventData):
    worker: str
    pool: str
    last_seen: datetime
    in_flight: list[UUID]
    reported_by: str


DATA_MODELS: dict[str, type[BaseModel]] = {
    EventType.WORKER_STARTED: WorkerData,
    EventType.WORKER_STOPPED: WorkerData,
    EventType.WORKER_HEARTBEAT: HeartbeatData,
    EventType.WORKER_LOST: WorkerLostData,
    EventType.RUN_PENDING: PendingData,
    EventType.RUN_SUBMITTED: SubmittedData,
    EventType.RUN_COMPLETED: CompletedData,
    EventType.RUN_CRASHED: CrashedData,
    EventType.RUN_RETRYING: RetryingData,
    EventType.RUN_CANCELLED: CancelledData,
    EventType.RUN_REJECTED: RejectedData,
}


class Event(BaseModel):
    """A CloudEvent as received by a subscriber."""

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: str = SPECVERSION
    id: str
    source: str
    type: str
    subject: str | None = None
    time: datetime
    datacontenttype: str = "application/json"
    traceparent: str | None = Field(
        default=None, description="Distributed tracing extension: the run's traceparent."
    )
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def run_id(self) -> UUID | None:
        value = self.data.get("run_id")
        return UUID(value) if isinstance(value, str) else None

    @property
    def is_terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    def typed_data(self) -> BaseModel:
        """`data` validated by the model of this event's type."""
        model = DATA_MODELS.get(self.type, _EventData)
        return model.model_validate(self.data)

    @classmethod
    def from_body(cls, body: bytes) -> Event:
        return cls.model_validate_json(body)
