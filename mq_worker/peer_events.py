"""Worker events as the ones who act on them read them: validated, never trusted.

The elected reporter crashes runs on the word of heartbeats, and `mq-worker
status` prints them, so a worker event that does not follow the contract
(a `heartbeat_seconds` that is not a positive number, `runs` that are not
objects with a run id, ...) is refused here with a one-line reason instead of
reaching code that would fail on it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from mq_worker.events import Event, EventType, HeartbeatRun

WORKER_EVENT_TYPES = frozenset({
    EventType.WORKER_STARTED,
    EventType.WORKER_HEARTBEAT,
    EventType.WORKER_STOPPED,
    EventType.WORKER_LOST,
})
# The longest interval a worker can be started with (`--heartbeat-seconds`): a peer
# announcing a longer one is forged or broken, and would be watched for hours.
MAX_HEARTBEAT_SECONDS = 3_600.0
DEFAULT_HEARTBEAT_SECONDS = 30.0
# Workers of one pool the elected reporter follows at once: far above any real pool,
# far below what a flood of forged names would need to exhaust its memory.
DEFAULT_MAX_PEERS = 100_000


class InvalidWorkerEvent(ValueError):
    """A worker event that is not acted upon, with the reason why."""

    def __init__(self, reason: str, worker: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.worker = worker


class WorkerReport(BaseModel):
    """The `data` of a worker event, as far as watching workers needs it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    worker: str = Field(min_length=1, max_length=256)
    pool: str = Field(min_length=1, max_length=64)
    heartbeat_seconds: float = Field(
        default=DEFAULT_HEARTBEAT_SECONDS, gt=0, le=MAX_HEARTBEAT_SECONDS, allow_inf_nan=False
    )
    queues: list[str] = Field(default_factory=list)
    limit: int | None = Field(default=None, ge=0)
    hostname: str | None = None
    free_slots: int | None = None
    in_flight: list[Annotated[str, StringConstraints(max_length=256)]] = Field(
        default_factory=list)
    runs: list[HeartbeatRun] | None = None
    follows: str | None = None

    @field_validator("heartbeat_seconds", mode="before")
    @classmethod
    def _a_number(cls, value: Any) -> Any:
        # Numbers only: "30" in a heartbeat is a sender's bug, not something to guess at.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("must be a number of seconds")
        if not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    def run_list(self) -> list[dict[str, Any]]:
        """The runs this worker held, as plain dicts (id, name, queue, state, pid)."""
        if self.runs is not None:
            return [{"id": str(r.id), "name": r.name, "queue": r.queue, "state": r.state,
                     "infrastructure_pid": r.infrastructure_pid} for r in self.runs]
        # Only heartbeats of early versions lack `runs`; their ids are run ids.
        return [{"id": str(UUID(run_id))} for run_id in self.in_flight if _is_uuid(run_id)]


def _is_uuid(value: str) -> bool:
    try:
        UUID(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class WorkerEvent:
    """A validated worker event."""

    id: str
    type: str
    time: datetime
    report: WorkerReport
    # The bytes it was read from (empty when it was parsed from an `Event`).
    body: bytes = b""


def _first_error(exc: ValidationError, prefix: str = "") -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{prefix}{where}: {error['msg']}" if where else f"{prefix}{error['msg']}"


def worker_event_from(event: Event) -> WorkerEvent:
    """Validate the data of an already parsed worker event."""
    if event.type not in WORKER_EVENT_TYPES:
        raise InvalidWorkerEvent(f"not a worker event: type {event.type[:80]!r}")
    worker = event.data.get("worker")
    try:
        report = WorkerReport.model_validate(event.data)
    except ValidationError as exc:
        raise InvalidWorkerEvent(
            _first_error(exc, "data."), worker if isinstance(worker, str) else None
        ) from None
    return WorkerEvent(event.id, event.type, event.time, report)


def parse_worker_event(body: bytes) -> WorkerEvent:
    """Parse and validate one worker event as received from the broker."""
    try:
        event = Event.from_body(body)
    except ValidationError as exc:
        raise InvalidWorkerEvent("not a CloudEvent: " + _first_error(exc)) from None
    return dataclasses.replace(worker_event_from(event), body=body)


@dataclass
class PeerRecord:
    """The last we heard from a worker."""

    name: str
    pool: str
    last_seen: float  # time.monotonic()
    heartbeat_seconds: float
    event: WorkerEvent
    lost: bool = False
    # An earlier run of this worker that held runs when it restarted.
    restarted_from: PeerRecord | None = None
    restart_reported: bool = False

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.event.report.run_list()

def is_restart(started: WorkerEvent, latest: WorkerEvent) -> bool:
    """Whether `started` begins a new run of the worker whose latest event is `latest`,
    rather than being a copy of the started event of the run we know (an outbox
    publishes an event again when its confirm was lost)."""
    known_start = latest.id if latest.type == EventType.WORKER_STARTED else latest.report.follows
    return started.id != known_start
