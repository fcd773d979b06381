"""What a newly elected reporter keeps while it replays its pool's heartbeat stream.

The replay can be long (many peers, a few heartbeat intervals each), so events are
not validated as they come: each peer's are kept as bytes, consecutive heartbeats
folded into the last one, and parsed once the replay ends (`mq_worker.monitor`
applies them then, with no await in between, and follows live events after).
Copies published late (older, by their own time, than what the stream held when
they came) are skipped, as the reporter elected at the time refused them live.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import orjson

from mq_worker.events import EventType
from mq_worker.peer_events import InvalidWorkerEvent, WorkerEvent, parse_worker_event

# A live worker event older than this (by its own time) is refused, not taken as news.
STALE_AFTER_SECONDS = 60.0
# Events of one peer kept from a replay, besides consecutive heartbeats (folded into one).
MAX_REPLAYED_PER_PEER = 64


class ReplayedEvents:
    """The worker events of one replay, per peer, bounded by `max_peers` peers."""

    def __init__(self, max_peers: int, on_refused: Callable[[str], None]) -> None:
        self.max_peers = max_peers
        # A new name when `max_peers` are kept already: most likely a flood of forged names.
        self._on_refused = on_refused
        # Wall-clock times: where the replay starts, and the newest event time it has read.
        self.start_from = float("-inf")
        self._clock = float("-inf")
        self.by_worker: dict[str, list[tuple[str, bytes]]] = {}

    def start(self, start_from: float) -> None:
        self.by_worker.clear()
        self.start_from = self._clock = start_from

    def keep(self, body: bytes, now: float) -> None:
        """Keep a replayed event for the end of the replay (`now`: this worker's wall
        clock); of a worker's consecutive heartbeats only the last, so that a long replay
        validates few of them."""
        try:
            raw = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        data = raw.get("data") if isinstance(raw, dict) else None
        worker = data.get("worker") if isinstance(data, dict) else None
        kind = raw.get("type") if isinstance(raw, dict) else None
        if not isinstance(worker, str) or not isinstance(kind, str):
            return  # reported, if at all, by whoever was elected when it came
        if self._late_copy(raw.get("time"), now):
            return  # refused live by whoever was elected when it came
        events = self.by_worker.get(worker)
        if events is None:
            if len(self.by_worker) >= self.max_peers:
                self._on_refused(worker)
                return
            events = self.by_worker[worker] = []
        if kind == EventType.WORKER_HEARTBEAT and events and events[-1][0] == kind:
            events[-1] = (kind, body)
        else:
            events.append((kind, body))
            if len(events) > MAX_REPLAYED_PER_PEER:
                del events[0]  # only a flood has that many starts and stops in a replay

    def _late_copy(self, sent: Any, now: float) -> bool:
        """Whether a replayed event is older, by its own time, than what the stream held
        when it was published: a copy published late, as the live check refuses."""
        try:
            when = datetime.fromisoformat(sent).timestamp() if isinstance(sent, str) else None
        except (ValueError, OverflowError):
            when = None
        if when is None:
            return False  # parsing at the end of the replay refuses it
        # Capped at our own clock: a sender far ahead must not make everyone else look old.
        self._clock = max(self._clock, self.start_from, min(when, now))
        return when < self._clock - STALE_AFTER_SECONDS

    def drain(self) -> Iterator[WorkerEvent]:
        """The valid events kept, each peer's in the order read; none are kept after."""
        for events in self.by_worker.values():
            for _, body in events:
                try:
                    yield parse_worker_event(body)
                except InvalidWorkerEvent:
                    continue
        self.by_worker.clear()
