"""Ledger throughput: does `mq-worker ledger` keep up with two workers, on SQLite and PostgreSQL?

    .venv/bin/python -m benchmarks.ledger [--runs 10000] [--limit 8] [--db sqlite,postgresql]

For each database: a ledger process (`python -m mq_worker ledger`) on a fresh database (an
SQLite file, or a PostgreSQL database `mqw_bench_<uuid>` on 127.0.0.1:5432 dropped afterwards),
and two worker processes on one queue of a vhost of their own. `runs` runs of `/bin/echo`
(stream_output on, so each run also ships an output batch) are published as fast as confirms
allow. Reported: the workers' runs/s, the ledger's lag per event (the time it wrote the event
minus the event's own time: p50, p99, max), the rows it wrote per second (events and output
batches), and how long after the last run ended it had recorded everything.

With --backlog the ledger is stopped while the runs happen (its queue keeps their events and
output) and started after the last one: the rows/s it then writes is its own capacity, not
the workers' pace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import (
    PYTHON,
    RESULTS,
    ROOT,
    RUN_COMPLETED,
    WORKER_STARTED,
    EventWatch,
    Publisher,
    command_line,
    management,
    new_id,
    percentile,
    print_table,
    run_benchmark,
    run_body,
    vhost,
    wait_workers_started,
    workers,
)

POSTGRES = "postgresql://postgres@127.0.0.1:5432"


@contextlib.contextmanager
def database(kind: str) -> Iterator[str]:
    if kind == "sqlite":
        path = RESULTS / ".build" / f"ledger-{uuid.uuid4().hex[:8]}.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield f"sqlite:///{path}"
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    import psycopg

    name = f"mqw_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_ledger(url: str, db: str, log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        return subprocess.Popen(
            [PYTHON, "-m", "mq_worker", "ledger", "--url", url, "--db", db,
             "--log-level", "WARNING", "--log-format", "json"],
            stdout=sink, stderr=sink, cwd=ROOT)


def _ledger_consumers(vhost_name: str) -> int:
    quoted = urllib.parse.quote(vhost_name, safe="")
    try:
        return int(management("GET", f"/queues/{quoted}/mq_worker.ledger").get("consumers", 0))
    except OSError:
        return 0


def _query(db: str, statement: str) -> list[Any]:
    from mq_worker.ledger.store import LedgerStore

    with LedgerStore(db) as store:
        return store._transaction(lambda c: (c.execute(statement), c.fetchall())[1],
                                  write=False)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


async def _wait_ledger_consuming(vhost_name: str, ledger: subprocess.Popen[bytes],
                                 log: Path) -> None:
    deadline = time.monotonic() + 60
    while _ledger_consumers(vhost_name) < 1:
        if time.monotonic() > deadline or ledger.poll() is not None:
            raise RuntimeError(f"the ledger did not start: {_tail(log)}")
        await asyncio.sleep(0.2)


async def measure(kind: str, runs: int, limit: int, backlog: bool = False) -> dict[str, Any]:
    with vhost(f"ledger-{kind}") as space, database(kind) as db:
        log = RESULTS / "logs" / f"ledger-{kind}.log"
        ledger = start_ledger(space.url, db, log)
        try:
            await _wait_ledger_consuming(space.name, ledger, log)
            if backlog:  # its queue exists now; let the runs pile up in it
                ledger.terminate()
                ledger.wait(60)
            async with EventWatch(space.url, [WORKER_STARTED, RUN_COMPLETED]) as watch, \
                    Publisher(space.url) as publisher:
                with workers(space.url, 2, limit=limit, prefix=f"ledger-{kind}") as started:
                    await wait_workers_started(watch, [w.name for w in started])
                    bodies = [run_body(new_id(), "/bin/echo ledger", stream_output=True)
                              for _ in range(runs)]
                    began = time.time()
                    await publisher.publish_many(bodies)
                    await watch.wait_count(RUN_COMPLETED, runs, timeout=1800)
                    ended = time.time()
            if backlog:
                ledger = start_ledger(space.url, db, log)
            expected_events = 3 * runs
            deadline = time.monotonic() + 600
            while True:
                (count,), = _query(db, "SELECT COUNT(*) FROM events")
                if count >= expected_events:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the ledger recorded {count} of {expected_events} events")
                await asyncio.sleep(0.2)
            caught_up = time.time()
        finally:
            ledger.terminate()
            ledger.wait(60)
        lags = sorted(r[0] for r in _query(db, "SELECT recorded_at - time FROM events"))
        (first, last), = _query(db, "SELECT MIN(recorded_at), MAX(recorded_at) FROM events")
        (batches,), = _query(db, "SELECT COUNT(*) FROM output")
        (run_rows,), = _query(db, "SELECT COUNT(*) FROM runs WHERE state = 'completed'")
    rows = len(lags) + batches
    return {
        "db": kind, "mode": "backlog" if backlog else "live", "runs": runs,
        "runs_recorded": run_rows, "events": len(lags), "load_average": os.getloadavg()[0],
        "output_batches": batches,
        "workers_runs_per_s": runs / (ended - began),
        "lag_p50_ms": 1000 * percentile(lags, 50), "lag_p99_ms": 1000 * percentile(lags, 99),
        "lag_max_ms": 1000 * lags[-1],
        "rows_per_s": rows / max(last - first, 1e-9),
        "caught_up_after_last_run_s": caught_up - ended,
    }


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--backlog", action="store_true",
                        help="Start the ledger only after the runs: its own capacity.")
    args = parser.parse_args()
    run_benchmark("ledger", args, measure_each_database, lambda result: report(args, result),
                  results_name="ledger-backlog" if args.backlog else "ledger")


async def measure_each_database(args: argparse.Namespace) -> dict[str, Any]:
    return {"results": [await measure(kind, args.runs, args.limit, args.backlog)
                        for kind in args.db.split(",")]}


def report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    results = result["results"]
    mode = "backlog: ledger started after the runs" if args.backlog else "live"
    print_table(
        f"Ledger ({mode}): {args.runs} runs of /bin/echo through 2 workers (limit {args.limit})",
        ["db", "runs/s (workers)", "recorded", "events", "lag p50 ms", "lag p99 ms",
         "lag max ms", "rows/s", "caught up after (s)", "load avg (1 min)"],
        [[r["db"], r["workers_runs_per_s"], r["runs_recorded"], r["events"], r["lag_p50_ms"],
          r["lag_p99_ms"], r["lag_max_ms"], r["rows_per_s"], r["caught_up_after_last_run_s"],
          r["load_average"]]
         for r in results])


if __name__ == "__main__":
    main()
