"""Self-fencing of a worker's runs (see mq_worker.fencing): when peers may have reported
this worker lost, its runs are stopped and end as the peers report them."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any
from uuid import UUID

import anyio
import anyio.abc

from mq_worker.events import OutgoingEvent
from mq_worker.fencing import HeartbeatLease, worker_lost_ending, worker_lost_event_id
from mq_worker.outbox import Outbox
from mq_worker.workers.link import Link
from mq_worker.workers.reporter import Reporter
from mq_worker.workers.runs import ActiveRun, RunBook, RunState


class Fencing:
    """Hands over the endings of runs peers may have reported lost with this worker."""

    def __init__(self, *, book: RunBook, lease: HeartbeatLease, outbox: Outbox,
                 reporter: Reporter, link: Link, worker: str, heartbeat_seconds: float,
                 stop_soon: Callable[[ActiveRun], None], spawn: anyio.abc.TaskGroup,
                 log: Any) -> None:
        self._book = book
        self._lease = lease
        self._outbox = outbox
        self._report = reporter
        self._link = link
        self._worker = worker
        self._heartbeat_seconds = heartbeat_seconds
        self._stop_soon = stop_soon
        self._spawn = spawn
        self._log = log
        self._reported_lost: OrderedDict[str, None] = OrderedDict()

    async def watch_lease_forever(self) -> None:
        while True:
            self.check_lease()
            await anyio.sleep(min(1.0, self._heartbeat_seconds / 4))

    def check_lease(self) -> None:
        """Fence the runs of a broken lease: called before anything unconfirmed goes out."""
        at_risk = self._lease.at_risk(self._outbox.published)
        if at_risk:
            silence = time.monotonic() - self._lease.silent_since
            self._fence(at_risk, f"no heartbeat of this worker confirmed for {silence:.1f} s "
                                 "(stalled or cut off)", since=self._lease.silent_since)

    def reported_lost(self, run_ids: list[str]) -> None:
        """A peer's `run.crashed` (worker-lost) reports for runs of this worker arrived."""
        self._log.warning("a peer reported this worker lost", runs=len(run_ids))
        for run_id in run_ids:
            self._reported_lost[run_id] = None
        while len(self._reported_lost) > RunBook.MEMORY:
            self._reported_lost.popitem(last=False)
        self._fence(self._lease.confirmed_runs & set(run_ids), "a peer reported this worker lost",
                    since=time.monotonic())

    def _fence(self, run_ids: Iterable[str], why: str, *, since: float) -> None:
        """Stop runs peers may have reported lost with this worker; they end as reported."""
        for run_id in run_ids:
            active = self._book.active.get(UUID(run_id))
            if active is None or active.terminal:
                self._hand_over_ending(run_id)
                continue
            if active.fenced:
                continue
            active.fenced = True
            active.fenced_since = since
            active.log.warning("peers may have reported this run crashed with its worker; "
                               "stopping it", why=why)
            if active.state is RunState.RUNNING:
                self._stop_soon(active)
            # "starting": killed as soon as it has started (see the run keeper).

    def _hand_over_ending(self, run_id: str) -> None:
        """An ended run whose own terminal event is still unconfirmed ends as peers report it."""
        pending = self._outbox.pending_terminal(run_id)
        if pending is None:
            return
        reported = run_id in self._reported_lost
        pid = self._book.ended_pids.get(run_id)
        if pending.id == worker_lost_event_id(self._worker, run_id, pid) and not reported:
            return  # already handed over
        replacement = worker_lost_ending(pending, worker=self._worker,
                                         source=self._report.source, infrastructure_pid=pid)
        if self._outbox.replace_unconfirmed(run_id, replacement, drop=reported):
            self._log.warning("a run ended while this worker was cut off; peers may have "
                              "reported it lost, so it ends as they report it",
                              run_id=run_id, replaced=pending.type,
                              peer_report_received=reported)

    def end(self, active: ActiveRun, status_code: int | None) -> None:
        """A fenced run ended: publish its worker-lost ending unless a peer has."""
        self._spawn.start_soon(self._publish_unless_reported, active,
                               self._report.fenced_ending(active, status_code))

    async def _publish_unless_reported(self, active: ActiveRun, event: OutgoingEvent) -> None:
        # A peer's report may still be on its way: wait until this worker's
        # heartbeats are confirmed again, and a little more.
        settle = min(2.0, self._heartbeat_seconds)
        with anyio.move_on_after(self._lease.threshold + 2 * settle):
            while True:
                if self._lease.silent_for < self._heartbeat_seconds + settle:
                    break
                await anyio.sleep(0.1)
            await anyio.sleep(settle)
        if str(active.id) in self._reported_lost:
            active.log.info("run ended; a peer's worker-lost report is its terminal event")
        elif self._link.disconnected_at > active.fenced_since:
            # The broker closed this worker's connection during the silence: that is
            # what hands the election to a peer, which then reports the run. Its
            # report reached no queue of this worker.
            active.log.info("run ended; a peer has reported it with this worker "
                            "(worker-lost) while this worker was cut off")
        else:
            self._outbox.put(event)
            active.log.info("run ended", outcome="crashed", reason="worker-lost")
