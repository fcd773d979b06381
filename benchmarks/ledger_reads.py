"""Ledger reads on a large ledger: the queries of `mq-worker runs` and a dashboard on N runs.

    .venv/bin/python -m benchmarks.ledger_reads [--runs 1000000] [--db sqlite,postgresql]

A fresh database (an SQLite file, or a PostgreSQL database `mqw_bench_<uuid>` dropped
afterwards) gets the ledger's schema and N runs spread over 30 days (6 states, 10 pools,
5 queues, 40 workers, 100 deployments), inserted directly. Then each query of the read API
(`LedgerStore.list_runs` with its filters, a page deep in the keyset pagination, `get_run`)
is timed 20 times; the median and the slowest are reported.
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from benchmarks.common import command_line, percentile, print_table, run_benchmark
from benchmarks.ledger import database
from mq_worker.ledger.records import RUN_COLUMNS, STATES
from mq_worker.ledger.store import LedgerStore

DAY = 86400.0


def _rows(count: int, now: float) -> list[tuple[Any, ...]]:
    rng = random.Random(7)
    rows = []
    for _ in range(count):
        created = now - rng.random() * 30 * DAY
        state = rng.choice(STATES)
        values = {c: None for c in RUN_COLUMNS}
        values.update(
            id=str(uuid.UUID(int=rng.getrandbits(128))), name="nightly",
            pool=f"pool{rng.randrange(10)}", queue=f"q{rng.randrange(5)}",
            worker=f"worker-{rng.randrange(40)}",
            deployment_id=f"d-{rng.randrange(100)}", tags="[]", state=state, state_time=created,
            state_rank=3, status_code=0, created_at=created, pending_at=created,
            submitted_at=created + 0.01, ended_at=created + 5, event_count=3, output_bytes=0,
            output_lines=0, output_dropped_lines=0, output_truncated=0)
        rows.append(tuple(values[c] for c in RUN_COLUMNS))
    return rows


def _fill(store: LedgerStore, rows: list[tuple[Any, ...]]) -> None:
    """Insert directly, as fast as each database allows (this measures reads, not writes)."""
    raw = store._connection.raw  # type: ignore[attr-defined]
    if store.dialect.name == "sqlite":
        raw.execute("PRAGMA cache_size=-400000")  # 400 MB: random ids thrash a small cache
        raw.execute("PRAGMA synchronous=OFF")
        statement = (f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) "
                     f"VALUES ({', '.join('?' * len(RUN_COLUMNS))})")
        raw.execute("BEGIN")
        raw.executemany(statement, rows)
        raw.execute("COMMIT")
        raw.execute("ANALYZE")
        return
    with raw.cursor() as cursor, cursor.copy(
            f"COPY runs ({', '.join(RUN_COLUMNS)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
    raw.commit()
    raw.execute("ANALYZE runs")
    raw.commit()


def _time(query: Callable[[], Any], repeats: int = 20) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        query()
        times.append(time.perf_counter() - began)
    times.sort()
    return 1000 * percentile(times, 50), 1000 * times[-1]


def measure(kind: str, count: int) -> list[dict[str, Any]]:
    now = time.time()
    rows = _rows(count, now)
    with database(kind) as db, LedgerStore(db) as store:
        store.migrate()
        began = time.perf_counter()
        _fill(store, rows)
        filled = time.perf_counter() - began
        cursor = None
        for _ in range(100):  # a page 100 pages deep
            cursor = store.list_runs(limit=50, before=cursor).next_cursor
        some_id = rows[count // 2][0]
        queries: dict[str, Callable[[], Any]] = {
            "newest 50": lambda: store.list_runs(limit=50),
            "state=crashed": lambda: store.list_runs(state="crashed", limit=50),
            "pool=pool3": lambda: store.list_runs(pool="pool3", limit=50),
            "queue=q2": lambda: store.list_runs(queue="q2", limit=50),
            "worker=worker-7": lambda: store.list_runs(worker="worker-7", limit=50),
            "deployment=d-42": lambda: store.list_runs(deployment="d-42", limit=50),
            "pool + state": lambda: store.list_runs(pool="pool3", state="crashed", limit=50),
            "since 1h": lambda: store.list_runs(since=now - 3600, limit=50),
            "page 101 (keyset)": lambda: store.list_runs(limit=50, before=cursor),
            "get_run": lambda: store.get_run(some_id),
        }
        results = []
        for name, query in queries.items():
            median, worst = _time(query)
            results.append({"db": kind, "runs": count, "query": name, "median_ms": median,
                            "max_ms": worst, "fill_seconds": filled})
    return results


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--db", default="sqlite,postgresql")
    args = parser.parse_args()

    def measure_each_database(args: argparse.Namespace) -> dict[str, Any]:
        return {"results": [r for kind in args.db.split(",") for r in measure(kind, args.runs)]}

    def report(result: dict[str, Any]) -> None:
        print_table(f"Ledger reads on {args.runs:,} runs (median and slowest of 20, ms)",
                    ["db", "query", "median ms", "max ms"],
                    [[r["db"], r["query"], r["median_ms"], r["max_ms"]]
                     for r in result["results"]])

    run_benchmark("ledger_reads", args, measure_each_database, report)


if __name__ == "__main__":
    main()
