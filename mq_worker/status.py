"""Which workers are alive: a table built from worker events, for `mq-worker status`.

The table follows `worker.started`, `worker.heartbeat`, `worker.stopped` and
`worker.lost` events. A worker is *lost* when a `worker.lost` event names it
or when it has missed `missed` heartbeats (by the interval its own events
announce), *stopped* after `worker.stopped`, and *live* otherwise. A ping on
the `mq_worker.ping` exchange (routing key `ping`, or `ping.<pool>` for one
pool) makes every worker it reaches send a heartbeat at once, so a fresh table
fills in milliseconds. Pinging needs no right to publish events, and a ping is
not an event: subscribers never see one.

Worker events are validated before they reach the table (`mq_worker.peer_events`):
one that does not follow the contract is logged and skipped.

`mq_worker.monitor.PoolMonitor` keeps a similar table inside the elected
worker of a pool, but for a different purpose: peers dropped when they stop or
are lost (the table here keeps them, marked), and monotonic times only (the
table here shows when a worker was last seen).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import aiormq.exceptions
import anyio
import structlog
from pamqp import commands as spec

from mq_worker import topology
from mq_worker.broker import Link, TlsOptions
from mq_worker.events import Event, EventType, build_event
from mq_worker.peer_events import InvalidWorkerEvent, worker_event_from
from mq_worker.subscriber import EventSubscriber

log = structlog.get_logger("mq_worker.status")

State = Literal["live", "lost", "stopped"]
WORKER_EVENTS = (
    EventType.WORKER_STARTED,
    EventType.WORKER_HEARTBEAT,
    EventType.WORKER_STOPPED,
    EventType.WORKER_LOST,
)


@dataclass
class WorkerStatus:
    """One row of the table: what a worker last said about itself."""

    name: str
    pool: str
    queues: list[str] = field(default_factory=list)
    limit: int | None = None
    in_flight: list[str] = field(default_factory=list)
    free_slots: int | None = None
    hostname: str | None = None
    heartbeat_seconds: float = 30.0
    last_seen: float | None = None  # time.time() of its last own event
    state: State = "live"
    paused: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pool": self.pool,
            "queues": self.queues,
            "limit": self.limit,
            "in_flight": self.in_flight,
            "free_slots": self.free_slots,
            "hostname": self.hostname,
            "heartbeat_seconds": self.heartbeat_seconds,
            "last_seen": (datetime.fromtimestamp(self.last_seen, UTC).isoformat()
                          if self.last_seen is not None else None),
            "state": self.state,
            "paused": self.paused,
        }


class WorkerTable:
    """Workers seen on the events exchange, optionally of one pool."""

    def __init__(self, pool: str | None = None, missed: int = 3) -> None:
        self.pool = pool
        self.missed = missed
        self.workers: dict[str, WorkerStatus] = {}

    def observe(self, event: Event, now: float | None = None) -> bool:
        """Update the table from one event; True if it was a worker event of interest."""
        if event.type not in WORKER_EVENTS:
            return False
        try:
            report = worker_event_from(event).report
        except InvalidWorkerEvent as exc:
            log.warning("worker event skipped: it does not follow the contract",
                        reason=exc.reason, from_worker=exc.worker, event_id=event.id)
            return False
        name, pool = report.worker, report.pool
        if self.pool is not None and pool != self.pool:
            return False
        now = time.time() if now is None else now
        if event.type == EventType.WORKER_LOST:
            lost = self.workers.setdefault(name, WorkerStatus(name=name, pool=pool))
            lost.state = "lost"
            return True
        row = self.workers.setdefault(name, WorkerStatus(name=name, pool=pool))
        row.pool = pool
        row.queues = list(report.queues)
        row.limit = report.limit
        row.hostname = report.hostname
        row.heartbeat_seconds = report.heartbeat_seconds
        row.last_seen = now
        paused = event.data.get("paused")
        row.paused = [str(p) for p in paused] if isinstance(paused, list) else []
        if event.type == EventType.WORKER_HEARTBEAT:
            row.in_flight = [str(r) for r in report.in_flight]
            row.free_slots = report.free_slots
        elif event.type == EventType.WORKER_STARTED:
            row.in_flight, row.free_slots = [], row.limit
        row.state = "stopped" if event.type == EventType.WORKER_STOPPED else "live"
        return True

    def check(self, now: float | None = None) -> bool:
        """Mark live workers silent for `missed` heartbeats lost; True if any changed."""
        now = time.time() if now is None else now
        changed = False
        for row in self.workers.values():
            if row.state != "live" or row.last_seen is None:
                continue
            if now - row.last_seen > self.missed * row.heartbeat_seconds:
                row.state = "lost"
                changed = True
        return changed

    def rows(self) -> list[WorkerStatus]:
        return sorted(self.workers.values(), key=lambda r: (r.pool, r.name))

    def snapshot(self) -> dict[str, Any]:
        """The table as JSON-ready data."""
        return {"time": datetime.now(UTC).isoformat(),
                "workers": [row.as_dict() for row in self.rows()]}

    def signature(self) -> tuple[Any, ...]:
        """What a reader would notice changing (not the ages)."""
        return tuple((r.name, r.pool, tuple(r.queues), r.limit, tuple(r.in_flight), r.state,
                      tuple(r.paused))
                     for r in self.rows())

    def render(self, now: float | None = None) -> str:
        """The table as aligned text."""
        now = time.time() if now is None else now
        header = ("WORKER", "POOL", "QUEUES", "LIMIT", "IN FLIGHT", "LAST SEEN", "STATE")
        lines = [header] + [
            (r.name, r.pool, ",".join(r.queues) or "-", "-" if r.limit is None else str(r.limit),
             str(len(r.in_flight)), "-" if r.last_seen is None else _ago(now - r.last_seen),
             f"{r.state} (paused: {','.join(r.paused)})" if r.paused and r.state == "live"
             else r.state)
            for r in self.rows()
        ]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
            for line in lines
        )


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


async def send_ping(urls: Sequence[str], tls: TlsOptions | None = None,
                    pool: str | None = None) -> None:
    """Ask every worker on the broker (or of `pool`) for a heartbeat now."""
    link = Link(urls, name="mq_worker status", tls=tls)
    try:
        channel = await link.channel()
        source = f"/mq_worker/status/{socket.gethostname()}-{os.getpid()}"
        ping = build_event(topology.PING, source=source, subject=None, data={})
        await channel.basic_publish(
            ping.body, exchange=topology.PING_EXCHANGE,
            routing_key=topology.ping_routing_key(pool),
            properties=spec.Basic.Properties(content_type="application/cloudevents+json",
                                             message_id=ping.id),
        )
    except aiormq.exceptions.ChannelNotFoundEntity:
        # No worker of this version has declared the ping exchange: nobody to ask.
        log.debug("no ping exchange yet", exchange=topology.PING_EXCHANGE)
    finally:
        await link.close()


async def watch(
    urls: Sequence[str],
    on_change: Callable[[WorkerTable], None],
    *,
    pool: str | None = None,
    tls: TlsOptions | None = None,
    tick: float = 0.5,
    refresh: float | None = None,
) -> None:
    """Call `on_change(table)` each time the table changes (and at least every `refresh`
    seconds, if given, so that ages shown stay current), until cancelled."""
    table = WorkerTable(pool)
    changed = anyio.Event()
    last: tuple[Any, ...] | None = None
    async with EventSubscriber(urls, types=WORKER_EVENTS, tls=tls,
                               name="mq_worker status") as events, \
            anyio.create_task_group() as tg:

        async def _follow() -> None:
            nonlocal changed
            async for event in events:
                if table.observe(event):
                    changed.set()

        async def _tick() -> None:
            nonlocal last
            since = 0.0
            while True:
                await anyio.sleep(tick)
                since += tick
                if refresh is not None and since >= refresh:
                    since, last = 0.0, None
                    changed.set()
                if table.check():
                    changed.set()

        tg.start_soon(_follow)
        tg.start_soon(_tick)
        await send_ping(urls, tls, pool)
        while True:
            await changed.wait()
            changed = anyio.Event()
            if table.signature() != last:
                last = table.signature()
                on_change(table)


async def collect(
    urls: Sequence[str],
    *,
    pool: str | None = None,
    tls: TlsOptions | None = None,
    listen: float = 1.5,
    settle: float = 0.3,
) -> WorkerTable:
    """The table of the workers that answer a ping: returned once answers have stopped
    coming for `settle` seconds (workers answer a ping within milliseconds), or after
    `listen` seconds at most."""
    seen = WorkerTable(pool)
    changed = anyio.Event()

    def _keep(table: WorkerTable) -> None:
        nonlocal seen
        seen = table
        changed.set()

    with anyio.move_on_after(listen):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: watch(urls, _keep, pool=pool, tls=tls))
            await changed.wait()
            while True:
                changed = anyio.Event()
                with anyio.move_on_after(settle) as quiet:
                    await changed.wait()
                if quiet.cancelled_caught:
                    break
            tg.cancel_scope.cancel()
    return seen
