"""Every event a worker publishes, built from the data functions next to the models in
`mq_worker.events` and put in the outbox. The reporter owns the chains of `follows`:
a run event follows the run's previous event here, a worker event the worker's start."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from mq_worker import events
from mq_worker.consumer import Delivery
from mq_worker.events import CrashReason, EventType, MessageKind, OutgoingEvent, build_event
from mq_worker.fencing import worker_lost_event_id
from mq_worker.messages import RunMessage
from mq_worker.peer_events import PeerRecord
from mq_worker.workers.runs import ActiveRun, related

# The terminal events a run of this worker can end with, and the function building each.
_ENDINGS: dict[EventType, Callable[..., dict[str, Any]]] = {
    EventType.RUN_COMPLETED: events.completed_data,
    EventType.RUN_CRASHED: events.crashed_data,
    EventType.RUN_CANCELLED: events.cancelled_data,
}


@dataclass(frozen=True)
class WorkerFacts:
    """What every worker event says about the worker."""

    worker: str
    pool: str
    queues: list[str]
    type: str
    limit: int
    hostname: str
    version: str
    heartbeat_seconds: float
    paused: Callable[[], list[str]]


class Reporter:
    """Builds the events of one worker and its runs, and hands them to `put`."""

    def __init__(self, facts: WorkerFacts, put: Callable[[OutgoingEvent], None], *,
                 start_events: bool = True) -> None:
        self.facts = facts
        # Without them (`--run-events outcomes`) a run's events are its outcome alone:
        # no `pending` (also none for a run leaving to wait for a slot), no `submitted`.
        self.start_events = start_events
        self.source = events.worker_source(facts.worker)
        self._put = put
        self._started_event_id: str | None = None

    # -- runs ---------------------------------------------------------------------

    def fields(self, run: RunMessage, queue: str, resources: list[dict[str, Any]],
               follows: str | None) -> dict[str, Any]:
        """The fields every event of `run` starts with."""
        return events.run_event_data(
            run_id=run.id_text, run_name=run.name, pool=self.facts.pool, queue=queue,
            worker=self.facts.worker, related=resources, tags=run.tags, follows=follows,
            attempt=run.attempt,
        )

    def _fields_of(self, active: ActiveRun) -> dict[str, Any]:
        return self.fields(active.run, active.queue, active.related, active.last_event_id)

    def _run_event(self, active: ActiveRun, event_type: EventType, data: dict[str, Any]) -> None:
        event = build_event(event_type, source=self.source, subject=active.run.id_text, data=data,
                            traceparent=active.run.traceparent)
        active.last_event_id = event.id
        self._put(event)

    def pending(self, active: ActiveRun, *, late_by_seconds: float,
                job_variables: dict[str, Any]) -> None:
        if not self.start_events:
            return
        delivery = active.delivery
        self._run_event(active, EventType.RUN_PENDING, events.pending_data(
            self._fields_of(active), redelivered=delivery.redelivered,
            delivery_count=delivery.delivery_count,
            scheduled_start_time=active.run.scheduled_start_time,
            late_by_seconds=late_by_seconds, job_variables=job_variables,
        ))

    def waiting(self, run: RunMessage, queue: str, delivery: Delivery, target: str) -> None:
        """The run left this worker to wait for a slot of `target` (see mq_worker.slots)."""
        if not self.start_events:
            return
        due = run.scheduled_start_time.timestamp() if run.scheduled_start_time else time.time()
        data = events.pending_data(
            self.fields(run, queue, related(run, self.facts.pool, queue), None),
            redelivered=delivery.redelivered, delivery_count=delivery.delivery_count,
            scheduled_start_time=run.scheduled_start_time,
            late_by_seconds=round(max(0.0, time.time() - due), 6), waiting_for=target,
        )
        self._put(build_event(EventType.RUN_PENDING, source=self.source, subject=run.id_text,
                              data=data))

    def submitted(self, active: ActiveRun, *, late_by_seconds: float) -> None:
        if not self.start_events:
            return
        self._run_event(active, EventType.RUN_SUBMITTED, events.submitted_data(
            self._fields_of(active), infrastructure_pid=active.infrastructure_pid,
            late_by_seconds=late_by_seconds, labels=active.configuration.labels,
        ))

    def ended(self, active: ActiveRun, event_type: EventType, **fields: Any) -> None:
        """The run's terminal event: `fields` are those of `event_type`'s data function."""
        self._run_event(active, event_type, _ENDINGS[event_type](self._fields_of(active),
                                                                 **fields))

    def retrying(self, active: ActiveRun, *, status_code: int | None, message: str,
                 reason: CrashReason, next_start_time: datetime, delay_seconds: float) -> None:
        self._run_event(active, EventType.RUN_RETRYING, events.retrying_data(
            self._fields_of(active), status_code=status_code, message=message, reason=reason,
            infrastructure_pid=active.infrastructure_pid, next_attempt=active.run.attempt + 1,
            next_start_time=next_start_time, delay_seconds=delay_seconds,
        ))

    def next_attempt_fields(self, active: ActiveRun) -> dict[str, Any]:
        """The fields of the events of the run's next attempt, while it waits to be taken."""
        return {**self._fields_of(active), "attempt": active.run.attempt + 1}

    def cancelled_before_start(self, run: RunMessage, queue: str, reason: str | None) -> None:
        data = events.cancelled_data(
            self.fields(run, queue, related(run, self.facts.pool, queue), None), reason=reason)
        self._put(build_event(EventType.RUN_CANCELLED, source=self.source, subject=str(run.id),
                              data=data, traceparent=run.traceparent))

    def cancelled_while_waiting(self, run_id: UUID, fields: dict[str, Any],
                                reason: str | None) -> None:
        """A run cancelled while its next attempt waits; `fields` from `next_attempt_fields`."""
        self._put(build_event(EventType.RUN_CANCELLED, source=self.source, subject=str(run_id),
                              data=events.cancelled_data(fields, reason=reason)))

    def rejected(self, queue: str | None, reason: str, run_id: UUID | None, *,
                 run: RunMessage | None = None, kind: MessageKind = MessageKind.RUN) -> None:
        fields = events.run_event_data(
            run_id=str(run_id) if run_id else None, run_name=run.name if run else None,
            pool=self.facts.pool, queue=queue or "", worker=self.facts.worker,
            related=related(run, self.facts.pool, queue) if run and queue else [],
            tags=run.tags if run else [], follows=None, attempt=run.attempt if run else 1,
        )
        self._put(build_event(EventType.RUN_REJECTED, source=self.source,
                              subject=str(run_id) if run_id else None,
                              data=events.rejected_data(fields, reason=reason,
                                                        message_kind=kind)))

    def fenced_ending(self, active: ActiveRun, status_code: int | None) -> OutgoingEvent:
        """The `run.crashed` (worker-lost) event of a run this worker stopped when its
        heartbeats went unconfirmed: the same event, id included, a peer publishes."""
        worker = self.facts.worker
        return build_event(
            EventType.RUN_CRASHED, source=self.source, subject=str(active.id),
            event_id=worker_lost_event_id(worker, str(active.id), active.infrastructure_pid),
            data=events.crashed_data(
                self._fields_of(active), status_code=status_code,
                reason=CrashReason.WORKER_LOST,
                message=f"worker {worker} stopped the run: its heartbeats were not "
                        "confirmed long enough for peers to report it lost",
                infrastructure_pid=active.infrastructure_pid, reported_by=worker,
            ),
        )

    # -- the worker -----------------------------------------------------------------

    def _worker_fields(self) -> dict[str, Any]:
        f = self.facts
        return events.worker_data(
            worker=f.worker, pool=f.pool, queues=f.queues, type=f.type, limit=f.limit,
            hostname=f.hostname, pid=os.getpid(), version=f.version,
            heartbeat_seconds=f.heartbeat_seconds, follows=self._started_event_id,
            paused=f.paused(), run_events="all" if self.start_events else "outcomes",
        )

    def _worker_event(self, event_type: EventType, data: dict[str, Any]) -> str:
        event = build_event(event_type, source=self.source, subject=self.facts.worker, data=data)
        self._put(event)
        return event.id

    def worker_started(self) -> None:
        """Once per worker, on its first session: later worker events follow it."""
        if self._started_event_id is None:
            self._started_event_id = self._worker_event(EventType.WORKER_STARTED,
                                                         self._worker_fields())

    def worker_stopped(self) -> None:
        self._worker_event(EventType.WORKER_STOPPED, self._worker_fields())

    def heartbeat(self, runs: list[dict[str, Any]], *, free_slots: float,
                  outbox_depth: int) -> None:
        """`runs`: the runs this worker holds, as `HeartbeatRun` fields."""
        self._worker_event(EventType.WORKER_HEARTBEAT, events.heartbeat_data(
            self._worker_fields(), free_slots=free_slots, runs=runs, outbox_depth=outbox_depth))

    def worker_lost(self, peer: PeerRecord, lost_runs: Iterable[dict[str, Any]]) -> None:
        """A peer stopped sending heartbeats: it is lost, and so are the runs it ran."""
        me = self.facts.worker
        last_seen = datetime.now(UTC).timestamp() - (time.monotonic() - peer.last_seen)
        self._put(build_event(
            EventType.WORKER_LOST, source=self.source, subject=peer.name,
            data=events.worker_lost_data(
                worker=peer.name, pool=peer.pool,
                last_seen=datetime.fromtimestamp(last_seen, UTC).isoformat(),
                in_flight=[r["id"] for r in peer.runs], reported_by=me,
            ),
        ))
        for run in lost_runs:
            run_id, pid = str(run["id"]), run.get("infrastructure_pid")
            fields = events.run_event_data(
                run_id=run_id, run_name=run.get("name"), pool=peer.pool,
                queue=run.get("queue") or "", worker=peer.name, related=[], tags=[],
                follows=None, attempt=run.get("attempt", 1),
            )
            self._put(build_event(
                EventType.RUN_CRASHED, source=self.source, subject=run_id,
                event_id=worker_lost_event_id(peer.name, run_id, pid),
                data=events.crashed_data(
                    fields, reason=CrashReason.WORKER_LOST,
                    message=f"worker {peer.name} stopped sending heartbeats while the run "
                            "was running",
                    infrastructure_pid=pid, reported_by=me,
                ),
            ))
