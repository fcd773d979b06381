"""Self-fencing: one terminal event per run, even for a worker its peers think lost.

A peer reports a worker lost (`worker.lost`, and `run.crashed` with reason
`worker-lost` for each run its last heartbeat lists as starting or running)
when it has heard no heartbeat for `missed` intervals. A worker that was only
stalled (SIGSTOP, a paused VM, a blocked loop) or cut off from the broker
would later publish its own terminal event for those runs: two terminal events,
and an orchestrator that reschedules on `crashed` runs the job twice.

So a worker watches its own heartbeats. Each heartbeat is remembered with the
runs a peer would report from it; it counts once the broker has confirmed it.
When the last confirmed heartbeat was emitted more than the reporting
threshold ago (measured on the monotonic clock, so a stall counts in full),
peers may have reported this worker's runs: the lease is broken. The worker
then stops those runs and ends each with the same `run.crashed`
(`worker-lost`) event a peer publishes, with the same event id, so a
subscriber that deduplicates by id (as the contract asks) sees one terminal
event whoever published it. If the worker has itself received a peer's
`worker.lost` report listing the run, it publishes nothing for it.

A run that ended while the worker was cut off has its own terminal event
waiting unconfirmed in the outbox when the lease breaks. That event is
replaced in the outbox (and its spool) by the same `run.crashed`
(`worker-lost`) event a peer publishes, in the same place, or dropped if
the worker received the peer's report: the run still has one terminal event.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiormq.abc
import orjson
import structlog

from mq_worker.errors import InvalidMessage
from mq_worker.events import CrashReason, EventType, OutgoingEvent, RunEventData, build_event
from mq_worker.topology import EVENTS_EXCHANGE

log = structlog.get_logger("mq_worker.fencing")

_NAMESPACE = uuid.UUID("5b0c4f8e-7a52-4c6e-9a43-2f8d1e0b6c11")
# States of the runs in a heartbeat that a peer reports crashed when the worker is lost.
REPORTED_STATES = (None, "starting", "running")


def worker_lost_event_id(worker: str, run_id: str, infrastructure_pid: str | None) -> str:
    """The id of the `run.crashed` (`worker-lost`) event of a run: whoever publishes it,
    the lost worker's peer or the worker itself, publishes the same event."""
    return str(uuid.uuid5(_NAMESPACE, f"worker-lost/{worker}/{run_id}/{infrastructure_pid}"))


def worker_lost_ending(
    pending: OutgoingEvent, *, worker: str, source: str, infrastructure_pid: str | None
) -> OutgoingEvent:
    """The `run.crashed` (`worker-lost`) event that takes the place of `pending`, a run's
    own terminal event not yet confirmed when peers may have reported the run lost."""
    envelope = orjson.loads(pending.body)
    original = envelope.get("data") or {}
    run_id = str(pending.run_id)
    data = {
        **{key: original.get(key) for key in (*RunEventData.model_fields, "status_code")},
        "reason": CrashReason.WORKER_LOST,
        "message": f"worker {worker} was cut off from the broker when the run ended; "
                   "peers may have reported it lost, so it ends as they report it",
        "infrastructure_pid": infrastructure_pid,
        "reported_by": worker,
    }
    return build_event(EventType.RUN_CRASHED, source=source, subject=run_id,
                       event_id=worker_lost_event_id(worker, run_id, infrastructure_pid),
                       data=data, traceparent=envelope.get("traceparent"))


@dataclass(frozen=True)
class _Heartbeat:
    position: int  # its place in the outbox: confirmed once that many events are
    emitted_at: float
    runs: frozenset[str]


class HeartbeatLease:
    """Whether this worker's peers may have reported it lost, judged by its own heartbeats."""

    def __init__(self, threshold_seconds: float, now: float | None = None) -> None:
        self.threshold = threshold_seconds
        self._pending: deque[_Heartbeat] = deque()
        # When the silence that last broke the lease began (monotonic).
        self.silent_since = 0.0
        self._confirmed = _Heartbeat(0, time.monotonic() if now is None else now, frozenset())

    def emitted(
        self, position: int, runs: Iterable[str], *, has_peers: bool, now: float | None = None
    ) -> None:
        """A heartbeat listing `runs` (those a peer would report) was put at `position`.

        Without peers (`has_peers` false) nobody can report them: they are not at risk.
        """
        now = time.monotonic() if now is None else now
        self._pending.append(_Heartbeat(position, now, frozenset(runs) if has_peers
                                        else frozenset()))

    def at_risk(self, confirmed_count: int, now: float | None = None) -> frozenset[str]:
        """The runs peers may have reported lost (empty while the lease holds).

        `confirmed_count` is how many events of the outbox the broker has confirmed.
        The check comes before the newly confirmed heartbeats are counted: their
        confirmation happened at some point up to now, so a gap is never missed.
        """
        now = time.monotonic() if now is None else now
        broken = now - self._confirmed.emitted_at > self.threshold
        at_risk = self._confirmed.runs if broken else frozenset()
        if broken:
            self.silent_since = self._confirmed.emitted_at
        while self._pending and self._pending[0].position < confirmed_count:
            self._confirmed = self._pending.popleft()
        return at_risk

    @property
    def confirmed_runs(self) -> frozenset[str]:
        """The runs a peer reports if it reports this worker lost now."""
        return self._confirmed.runs

    @property
    def silent_for(self) -> float:
        """Seconds since the last confirmed heartbeat was emitted."""
        return time.monotonic() - self._confirmed.emitted_at


async def follow_own_reports(
    channel: aiormq.abc.AbstractChannel, worker: str, on_report: Callable[[list[str]], None],
    *, verify: Callable[[bytes, Mapping[str, Any]], None] | None = None,
    on_refused: Callable[[], None] = lambda: None,
) -> None:
    """Call `on_report(run ids)` for each `worker.lost` a peer publishes about `worker`;
    with `verify`, only for those it passes (signed by a peer: see mq_worker.signing)."""
    private = await channel.queue_declare("", exclusive=True, auto_delete=True)
    assert private is not None and private.queue

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        try:
            event = orjson.loads(message.body)
            data = event.get("data") or {}
            if event.get("subject") != worker or data.get("worker") != worker:
                return
            if verify is not None:
                try:
                    verify(message.body, message.header.properties.headers or {})
                except InvalidMessage as exc:
                    on_refused()
                    log.warning("unsigned or forged worker.lost ignored", reason=exc.reason)
                    return
            runs = data.get("in_flight") or []
            on_report([str(r) for r in runs if isinstance(r, str)])
        except (orjson.JSONDecodeError, AttributeError, TypeError):
            log.warning("unreadable worker.lost event ignored")

    await channel.queue_bind(private.queue, EVENTS_EXCHANGE, routing_key=EventType.WORKER_LOST)
    await channel.basic_consume(private.queue, on_message, no_ack=True)
