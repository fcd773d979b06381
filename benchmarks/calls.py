"""Where a run's Python work goes: a worker's calls per run, by function, under cProfile.

    .venv/bin/python -m benchmarks.calls [--runs 2000] [--top 40] [--stream-output]

A ProcessWorker serves in this process (limit 8, asyncio's loop, a vhost of its own): a
first worker declares the topology and stops, `runs` runs of /bin/true are published and
confirmed, then a second worker is started under cProfile and takes them all. Printed per
run: each function's calls and its own and cumulative time. cProfile makes every call
several times dearer, so the times rank functions, they do not price them; the calls are
exact. `benchmarks.hotpath` times single steps without it. The runs turn `stream_output`
off, unless `--stream-output` leaves it on (the job template's default).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import re
import time
from typing import Any

import anyio

from benchmarks._report import banner, print_table, write_results
from benchmarks.anyio_costs import _publish, _until_finished
from mq_worker import logs
from mq_worker.settings import WorkerSettings
from mq_worker.testing import LocalBroker
from mq_worker.workers.process import ProcessWorker


async def profile_runs(runs: int, stream_output: bool = False) -> tuple[pstats.Stats, float]:
    """The profile of a worker taking `runs` pre-loaded runs, and its CPU seconds."""
    logs.configure("json", "WARNING")
    profile = cProfile.Profile()
    cpu = 0.0
    with LocalBroker.from_environment().throwaway_vhost("bench-calls") as vhost:
        for measured in (False, True):
            worker = ProcessWorker(WorkerSettings(url=[vhost.url], name="calls", limit=8,
                                                  heartbeat_seconds=30.0))
            if measured:
                await _publish(vhost.url, runs, stream_output)
            async with anyio.create_task_group() as tg:
                began = time.process_time()
                if measured:
                    profile.enable()
                tg.start_soon(worker.serve)
                await worker.ready.wait()
                if measured:
                    await _until_finished(worker, runs)
                    profile.disable()
                    cpu = time.process_time() - began
                worker.stop()
    return pstats.Stats(profile), cpu


def _where(key: tuple[str, int, str]) -> str:
    filename, line, function = key
    filename = re.sub(r"^.*/(site-packages|lib/python3\.\d+)/", "", filename)
    if "/mq_worker/" in filename:
        filename = "mq_worker/" + filename.split("/mq_worker/", 1)[1]
    return f"{function} ({filename}:{line})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--stream-output", action="store_true",
                        help="leave the runs' stream_output on (the default of the template)")
    args = parser.parse_args()
    banner("calls")
    stats, cpu = anyio.run(profile_runs, args.runs, args.stream_output, backend="asyncio")
    entries: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    rows = sorted(((own, calls, total, _where(key))
                   for key, (_, calls, own, total, _) in entries.items()), reverse=True)
    total_calls = sum(calls for _, calls, _, _ in rows)
    print(f"\n{args.runs} runs: {total_calls / args.runs:.0f} Python calls per run; "
          f"CPU {cpu / args.runs * 1e3:.2f} ms per run under cProfile\n")
    print_table("by own time, per run", ["function", "calls", "own µs", "cumulative µs"],
                [[where, round(calls / args.runs, 2), round(own / args.runs * 1e6, 1),
                  round(total / args.runs * 1e6, 1)]
                 for own, calls, total, where in rows[:args.top]])
    write_results("calls", {
        "runs": args.runs, "calls_per_run": total_calls / args.runs,
        "cpu_ms_per_run_profiled": cpu / args.runs * 1e3,
        "top": [{"function": where, "calls_per_run": calls / args.runs,
                 "own_us_per_run": own / args.runs * 1e6,
                 "cumulative_us_per_run": total / args.runs * 1e6}
                for own, calls, total, where in rows[:args.top]],
    })


if __name__ == "__main__":
    main()
