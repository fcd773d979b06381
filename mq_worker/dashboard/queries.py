"""The dashboard's reads of the ledger beyond its read API, and the record of its actions.

Runs are listed newest first with keyset pagination on (created_at, id), the
order of the ledger's indexes, so a page costs the same on the first page of
a million runs as on the last. The dashboard adds one index of its own (run
names, for the search box) and one table (the actions taken from it).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import orjson

from mq_worker.ledger.migrations import SQLITE
from mq_worker.ledger.records import RunPage
from mq_worker.ledger.store import LedgerStore, _fetch, run_conditions

DASHBOARD_SCHEMA = [
    "CREATE INDEX IF NOT EXISTS dashboard_runs_name ON runs (name, created_at DESC, id DESC)",
    """CREATE TABLE IF NOT EXISTS dashboard_actions (
        time DOUBLE PRECISION NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL,
        actor TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS dashboard_actions_time ON dashboard_actions (time DESC)",
]
_UUID_PREFIX = re.compile(r"^[0-9a-fA-F-]{1,36}$")
# Percentiles of the last hour are computed from at most this many of its newest runs.
PERCENTILE_SAMPLE = 50_000


@dataclass(frozen=True)
class RunFilter:
    """What the runs page filters by; every field optional."""

    states: tuple[str, ...] = ()
    pool: str | None = None
    queue: str | None = None
    worker: str | None = None
    deployment: str | None = None
    tag: str | None = None
    since: float | None = None
    until: float | None = None
    search: str | None = None  # a run id (or its start), or the start of a run's name


@dataclass(frozen=True)
class MinuteStats:
    minute: int  # minutes since the start of the window
    outcomes: dict[str, int]
    delay_p50: float | None
    delay_p99: float | None
    duration_p50: float | None
    duration_p99: float | None


@dataclass(frozen=True)
class Overview:
    window_start: float
    minutes: list[MinuteStats]
    crash_reasons: dict[str, int]
    outcomes: dict[str, int]
    delay_p50: float | None
    delay_p99: float | None
    duration_p50: float | None
    duration_p99: float | None


def _percentile(values: list[float], q: float) -> float | None:
    """The `q`th percentile by nearest rank (cheap enough for every minute of an hour)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class DashboardStore(LedgerStore):
    """The ledger, with the dashboard's queries."""

    def prepare(self) -> None:
        """The ledger's schema (migrated if needed), then the dashboard's additions."""
        self.migrate()

        def create(cursor: Any) -> None:
            for statement in DASHBOARD_SCHEMA:
                cursor.execute(statement)

        self._transaction(create)

    def search_runs(self, where: RunFilter, *, limit: int = 50,
                    before: str | None = None) -> RunPage:
        clauses, args = run_conditions(
            states=where.states,
            equal={"pool": where.pool or None, "queue": where.queue or None,
                   "worker": where.worker or None, "deployment_id": where.deployment or None},
            since=where.since, until=where.until,
        )
        if where.tag:
            clauses.append("tags LIKE ? ESCAPE '\\'")
            args.append("%" + _like_escape(orjson.dumps(where.tag).decode()) + "%")
        if where.search:
            term = where.search.strip()
            if _UUID_PREFIX.fullmatch(term):
                clauses.append("((id >= ? AND id < ?) OR (name >= ? AND name < ?))")
                args.extend([term.lower(), term.lower() + "\uffff", term, term + "\uffff"])
            else:
                clauses.append("(name >= ? AND name < ?)")
                args.extend([term, term + "\uffff"])
        return self.page_of_runs(clauses, args, limit=limit, before=before)

    def overview(self, *, now: float | None = None, window: float = 3600.0) -> Overview:
        """Runs that ended in the last `window` seconds, per minute and in total."""
        now = time.time() if now is None else now
        start = now - window
        minute_expr = ("CAST((ended_at - ?) / 60 AS INTEGER)" if self.dialect is SQLITE
                       else "CAST(FLOOR((ended_at - ?) / 60) AS INTEGER)")

        # Both read only the runs that ended in the window, through the index on ended_at.
        def read(cursor: Any) -> tuple[list[Any], list[Any]]:
            counts = _fetch(cursor, self._sql(
                f"SELECT {minute_expr}, state, "
                "CASE WHEN state = 'crashed' THEN COALESCE(reason, '-') END, COUNT(*) "
                "FROM runs WHERE ended_at >= ? GROUP BY 1, 2, 3"), [start, start])
            sample = _fetch(cursor, self._sql(
                "SELECT ended_at, start_delay_seconds, duration_seconds, submitted_at FROM runs "
                "WHERE ended_at >= ? ORDER BY ended_at DESC LIMIT ?"), [start, PERCENTILE_SAMPLE])
            return counts, sample

        counts, sample = self._transaction(read, write=False)
        outcomes: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        totals: dict[str, int] = defaultdict(int)
        reasons: dict[str, int] = defaultdict(int)
        for minute, state, reason, count in counts:
            outcomes[int(minute)][state] += int(count)
            totals[state] += int(count)
            if reason is not None:
                reasons[str(reason)] += int(count)
        delays: dict[int, list[float]] = defaultdict(list)
        durations: dict[int, list[float]] = defaultdict(list)
        for ended_at, delay, duration, submitted_at in sample:
            minute = int((ended_at - start) // 60)
            if delay is not None:
                delays[minute].append(float(delay))
            if duration is None and submitted_at is not None:
                duration = ended_at - submitted_at
            if duration is not None:
                durations[minute].append(float(duration))
        minutes = [
            MinuteStats(m, dict(outcomes.get(m, {})),
                        _percentile(delays[m], 50), _percentile(delays[m], 99),
                        _percentile(durations[m], 50), _percentile(durations[m], 99))
            for m in range(int(window // 60))
        ]
        all_delays = [d for values in delays.values() for d in values]
        all_durations = [d for values in durations.values() for d in values]
        return Overview(start, minutes, dict(reasons), dict(totals),
                        _percentile(all_delays, 50), _percentile(all_delays, 99),
                        _percentile(all_durations, 50), _percentile(all_durations, 99))

    def known_queues(self, since: float, limit: int = 100_000) -> list[tuple[str, str]]:
        """(pool, queue) of the newest runs since `since`, for queue depths without the
        management API; at most `limit` runs are read."""
        rows = self._transaction(lambda c: _fetch(c, self._sql(
            "SELECT DISTINCT pool, queue FROM (SELECT pool, queue FROM runs "
            "WHERE created_at >= ? ORDER BY created_at DESC LIMIT ?) AS recent "
            "WHERE pool IS NOT NULL AND queue IS NOT NULL"), [since, limit]), write=False)
        return [(str(p), str(q)) for p, q in rows]

    def record_action(self, action: str, target: str, detail: dict[str, Any],
                      actor: str | None) -> None:
        self._transaction(lambda c: c.execute(self._sql(
            "INSERT INTO dashboard_actions (time, action, target, detail, actor) "
            "VALUES (?, ?, ?, ?, ?)"),
            (time.time(), action, target, orjson.dumps(detail).decode(), actor)))

    def actions(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self._transaction(lambda c: _fetch(c, self._sql(
            "SELECT time, action, target, detail, actor FROM dashboard_actions "
            "ORDER BY time DESC LIMIT ?"), [limit]), write=False)
        return [{"time": t, "action": a, "target": target, "detail": orjson.loads(d),
                 "actor": actor} for t, a, target, d, actor in rows]


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
