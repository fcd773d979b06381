"""Who is alive: heartbeats of a pool's workers, and reporting the ones that are lost.

Exactly one worker of a pool, the elected reporter (`mq_worker.election`),
follows its pool's worker events (started, heartbeat, stopped, lost); the
others receive none of them, so an idle worker's cost does not grow with the
number of its peers, and per heartbeat interval the broker delivers one message
per worker of the pool to the reporter.

Workers publish their worker events once, on `mq_worker.events` (routing key =
event type, for subscribers) with the extra routing key `workers.<pool>` (a
`BCC` header), which puts them in the pool's stream `mq_worker.heartbeats-<pool>`.
A newly elected reporter replays that stream from a few heartbeat intervals
back (up to a marker of its own, so it knows where the present begins), so it
needs no table of its own beforehand: it finds a peer that died before it was
elected, and skips peers that stopped or were already reported (what it keeps
while replaying: `mq_worker.heartbeat_replay`). When a peer
misses `missed` heartbeats, the reporter publishes `worker.lost` and a
`run.crashed` (reason `worker-lost`) for each run of its last heartbeat.

Peers' times come from arrival for live events; for replayed ones, from the
event's own time, but never less than `missed - 1.5` intervals before the
takeover, so a peer whose clock lags gets time to be heard live before it is
judged.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import aiormq.abc
import anyio
import anyio.abc
import orjson
import structlog
from pamqp import commands as spec

from mq_worker.broker import delivery_tag, raise_on_server_cancel
from mq_worker.election import ReporterElection
from mq_worker.errors import InvalidMessage
from mq_worker.events import CONTENT_TYPE, EventType
from mq_worker.heartbeat_replay import STALE_AFTER_SECONDS, ReplayedEvents
from mq_worker.peer_events import (
    DEFAULT_MAX_PEERS,
    InvalidWorkerEvent,
    PeerRecord,
    WorkerEvent,
    is_restart,
    parse_worker_event,
)
from mq_worker.pings import PingAnswerer
from mq_worker.topology import (
    MARKER_HEADER,
    STREAM_OFFSET,
    declare_monitor,
    heartbeat_stream_name,
)
from mq_worker.wire_decoding import header_text

log = structlog.get_logger("mq_worker.monitor")

_MARKER_CONFIRM_TIMEOUT = 15.0
# However fast a peer says it beats, the reporter checks no more often than this.
MIN_CHECK_SECONDS = 0.2
_PREFETCH = 1000


class PoolMonitor:
    def __init__(
        self,
        *,
        pool: str,
        me: str,
        missed: int = 3,
        on_lost: Callable[[PeerRecord], None],
        on_ping: Callable[[], None] | None = None,
        on_invalid: Callable[[InvalidWorkerEvent, bytes], Awaitable[None]] | None = None,
        max_peers: int = DEFAULT_MAX_PEERS,
        verify: Callable[[bytes, Mapping[str, Any]], None] | None = None,
        sign: Callable[[bytes], dict[str, str]] | None = None,
    ) -> None:
        self.pool = pool
        self.max_peers = max_peers
        # With a signing key: events that `verify` refuses are never acted on, and the
        # copies this worker puts back into a stream declared anew are signed with `sign`.
        self._verify = verify
        self._sign = sign
        # Worker events of names beyond `max_peers`, refused since this worker started.
        self.refused_peers = 0
        self._refusals_logged_at = float("-inf")
        self.me = me
        self.missed = missed
        self.peers: dict[str, PeerRecord] = {}
        self._on_lost = on_lost
        self._on_invalid = on_invalid
        self._pings = PingAnswerer(pool, on_ping or (lambda: None))
        self._election = ReporterElection(pool, me)
        self._marker = ""
        self._caught_up = anyio.Event()
        self._takeover = 0.0
        self._replay = ReplayedEvents(
            max_peers, on_refused=lambda name: self._refuse_peer(name, time.monotonic()))
        self._pace = float("inf")
        # Set when a peer beating faster than the checks go appears: check at its pace now,
        # not after a sleep chosen for slower peers.
        self._faster_peer = anyio.Event()
        # The tag of this session's consumer of the heartbeat stream, and whether the
        # broker cancelled it (the stream was deleted, and its history with it).
        self._stream_consumer: str | None = None
        self._stream_lost = False

    @property
    def elected(self) -> bool:
        return self._election.elected

    @property
    def replaying(self) -> bool:
        return self.elected and not self._caught_up.is_set()

    async def run(
        self,
        channel: aiormq.abc.AbstractChannel,
        heartbeat_seconds: float,
        publisher: aiormq.abc.AbstractChannel,
    ) -> None:
        """Answer pings, take part in the election and, once elected, report lost
        peers, until cancelled."""
        await declare_monitor(publisher, self.pool)
        await self._carry_over(publisher)
        self.peers.clear()
        self._replay.start(float("-inf"))
        self._election = ReporterElection(self.pool, self.me)
        self._caught_up = anyio.Event()
        # A channel of its own: the held token must not be caught by another
        # consumer's acknowledgement of many deliveries at once.
        # It ends with the session's connection, which the worker closes.
        own = await channel.connection.channel()
        await own.basic_qos(prefetch_count=_PREFETCH)
        own.on_consumer_cancel_callbacks.add(self._on_consumer_cancel)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch, own)
            # The heartbeat stream or the election queue deleted under the reporter: it
            # would hear nobody and report everyone lost. The session starts again instead.
            tg.start_soon(raise_on_server_cancel, own, "the heartbeat stream or the election")
            await tg.start(self._pings.run, channel)
            await tg.start(self._election.run, own, publisher)
            await self._election.won.wait()
            await self._take_over(own, publisher, heartbeat_seconds)
            while True:
                self.check()
                self._pace = self.check_every(heartbeat_seconds)
                self._faster_peer = anyio.Event()
                with anyio.move_on_after(self._pace):
                    await self._faster_peer.wait()

    def _on_consumer_cancel(self, frame: Any) -> None:
        if self._stream_consumer is not None and frame.consumer_tag == self._stream_consumer:
            self._stream_lost = True

    async def _carry_over(self, publisher: aiormq.abc.AbstractChannel) -> None:
        """Put back into a heartbeat stream declared anew each peer's last event, as this
        worker read it as the reporter: else whoever is elected next replays an empty
        stream, and a peer that dies before its next heartbeat reaches it is never
        reported. Only the stream gets the copies, not subscribers."""
        if not self._stream_lost:
            return
        self._stream_lost = False
        known = [r.event.body for r in self.peers.values()
                 if r.name != self.me and not r.lost and r.event.body]
        stream = heartbeat_stream_name(self.pool)
        for body in known:
            await publisher.basic_publish(
                body, exchange="", routing_key=stream,
                properties=spec.Basic.Properties(
                    content_type=CONTENT_TYPE, delivery_mode=2,
                    headers=dict[str, Any](self._sign(body)) if self._sign else None),
                timeout=_MARKER_CONFIRM_TIMEOUT,
            )
        if known:
            log.info("heartbeat stream declared anew; put back the last event of each peer",
                     peers=len(known))

    def check_every(self, heartbeat_seconds: float) -> float:
        """Seconds between checks: half the shortest interval watched, this worker's own
        included (peers may beat faster than it), but never so short as to spin."""
        fastest = min((p.heartbeat_seconds for p in self.peers.values()),
                      default=heartbeat_seconds)
        return max(MIN_CHECK_SECONDS, min(heartbeat_seconds, fastest) / 2)

    @staticmethod
    async def _watch(channel: aiormq.abc.AbstractChannel) -> None:
        await channel.closing
        raise ConnectionError("the broker closed the monitor's channel")

    async def _take_over(
        self,
        channel: aiormq.abc.AbstractChannel,
        publisher: aiormq.abc.AbstractChannel,
        heartbeat_seconds: float,
    ) -> None:
        """Replay the pool's recent worker events, then follow them live."""
        self._takeover = time.monotonic()
        lookback = min(max(60.0, (self.missed + 1) * heartbeat_seconds), 3000.0)
        stream = heartbeat_stream_name(self.pool)
        self._marker = uuid.uuid4().hex
        replay_from = time.time() - lookback
        self._replay.start(replay_from)
        offset = datetime.fromtimestamp(replay_from, tz=UTC)
        consume = await channel.basic_consume(
            stream, self._on_stream_message, arguments={STREAM_OFFSET: offset}
        )
        self._stream_consumer = consume.consumer_tag
        # Published now, the marker comes after every event already in the stream.
        await publisher.basic_publish(
            b"", exchange="", routing_key=stream,
            properties=spec.Basic.Properties(headers={MARKER_HEADER: self._marker}),
            timeout=_MARKER_CONFIRM_TIMEOUT,
        )
        with anyio.move_on_after(max(10.0, 2 * heartbeat_seconds)):
            await self._caught_up.wait()
        self._finish_replay()
        log.info("reporter has caught up with its pool's heartbeats", peers=len(self.peers),
                 seconds=round(time.monotonic() - self._takeover, 3))
        for record in list(self.peers.values()):
            if record.restarted_from is not None and not record.restart_reported:
                record.restart_reported = True
                self._on_lost(record.restarted_from)

    async def _on_stream_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        await message.channel.basic_ack(delivery_tag(message), wait=False)
        headers = message.header.properties.headers or {}
        marker = headers.get(MARKER_HEADER)
        if marker is not None:
            if header_text(marker) == self._marker:
                self._finish_replay()
            return
        live = self._caught_up.is_set()
        try:
            if self._verify is not None:
                self._verified(message.body, headers)
            if not live:
                self._replay.keep(message.body, now=time.time())
                return
            event = parse_worker_event(message.body)
            if event.report.pool != self.pool:
                raise InvalidWorkerEvent(
                    f"an event of pool {event.report.pool!r} on the stream of pool "
                    f"{self.pool!r}", event.report.worker)
            age = time.time() - event.time.timestamp()
            if age > STALE_AFTER_SECONDS:
                # Taken as news, an old copy would make a long-gone worker look alive,
                # then lost, with the runs it once held.
                raise InvalidWorkerEvent(
                    f"published {age:.0f} s ago: a copy of an old event, or its sender's "
                    "clock is far behind", event.report.worker)
        except InvalidWorkerEvent as exc:
            # Replayed ones were reported by whoever was elected when they came.
            if live and self._on_invalid is not None:
                await self._on_invalid(exc, message.body)
            return
        self.observe(event, live=live)

    def _verified(self, body: bytes, headers: Mapping[str, Any]) -> None:
        assert self._verify is not None
        try:
            self._verify(body, headers)
        except InvalidMessage as exc:
            worker = None
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                worker = (orjson.loads(body).get("data") or {}).get("worker")
            raise InvalidWorkerEvent(exc.reason, worker if isinstance(worker, str) else None
                                     ) from None

    def _finish_replay(self) -> None:
        """Apply the replayed events, then follow live ones (no await in between)."""
        if self._caught_up.is_set():
            return
        for event in self._replay.drain():
            self.observe(event, live=False)
        self._caught_up.set()

    def observe(self, event: WorkerEvent, now: float | None = None, live: bool = True) -> None:
        """Update the table from one validated worker event of this pool."""
        report = event.report
        name = report.worker
        if report.pool != self.pool:
            return
        now = time.monotonic() if now is None else now
        if event.type == EventType.WORKER_STOPPED:
            self.peers.pop(name, None)
        elif event.type == EventType.WORKER_LOST:
            record = self.peers.get(name)
            if record is not None and record.restarted_from is not None:
                # The report was about its earlier run, not about this one.
                record.restarted_from, record.restart_reported = None, False
            else:
                self.peers.pop(name, None)
        elif event.type in (EventType.WORKER_STARTED, EventType.WORKER_HEARTBEAT):
            previous = self.peers.get(name)
            if previous is None and len(self.peers) >= self.max_peers:
                self._refuse_peer(name, now)
                return
            if (event.type == EventType.WORKER_HEARTBEAT and previous is not None
                    and event.time < previous.event.time):
                return  # a copy of an earlier heartbeat: it says nothing of now
            record = PeerRecord(
                name=name, pool=report.pool, heartbeat_seconds=report.heartbeat_seconds,
                last_seen=now if live else self._replayed_time(event, now), event=event,
            )
            if previous is not None and previous.restarted_from is not None:
                record.restarted_from = previous.restarted_from
                record.restart_reported = previous.restart_reported
            if (event.type == EventType.WORKER_STARTED and previous is not None
                    and not is_restart(event, previous.event)):
                return  # nothing new: a copy (republished, or replayed by anyone)
            if (event.type == EventType.WORKER_STARTED and previous is not None
                    and previous.runs and name != self.me):
                # It restarted before anyone noticed it was gone: its runs are lost all the same.
                previous.lost = True
                record.restarted_from = previous
                if live and self.elected:
                    record.restart_reported = True
                    self._on_lost(previous)
            self.peers[name] = record
            if max(MIN_CHECK_SECONDS, record.heartbeat_seconds / 2) < self._pace:
                self._faster_peer.set()

    def _refuse_peer(self, name: str, now: float) -> None:
        """A new name when the table is full: a flood of forged names, most likely."""
        self.refused_peers += 1
        if now - self._refusals_logged_at >= STALE_AFTER_SECONDS:
            self._refusals_logged_at = now
            log.warning("worker event of a new worker refused: the reporter already follows "
                        "its most workers", from_worker=name[:256], max_peers=self.max_peers,
                        refused_so_far=self.refused_peers)

    def _replayed_time(self, event: WorkerEvent, now: float) -> float:
        age = max(0.0, time.time() - event.time.timestamp())
        floor = self._takeover - (self.missed - 1.5) * event.report.heartbeat_seconds
        return max(now - age, floor)

    def check(self, now: float | None = None) -> list[PeerRecord]:
        """Report peers silent for `missed` heartbeats (only once elected and caught up)."""
        if not self.elected or self.replaying:
            return []
        now = time.monotonic() if now is None else now
        lost = []
        for record in list(self.peers.values()):
            if record.name == self.me:
                continue
            if now - record.last_seen > self.missed * record.heartbeat_seconds:
                record.lost = True
                del self.peers[record.name]
                lost.append(record)
                self._on_lost(record)
        return lost
