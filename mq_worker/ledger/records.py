"""What the ledger writes, read from the messages it consumes, and what its read API returns.

Parsing is strict about what the ledger needs (an event id, a type, a time,
a run id) and lenient about the rest, so events from newer workers with more
fields are recorded as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from mq_worker.events import TERMINAL_TYPES, EventType
from mq_worker.topology import RUN_EVENT_PREFIX

# The order of a run's lifecycle states, for ties between events of the same time.
STATE_RANK = {
    EventType.RUN_PENDING: 1,
    EventType.RUN_SUBMITTED: 2,
    EventType.RUN_COMPLETED: 3,
    EventType.RUN_CRASHED: 3,
    EventType.RUN_CANCELLED: 3,
    EventType.RUN_REJECTED: 3,
}
# A run's state is the last word of its latest event type.
STATES = tuple(event_type.removeprefix(RUN_EVENT_PREFIX) for event_type in STATE_RANK)
TERMINAL_STATES = tuple(
    event_type.removeprefix(RUN_EVENT_PREFIX) for event_type in STATE_RANK
    if event_type in TERMINAL_TYPES
)


class InvalidLedgerMessage(ValueError):
    """A message the ledger cannot record, with the reason."""


@dataclass(frozen=True)
class RunChange:
    """What one event or output batch says about its run; merged into the run's row."""

    id: str
    name: str | None = None
    pool: str | None = None
    queue: str | None = None
    worker: str | None = None
    flow_id: str | None = None
    flow_name: str | None = None
    deployment_id: str | None = None
    deployment_name: str | None = None
    tags: str = "[]"
    state: str = "submitted"
    state_time: float = 0.0
    state_rank: int = 0  # 0: says nothing about the state (an output batch)
    status_code: int | None = None
    reason: str | None = None
    message: str | None = None
    infrastructure_pid: str | None = None
    scheduled_start_time: float | None = None
    created_at: float = 0.0
    pending_at: float | None = None
    submitted_at: float | None = None
    ended_at: float | None = None
    start_delay_seconds: float | None = None
    duration_seconds: float | None = None
    event_count: int = 0
    output_bytes: int = 0
    output_lines: int = 0
    output_dropped_lines: int = 0
    output_truncated: int = 0

    def values(self) -> tuple[Any, ...]:
        return tuple(asdict(self).values())


RUN_COLUMNS: tuple[str, ...] = tuple(RunChange.__dataclass_fields__)


@dataclass(frozen=True)
class EventRow:
    id: str
    run_id: str
    type: str
    time: float
    rank: int
    source: str | None
    data: str
    size: int
    run: RunChange | None


@dataclass(frozen=True)
class OutputRow:
    run_id: str
    worker: str
    sequence: int
    started_at: float | None
    first_line: int
    lines: list[list[str]]
    bytes: int
    dropped_lines: int
    truncated: bool
    eof: bool
    run: RunChange


