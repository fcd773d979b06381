"""A worker's heartbeats, its watch over its peers' (the elected reporter of lost workers),
and the lease its own confirmed heartbeats give it (see mq_worker.fencing)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio

from mq_worker.events import MessageKind
from mq_worker.fencing import REPORTED_STATES, HeartbeatLease
from mq_worker.invalid_events import InvalidWorkerEvents
from mq_worker.monitor import PoolMonitor
from mq_worker.outbox import Outbox
from mq_worker.peer_events import PeerRecord
from mq_worker.signing import Signer
from mq_worker.workers.link import Link
from mq_worker.workers.reporter import Reporter
from mq_worker.workers.runs import RunBook


class Heartbeats:
    def __init__(self, *, book: RunBook, link: Link, reporter: Reporter, outbox: Outbox,
                 free_slots: Callable[[], float], pool: str, worker: str,
                 heartbeat_seconds: float, max_peers: int, signer: Signer | None,
                 log: Any) -> None:
        self._book = book
        self._link = link
        self._report = reporter
        self._outbox = outbox
        self._free_slots = free_slots
        self._worker = worker
        self.seconds = heartbeat_seconds
        self._log = log
        # With a key, worker events are acted on only when signed (see mq_worker.signing).
        self.verify = signer.worker_event_verifier(pool) if signer else None
        self.monitor = PoolMonitor(
            pool=pool, me=worker, on_lost=self._report_lost, on_ping=self.beat,
            max_peers=max_peers, verify=self.verify,
            sign=signer.worker_event_headers(pool) if signer else None,
            on_invalid=InvalidWorkerEvents(
                pool=pool, me=worker,
                publisher=lambda: link.current.publish if link.current else None,
                emit=lambda reason: reporter.rejected(None, reason, None,
                                                      kind=MessageKind.WORKER_EVENT),
            ),
        )
        # Margin: the lease breaks a little before a peer's report can come.
        self.lease = HeartbeatLease(
            self.monitor.missed * heartbeat_seconds - min(1.0, 0.1 * heartbeat_seconds)
        )

    def beat(self) -> None:
        """Publish a heartbeat listing the runs this worker holds (when connected)."""
        if not self._link.connected:
            return
        runs = [
            {
                "id": str(a.id),
                "name": a.run.name,
                "queue": a.queue,
                "state": a.state,
                "infrastructure_pid": a.infrastructure_pid,
                "attempt": a.run.attempt,
            }
            for a in self._book.active.values()
        ]
        self._report.heartbeat(runs, free_slots=self._free_slots(),
                               outbox_depth=len(self._outbox))
        self.lease.emitted(
            self._outbox.published + len(self._outbox) - 1,
            [str(r["id"]) for r in runs if r["state"] in REPORTED_STATES],
            has_peers=self._has_peers(),
        )

    async def beat_forever(self) -> None:
        while True:
            self.beat()
            await anyio.sleep(self.seconds)

    def _report_lost(self, peer: PeerRecord) -> None:
        """Called on the elected worker when a peer of the pool is lost."""
        lost_runs = [r for r in peer.runs if r.get("state") in REPORTED_STATES]
        self._log.warning("worker lost", lost_worker=peer.name, runs=len(lost_runs))
        self._report.worker_lost(peer, lost_runs)

    def _has_peers(self) -> bool:
        """Whether another worker of the pool could report this one lost.

        Only the elected reporter watches heartbeats, so it knows its peers; any other
        worker knows that the elected one (another worker) would report it.
        """
        return not self.monitor.elected or any(
            name != self._worker and not peer.lost
            for name, peer in self.monitor.peers.items())
