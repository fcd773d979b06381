"""Lifecycle events: CloudEvents 1.0 in structured JSON mode on `mq_worker.events`.

The routing key of every event is its type. Workers build events as plain
dicts (the hot path); the models below describe them for subscribers and for
the published JSON Schemas. Next to each model is the one function that builds
its data, so that a field added to one and not the other fails the contract tests.
A field a model documents as set only in some cases is left out while it has no value.
The worker events' models and functions are in `mq_worker.worker_events`, imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from mq_worker.envelope import CONTENT_TYPE as CONTENT_TYPE
from mq_worker.envelope import OMITTED, Omitted, given
from mq_worker.envelope import SPECVERSION as SPECVERSION
from mq_worker.envelope import OutgoingEvent as OutgoingEvent
from mq_worker.envelope import build_event as build_event
from mq_worker.envelope import extra_routing_keys as extra_routing_keys
from mq_worker.envelope import worker_source as worker_source
from mq_worker.topology import JSON_CONTENT_TYPE
from mq_worker.worker_events import HeartbeatData as HeartbeatData
from mq_worker.worker_events import HeartbeatRun as HeartbeatRun
from mq_worker.worker_events import WorkerData as WorkerData
from mq_worker.worker_events import WorkerLostData as WorkerLostData
from mq_worker.worker_events import _EventData
from mq_worker.worker_events import heartbeat_data as heartbeat_data
from mq_worker.worker_events import worker_data as worker_data
from mq_worker.worker_events import worker_lost_data as worker_lost_data


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


class MessageKind(StrEnum):
    """Which kind of message a `run.rejected` event is about (`message_kind`)."""

    RUN = "run"
    CANCEL = "cancel"
    WORKER_EVENT = "worker-event"  # refused by the elected reporter of lost workers


TERMINAL_TYPES = frozenset(
    {
        EventType.RUN_COMPLETED,
        EventType.RUN_CRASHED,
        EventType.RUN_CANCELLED,
        EventType.RUN_REJECTED,
    }
)


# Models of what workers send, for subscribers and the JSON Schemas.


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


def run_event_data(
    *, run_id: str | None, run_name: str | None, pool: str, queue: str, worker: str,
    related: list[dict[str, Any]], tags: list[str], follows: str | None, attempt: int,
) -> dict[str, Any]:
    """The fields of `RunEventData`, which every run event's data starts with."""
    return {"run_id": run_id, "run_name": run_name, "pool": pool, "queue": queue,
            "worker": worker, "related": related, "tags": tags, "follows": follows,
            "attempt": attempt}


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


def pending_data(
    run: dict[str, Any], *, redelivered: bool, delivery_count: int | None,
    scheduled_start_time: datetime | None, late_by_seconds: float,
    job_variables: dict[str, Any] | None = None, waiting_for: str | None = None,
) -> dict[str, Any]:
    data = {**run, "redelivered": redelivered, "delivery_count": delivery_count,
            "scheduled_start_time": scheduled_start_time, "late_by_seconds": late_by_seconds}
    if job_variables is not None:
        data["job_variables"] = job_variables
    if waiting_for is not None:
        data["waiting_for"] = waiting_for
    return data


class SubmittedData(RunEventData):
    infrastructure_pid: str = Field(description="'<hostname>:<pid>' for process runs.")
    late_by_seconds: float = Field(ge=0, description="Start time minus scheduled start time.")
    labels: dict[str, str] = Field(default_factory=dict)


def submitted_data(
    run: dict[str, Any], *, infrastructure_pid: str | None, late_by_seconds: float,
    labels: dict[str, str],
) -> dict[str, Any]:
    return {**run, "infrastructure_pid": infrastructure_pid,
            "late_by_seconds": late_by_seconds, "labels": labels}


class CompletedData(RunEventData):
    status_code: int
    infrastructure_pid: str | None = None
    duration_seconds: float | None = None


def completed_data(
    run: dict[str, Any], *, status_code: int, infrastructure_pid: str | None,
    duration_seconds: float | None,
) -> dict[str, Any]:
    return {**run, "status_code": status_code, "infrastructure_pid": infrastructure_pid,
            "duration_seconds": duration_seconds}


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


def crashed_data(
    run: dict[str, Any], *, reason: CrashReason, message: str | None,
    status_code: int | Omitted | None = OMITTED,
    infrastructure_pid: str | Omitted | None = OMITTED, reported_by: str | None = None,
) -> dict[str, Any]:
    data = {**run, **given(status_code=status_code), "reason": reason, "message": message,
            **given(infrastructure_pid=infrastructure_pid)}
    if reported_by is not None:
        data["reported_by"] = reported_by
    return data


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


def retrying_data(
    run: dict[str, Any], *, status_code: int | None, message: str | None, reason: CrashReason,
    infrastructure_pid: str | None, next_attempt: int, next_start_time: datetime,
    delay_seconds: float,
) -> dict[str, Any]:
    return {**run, "status_code": status_code, "message": message, "reason": reason,
            "infrastructure_pid": infrastructure_pid, "next_attempt": next_attempt,
            "next_start_time": next_start_time, "delay_seconds": delay_seconds}


class CancelledData(RunEventData):
    reason: str | None = None
    status_code: int | None = Field(
        default=None, description="Set when a process was stopped, or when the attempt "
        "failed on its own just before the cancel could stop it (its exit status).")
    message: str | None = Field(
        default=None, description="Set when the cancel ended a run whose attempt failed on "
        "its own (while starting, or just before the cancel could stop it).")
    infrastructure_pid: str | None = None


def cancelled_data(
    run: dict[str, Any], *, reason: str | None, status_code: int | Omitted | None = OMITTED,
    infrastructure_pid: str | Omitted | None = OMITTED, message: str | None = None,
) -> dict[str, Any]:
    data = {**run, "reason": reason,
            **given(status_code=status_code, infrastructure_pid=infrastructure_pid)}
    if message is not None:
        data["message"] = message
    return data


class RejectedData(RunEventData):
    reason: str
    message_kind: Literal["run", "cancel", "worker-event"] = Field(
        default="run",
        description="Whether a run, a cancel or a worker event (refused by the elected "
        "reporter of lost workers) was rejected."
    )


def rejected_data(run: dict[str, Any], *, reason: str, message_kind: MessageKind
                  ) -> dict[str, Any]:
    return {**run, "reason": reason, "message_kind": message_kind}


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

# The function that builds each model's data (the contract tests check one against the other).
DATA_BUILDERS: dict[type[BaseModel], Callable[..., dict[str, Any]]] = {
    RunEventData: run_event_data,
    PendingData: pending_data,
    SubmittedData: submitted_data,
    CompletedData: completed_data,
    CrashedData: crashed_data,
    RetryingData: retrying_data,
    CancelledData: cancelled_data,
    RejectedData: rejected_data,
    WorkerData: worker_data,
    HeartbeatData: heartbeat_data,
    WorkerLostData: worker_lost_data,
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
    datacontenttype: str = JSON_CONTENT_TYPE
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