def _time(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _text(value: Any) -> str | None:
    return None if value is None else str(value)[:4096]


def _related(data: dict[str, Any], role: str) -> tuple[str | None, str | None]:
    for item in data.get("related") or []:
        if isinstance(item, dict) and item.get("role") == role:
            return _text(item.get("id")), _text(item.get("name"))
    return None, None


def _loads(body: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidLedgerMessage(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidLedgerMessage("not a JSON object")
    return value


def parse_event(body: bytes) -> EventRow:
    """The rows a run event (a CloudEvent from `mq_worker.events`) gives."""
    envelope = _loads(body)
    event_id, event_type = envelope.get("id"), envelope.get("type")
    when = _time(envelope.get("time"))
    data = envelope.get("data")
    if not isinstance(event_id, str) or not event_id or len(event_id) > 256:
        raise InvalidLedgerMessage("the event has no valid id")
    if event_type not in STATE_RANK:
        raise InvalidLedgerMessage(f"not a run event: type {event_type!r}")
    if when is None:
        raise InvalidLedgerMessage("the event has no valid time")
    if not isinstance(data, dict):
        data = {}
    subject = envelope.get("subject")
    # A rejected message without a readable run id is recorded as a run of its own.
    run_id = str(subject)[:256] if subject else event_id
    rank = STATE_RANK[EventType(event_type)]
    state = event_type.rsplit(".", 1)[-1]
    rejected_cancel = event_type == EventType.RUN_REJECTED and data.get("message_kind") == "cancel"
    run = None if rejected_cancel else _run_change(run_id, state, rank, when, data)
    return EventRow(
        id=event_id, run_id=run_id, type=event_type, time=when, rank=rank,
        source=_text(envelope.get("source")), data=orjson.dumps(data).decode(),
        size=len(body), run=run,
    )


def _run_change(run_id: str, state: str, rank: int, when: float,
                data: dict[str, Any]) -> RunChange:
    flow_id, flow_name = _related(data, "flow")
    deployment_id, deployment_name = _related(data, "deployment")
    tags = data.get("tags")
    status_code = data.get("status_code")
    duration = data.get("duration_seconds")
    late = data.get("late_by_seconds")
    return RunChange(
        id=run_id,
        name=_text(data.get("run_name")),
        pool=_text(data.get("pool")),
        queue=_text(data.get("queue")),
        worker=_text(data.get("worker")),
        flow_id=flow_id, flow_name=flow_name,
        deployment_id=deployment_id, deployment_name=deployment_name,
        tags=orjson.dumps(tags).decode() if isinstance(tags, list) and tags else "[]",
        state=state, state_time=when, state_rank=rank,
        status_code=status_code if isinstance(status_code, int) else None,
        reason=_text(data.get("reason")),
        message=_text(data.get("message")),
        infrastructure_pid=_text(data.get("infrastructure_pid")),
        scheduled_start_time=_time(data.get("scheduled_start_time")),
        created_at=when,
        pending_at=when if state == "pending" else None,
        submitted_at=when if state == "submitted" else None,
        ended_at=when if rank == 3 else None,
        start_delay_seconds=(float(late) if state == "submitted"
                             and isinstance(late, int | float) else None),
        duration_seconds=float(duration) if isinstance(duration, int | float) else None,
        event_count=1,
    )


def parse_output(body: bytes) -> OutputRow:
    """The rows an output batch (from `mq_worker.output`) gives."""
    message = _loads(body)
    run_id, worker, sequence = message.get("run_id"), message.get("worker"), message.get("sequence")
    if not isinstance(run_id, str) or not run_id or len(run_id) > 256:
        raise InvalidLedgerMessage("the output batch has no valid run_id")
    if not isinstance(worker, str) or not isinstance(sequence, int) or sequence < 0:
        raise InvalidLedgerMessage("the output batch has no valid worker or sequence")
    lines: list[list[str]] = []
    size = 0
    for line in message.get("lines") or []:
        if isinstance(line, dict) and isinstance(line.get("text"), str):
            text = line["text"]
            lines.append([str(line.get("stream", "stdout")), text])
            size += len(text.encode(errors="replace")) + 1
    started_at = _time(message.get("started_at"))
    first_line = message.get("first_line")
    dropped = message.get("dropped_lines")
    run = RunChange(
        id=run_id, pool=_text(message.get("pool")), queue=_text(message.get("queue")),
        worker=worker[:256], created_at=started_at or _time(message.get("time")) or 0.0,
    )
    return OutputRow(
        run_id=run_id, worker=worker[:256], sequence=sequence, started_at=started_at,
        first_line=first_line if isinstance(first_line, int) else 0, lines=lines, bytes=size,
        dropped_lines=dropped if isinstance(dropped, int) else 0,
        truncated=bool(message.get("truncated")), eof=bool(message.get("eof")), run=run,
    )


# -- what the read API returns ------------------------------------------------------


def iso(when: float | None) -> str | None:
    if when is None:
        return None
    return datetime.fromtimestamp(when, UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class EventRecord:
    id: str
    type: str
    time: float
    source: str | None
    data: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "time": iso(self.time),
                "source": self.source, "data": self.data}


@dataclass(frozen=True)
class OutputLine:
    stream: str  # stdout, stderr, or "ledger" for the markers of truncated or dropped output
    text: str

    def as_dict(self) -> dict[str, Any]:
        return {"stream": self.stream, "text": self.text}


@dataclass(frozen=True)
class RunRecord:
    """One run as the ledger knows it."""

    id: str
    name: str | None
    pool: str | None
    queue: str | None
    worker: str | None
    flow_id: str | None
    flow_name: str | None
    deployment_id: str | None
    deployment_name: str | None
    tags: list[str]
    state: str
    status_code: int | None
    reason: str | None
    message: str | None
    infrastructure_pid: str | None
    scheduled_start_time: float | None
    created_at: float
    pending_at: float | None
    submitted_at: float | None
    ended_at: float | None
    start_delay_seconds: float | None
    duration_seconds: float | None
    event_count: int
    output_bytes: int
    output_lines: int
    output_dropped_lines: int
    output_truncated: bool
    events: list[EventRecord] = field(default_factory=list)

    def as_dict(self, *, with_events: bool = False) -> dict[str, Any]:
        """JSON-ready: times as RFC 3339 strings."""
        result: dict[str, Any] = {}
        for name in RunRecord.__dataclass_fields__:
            if name == "events":
                continue
            value = getattr(self, name)
            if name.endswith(("_at", "_time")):
                value = iso(value)
            result[name] = value
        if with_events:
            result["events"] = [e.as_dict() for e in self.events]
        return result


@dataclass(frozen=True)
class RunPage:
    runs: list[RunRecord]
    next_cursor: str | None  # pass as `before` for the next (older) page


@dataclass(frozen=True)
class WriteResult:
    events: int = 0
    duplicates: int = 0
    output_batches: int = 0


@dataclass(frozen=True)
class OutputBatch:
    """One stored or received batch of a run's output."""

    worker: str
    sequence: int
    lines: list[OutputLine]
    dropped_lines: int = 0
    truncated: bool = False
    eof: bool = False

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> OutputBatch:
        """From an `mq_worker.output` message body (parsed); raises KeyError/ValueError."""
        lines = [OutputLine(str(line.get("stream", "stdout")), str(line.get("text", "")))
                 for line in message.get("lines") or [] if isinstance(line, dict)]
        return cls(str(message["worker"]), int(message["sequence"]), lines,
                   int(message.get("dropped_lines") or 0), bool(message.get("truncated")),
                   bool(message.get("eof")))


class OutputAssembler:
    """Turns a run's batches into lines, once each, with a marker where output is missing.

    Batches of one worker arrive in order (one channel to one queue); a batch
    already seen (a redelivery, or stored output printed before live output)
    is skipped.
    """

    def __init__(self, emit: Callable[[OutputLine], None]) -> None:
        self._emit = emit
        self._next: dict[str, int] = {}
        self._dropped: dict[str, int] = {}
        self._truncated = False
        self.eof: set[str] = set()

    def add(self, batch: OutputBatch) -> None:
        worker = batch.worker
        if batch.sequence < self._next.get(worker, 0):
            return
        self._next[worker] = batch.sequence + 1
        seen = self._dropped.get(worker, 0)
        if batch.dropped_lines > seen:
            self._emit(OutputLine("ledger", f"[{batch.dropped_lines - seen} lines dropped "
                                  "while the broker was busy]"))
            self._dropped[worker] = batch.dropped_lines
        for line in batch.lines:
            self._emit(line)
        if batch.truncated and not self._truncated:
            self._truncated = True
            self._emit(OutputLine("ledger", "[output truncated: the run printed more than "
                                  "its output cap]"))
        if batch.eof:
            self.eof.add(worker)
