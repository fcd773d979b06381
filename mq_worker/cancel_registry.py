"""The registry of a worker's cancels: every cancel of the retention window, in little memory.

A window can hold hundreds of thousands of cancels, nearly all of them bare run
ids with the time they came. So the registry keeps a run id as the integer of
its UUID (no UUID object, no record object per cancel) mapped to the time,
plus a deque of ids in order of arrival for expiry; the rare reason or
"reported" flag lives in a side table. About 110 bytes a cancel, measured by
`benchmarks.cancel --replay`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from uuid import UUID

import structlog

log = structlog.get_logger("mq_worker.cancellation")

DEFAULT_WINDOW_SECONDS = 30 * 24 * 3600
DEFAULT_MAX_ENTRIES = 1_000_000


@dataclass(frozen=True, slots=True)
class CancelRecord:
    run_id: UUID
    reason: str | None
    at: float
    reported: bool = False  # a worker has published the run's `cancelled` event already


class CancelRegistry:
    """The cancels of the retention window, at most `max_entries` of them."""

    def __init__(
        self,
        window_seconds: float = DEFAULT_WINDOW_SECONDS,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self.window_seconds = window_seconds
        self.max_entries = max_entries
        self._at: dict[int, float] = {}
        self._order: deque[int] = deque()
        # Only for cancels that have them: (reason, reported).
        self._notes: dict[int, tuple[str | None, bool]] = {}
        # Cancels of one burst share their (whole-second) broker timestamp: one float for all.
        self._last_at = 0.0

    def __len__(self) -> int:
        return len(self._at)

    def add(self, record: CancelRecord, now: float | None = None) -> bool:
        """Remember `record`; False if its run was already cancelled."""
        key = record.run_id.int
        if key in self._at:
            return False
        at = record.at
        if at == self._last_at:
            at = self._last_at
        else:
            self._last_at = at
        self._at[key] = at
        self._order.append(key)
        if record.reason is not None or record.reported:
            self._notes[key] = (record.reason, record.reported)
        self._expire(time.time() if now is None else now)
        return True

    def get(self, run_id: UUID) -> CancelRecord | None:
        key = run_id.int
        at = self._at.get(key)
        if at is None:
            return None
        reason, reported = self._notes.get(key, (None, False))
        return CancelRecord(run_id, reason, at, reported)

    def mark_reported(self, run_id: UUID) -> None:
        key = run_id.int
        if key in self._at:
            self._notes[key] = (self._notes.get(key, (None, False))[0], True)

    def rows(self) -> list[tuple[int, float, str | None, bool]]:
        """(run id as integer, when, reason, reported) of every cancel held, oldest first."""
        notes, at = self._notes, self._at
        return [(key, at[key], *notes.get(key, (None, False))) for key in self._order]

    def restore(self, rows: Iterable[tuple[int, float, str | None, bool]],
                now: float | None = None) -> int:
        """Add `rows` (as `rows()` gives them) not yet held and within the window; return
        how many were added."""
        horizon = (time.time() if now is None else now) - self.window_seconds
        added = 0
        shared = self._last_at
        for key, at, reason, reported in rows:
            if at < horizon or key in self._at:
                continue
            if at != shared:
                shared = float(at)
            self._at[key] = shared
            self._order.append(key)
            if reason is not None or reported:
                self._notes[key] = (reason, reported)
            added += 1
        self._last_at = shared
        self._expire(time.time() if now is None else now)
        return added

    def records(self) -> Iterator[CancelRecord]:
        """Every cancel held, oldest first."""
        for key in self._order:
            reason, reported = self._notes.get(key, (None, False))
            yield CancelRecord(UUID(int=key), reason, self._at[key], reported)

    def _expire(self, now: float) -> None:
        horizon = now - self.window_seconds
        order = self._order
        while order:
            oldest = order[0]
            at = self._at[oldest]
            if at >= horizon and len(order) <= self.max_entries:
                break
            order.popleft()
            del self._at[oldest]
            self._notes.pop(oldest, None)
            if at >= horizon:
                log.warning("cancel registry full: forgetting the oldest cancel",
                            max_entries=self.max_entries)
