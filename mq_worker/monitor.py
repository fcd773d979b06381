"""Who is alive: heartbeats of a pool's workers, and reporting the ones that are lost.

Every worker follows the worker events of its pool (started, heartbeat,
stopped, lost) on a private queue, so each keeps the table of its peers and
their runs. Exactly one of them reports lost workers: the single active
consumer of the pool's monitor queue, which receives the heartbeats and so
knows it is elected. When a worker misses `missed` heartbeats, the elected
one publishes `worker.lost` and a `run.crashed` (reason `worker-lost`) for
each run of its last heartbeat. If the elected worker dies, the broker hands
the queue to another, whose table is already complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiormq.abc
import anyio
import orjson
import structlog

from mq_worker.broker import deliver_frame
from mq_worker.events import EventType
from mq_worker.topology import EVENTS_EXCHANGE, monitor_queue_arguments, monitor_queue_name

log = structlog.get_logger("mq_worker.monitor")

PING = "mq_worker.worker.ping"


@dataclass
class PeerRecord:
    """The last we heard from a worker."""

    name: str
    pool: str
    last_seen: float
    heartbeat_seconds: float
    data: dict[str, Any] = field(default_factory=dict)
    lost: bool = False

    @property
    def runs(self) -> list[dict[str, Any]]:
        runs = self.data.get("runs")
        if isinstance(runs, list):
            return runs
        return [{"id": run_id} for run_id in self.data.get("in_flight", [])]


class PoolMonitor:
    def __init__(
        self,
        *,
        pool: str,
        me: str,
        missed: int = 3,
        on_lost: Callable[[PeerRecord], None],
        on_ping: Callable[[], None] | None = None,
    ) -> None:
        self.pool = pool
        self.me = me
        self.missed = missed
        self.peers: dict[str, PeerRecord] = {}
        self._on_lost = on_lost
        self._on_ping = on_ping
        self._elected_until = 0.0

    @property
    def elected(self) -> bool:
        return time.monotonic() < self._elected_until

    async def run(self, channel: aiormq.abc.AbstractChannel, heartbeat_seconds: float) -> None:
        """Follow worker events and check for lost workers until cancelled."""
        private = await channel.queue_declare("", exclusive=True, auto_delete=True)
        assert private is not None and private.queue
        await channel.queue_bind(private.queue, EVENTS_EXCHANGE, routing_key="mq_worker.worker.*")
        await channel.basic_consume(private.queue, self._on_event, no_ack=True)

        election = monitor_queue_name(self.pool)
        await channel.queue_declare(election, durable=True, arguments=monitor_queue_arguments())
        await channel.queue_bind(election, EVENTS_EXCHANGE, routing_key=EventType.WORKER_HEARTBEAT)

        async def on_elected_delivery(message: aiormq.abc.DeliveredMessage) -> None:
            self._elected_until = time.monotonic() + 2.5 * heartbeat_seconds

        await channel.basic_consume(election, on_elected_delivery, no_ack=True)
        while True:
            await anyio.sleep(max(0.2, heartbeat_seconds / 2))
            self.check()

    def observe(self, event: dict[str, Any], now: float | None = None) -> None:
        """Update the table from one worker event."""
        data = event.get("data") or {}
        name, pool = data.get("worker"), data.get("pool")
        if not isinstance(name, str) or pool != self.pool:
            return
        kind = event.get("type")
        now = time.monotonic() if now is None else now
        if kind in (EventType.WORKER_STOPPED, EventType.WORKER_LOST):
            self.peers.pop(name, None)
        elif kind in (EventType.WORKER_STARTED, EventType.WORKER_HEARTBEAT):
            previous = self.peers.get(name)
            if kind == EventType.WORKER_STARTED and previous and previous.runs and name != self.me:
                # It restarted before anyone noticed it was gone: its runs are lost all the same.
                previous.lost = True
                if self.elected:
                    self._on_lost(previous)
            self.peers[name] = PeerRecord(
                name=name,
                pool=pool,
                last_seen=now,
                heartbeat_seconds=float(data.get("heartbeat_seconds") or 30.0),
                data=data,
            )

    def check(self, now: float | None = None) -> list[PeerRecord]:
        """Mark peers silent for `missed` heartbeats lost; report them if elected."""
        now = time.monotonic() if now is None else now
        lost = []
        for record in list(self.peers.values()):
            if record.name == self.me:
                continue
            if now - record.last_seen > self.missed * record.heartbeat_seconds:
                record.lost = True
                if self.elected:
                    del self.peers[record.name]
                    lost.append(record)
                    self._on_lost(record)
        return lost

    async def _on_event(self, message: aiormq.abc.DeliveredMessage) -> None:
        if deliver_frame(message).routing_key == PING:
            if self._on_ping:
                self._on_ping()
            return
        try:
            event = orjson.loads(message.body)
        except orjson.JSONDecodeError:
            return
        if isinstance(event, dict):
            self.observe(event)
