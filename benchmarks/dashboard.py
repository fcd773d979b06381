"""The dashboard on a large ledger: how fast the runs page answers with 1,000,000 runs.

    .venv/bin/python -m benchmarks.dashboard [--runs 1000000] [--db URL] [--requests 30]

Fills a ledger (SQLite by default, in benchmarks/results/, kept for the next
run; or a PostgreSQL URL) with runs in bulk, as thirty days of a fleet would
leave them (five pools, fifty workers, a hundred deployments, 10% of runs not
completed, the last hour busy), starts `mq-worker dashboard` on it, and times
the runs page (HTML, as a browser gets it) and its JSON for the filters an
operator uses, first page and deep pages, plus the overview. Prints a Markdown
table of p50/p90/max milliseconds per request, measured from outside.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from typing import Any

from benchmarks.common import RESULTS, command_line, run_benchmark, vhost
from mq_worker.ledger.records import RUN_COLUMNS
from mq_worker.ledger.store import LedgerStore

STATES = (["completed"] * 900 + ["crashed"] * 60 + ["cancelled"] * 20 + ["rejected"] * 10
          + ["submitted"] * 5 + ["pending"] * 5)
FLOWS = [f"flow-{n:02d}" for n in range(20)]
TAGS = ['[]', '["nightly"]', '["etl", "nightly"]', '["adhoc"]', '["backfill", "etl"]']
DAY = 86400.0


def _rows(count: int, now: float, seed: int = 7) -> Any:
    """`count` runs over the last 30 days, oldest first; 20,000 of them in the last hour."""
    rng = random.Random(seed)
    recent = min(20_000, count // 10)
    for index in range(count):
        if index < count - recent:
            created = now - 30 * DAY + (30 * DAY - 3600) * index / (count - recent)
        else:
            created = now - 3600 + 3600 * (index - count + recent) / recent
        state = rng.choice(STATES)
        flow = rng.choice(FLOWS)
        delay = rng.expovariate(1 / 0.02)
        duration = rng.expovariate(1 / 30)
        ended = state not in ("pending", "submitted")
        submitted = created + delay if state != "pending" else None
        values = {
            "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "name": f"{flow}-{index}", "pool": f"pool-{index % 5}",
            "queue": ("high", "default", "low")[index % 3], "worker": f"worker-{index % 50:02d}",
            "flow_id": flow, "flow_name": flow.upper(), "deployment_id": f"d-{index % 100}",
            "deployment_name": f"deployment {index % 100}", "tags": rng.choice(TAGS),
            "state": state, "state_time": created + delay + duration, "state_rank": 3 if ended
            else 2, "status_code": {"completed": 0, "crashed": 1}.get(state),
            "reason": "exit-code" if state == "crashed" else None, "message": None,
            "infrastructure_pid": f"host-{index % 50}:{1000 + index % 30000}",
            "scheduled_start_time": None, "created_at": created, "pending_at": created,
            "submitted_at": submitted, "ended_at": created + delay + duration if ended else None,
            "start_delay_seconds": delay if submitted else None,
            "duration_seconds": duration if ended else None, "event_count": 3,
            "output_bytes": 0, "output_lines": 0, "output_dropped_lines": 0,
            "output_truncated": 0,
        }
        yield tuple(values[c] for c in RUN_COLUMNS)


def fill(db: str, count: int) -> float:
    """Create the ledger with `count` runs unless it has them; return seconds spent."""
    began = time.perf_counter()
    with LedgerStore(db) as store:
        store.migrate()
        if store.count_runs() >= count:
            return 0.0
        connection: Any = store._connection.raw  # bulk loading: below the store's API on purpose
        columns = ", ".join(RUN_COLUMNS)
        now = time.time()
        if store.dialect.name == "sqlite":
            connection.execute("PRAGMA synchronous=OFF")
            connection.execute("BEGIN")
            marks = ", ".join("?" * len(RUN_COLUMNS))
            connection.executemany(f"INSERT INTO runs ({columns}) VALUES ({marks})",
                                   _rows(count, now))
            connection.execute("COMMIT")
            connection.execute("ANALYZE")
        else:
            with connection.cursor() as cursor, cursor.copy(
                    f"COPY runs ({columns}) FROM STDIN") as copy:
                for row in _rows(count, now):
                    copy.write_row(row)
            connection.commit()
            connection.autocommit = True
            connection.execute("ANALYZE runs")
    return time.perf_counter() - began


def _get(url: str) -> tuple[float, int, int]:
    began = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        body = response.read()
    return (time.perf_counter() - began) * 1000, response.status, len(body)


def _cursor(base: str, query: str, pages: int) -> str:
    """The query of page `pages` + 1 of a listing (following the JSON API's cursors)."""
    for _ in range(pages):
        with urllib.request.urlopen(f"{base}/api/runs?{query}", timeout=60) as response:
            page = json.loads(response.read())
        if page["next"] is None:
            raise SystemExit(f"the ledger has fewer runs than {pages} pages: give --runs more "
                             "than 10,000")
        query = _with(query, before=page["next"])
    return query


def _with(query: str, **values: str) -> str:
    pairs = [p for p in urllib.parse.parse_qsl(query) if p[0] not in values]
    return urllib.parse.urlencode(pairs + list(values.items()))


def measure(base: str, requests: int, now: float) -> list[tuple[str, str, list[float], int]]:
    week_ago = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - 7 * DAY))
    day_before = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - 6 * DAY))
    cases = [
        ("newest first, no filter", ""),
        ("state = crashed", "state=crashed"),
        ("state = pending (rare)", "state=pending"),
        ("pool", "pool=pool-3"),
        ("worker", "worker=worker-17"),
        ("deployment", "deployment=d-42"),
        ("tag", "tag=backfill"),
        ("state + pool", "state=crashed&pool=pool-2"),
        ("one day, a week ago", f"since={week_ago}&until={day_before}"),
        ("search: name prefix", "q=flow-07-99"),
        ("search: id prefix", "q=8f3"),
    ]
    results = []
    for label, query in cases:
        timings = []
        size = 0
        for _ in range(requests):
            elapsed, status, size = _get(f"{base}/runs?{query}")
            assert status == 200
            timings.append(elapsed)
        results.append((label, query, timings, size))
    deep = _cursor(base, "limit=50", 200)
    results.append(("page 201 (10,000 runs in)", deep,
                    [_get(f"{base}/runs?{deep}")[0] for _ in range(requests)], 0))
    results.append(("JSON: /api/runs", "",
                    [_get(f"{base}/api/runs")[0] for _ in range(requests)], 0))
    results.append(("overview /", "", [_get(f"{base}/")[0] for _ in range(max(5, requests // 3))],
                    0))
    return results


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--db", help="ledger URL [default: benchmarks/results/ledger-N.db]")
    parser.add_argument("--requests", type=int, default=30, help="requests per case")
    run_benchmark("dashboard", parser.parse_args(), measure_filled_ledger, report)


def measure_filled_ledger(args: argparse.Namespace) -> dict[str, Any]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    db = args.db or f"sqlite:///{RESULTS / f'ledger-{args.runs}.db'}"
    print(f"filling {db.split('@')[-1]} with {args.runs:,} runs ...", flush=True)
    seconds = fill(db, args.runs)
    print(f"filled in {seconds:.1f} s", flush=True)
    with vhost("dashboard") as host:
        results = measure_dashboard(host.url, db, args.requests)
    return {"db": "PostgreSQL" if db.startswith("postgres") else "SQLite", "runs": args.runs,
            "requests": args.requests,
            "results": {label: timings for label, _, timings, _ in results}}


def measure_dashboard(url: str, db: str, requests: int
                      ) -> list[tuple[str, str, list[float], int]]:
    port = 18000 + random.randrange(1000)
    log = (RESULTS / "logs").joinpath("dashboard.log")
    log.parent.mkdir(exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "mq_worker", "dashboard", "--db", db, "--http-port", str(port),
         "--url", url, "--log-format", "json"],
        stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        began = time.monotonic()
        while True:
            try:
                _get(base + "/api/workers")
                break
            except OSError:
                if time.monotonic() - began > 300 or process.poll() is not None:
                    raise SystemExit(f"the dashboard did not start: see {log}") from None
                time.sleep(0.2)
        print(f"dashboard ready in {time.monotonic() - began:.1f} s (creating its name index "
              "on first start)", flush=True)
        return measure(base, requests, time.time())
    finally:
        process.terminate()
        process.wait(timeout=30)


def report(result: dict[str, Any]) -> None:
    print(f"\n{result['db']} ledger, {result['runs']:,} runs; GET /runs (50 a page, HTML) "
          f"unless said; {result['requests']} requests each\n")
    print("| query | p50 ms | p90 ms | max ms |")
    print("|---|---:|---:|---:|")
    for label, timings in result["results"].items():
        ordered = sorted(timings)
        p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
        print(f"| {label} | {statistics.median(ordered):.1f} | {p90:.1f} | {ordered[-1]:.1f} |")


if __name__ == "__main__":
    main()

