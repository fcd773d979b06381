"""mq_worker against Celery 5.x at concurrency 8, measured in the same run.

    .venv/bin/python -m benchmarks.compare_celery [--tasks 4000] [--seconds 10]

Celery lives in a virtual environment of its own, benchmarks/.venv-celery, created (with
`pip install 'celery>=5,<6'`) when missing. Its worker is `celery worker --pool prefork
--concurrency 8` on the same RabbitMQ (a vhost of its own; Celery's defaults otherwise:
early acknowledgement, prefetch multiplier 4, no result backend), once with Celery's
default classic queue and once with a quorum queue like mq_worker's. The task
(benchmarks/celery_side/tasks.py) runs /bin/true through subprocess and records when it
started and ended.

* tasks/s: `tasks` tasks published as fast as the client can, until the last one has
  ended (the task's own clock); steady = between the 10th and the 90th percentile.
* latency: tasks published at 50/s; publish -> the task function started.

Each throughput measurement waits for a quiet machine and is repeated (up to 3 times) when
other processes used more than 0.3 cores during it.

mq_worker, in the same run: one and two worker processes at limit 8 (the throughput
benchmark's measurement: until the last `completed` event is received), and publish ->
process started at 50/s (the latency benchmark's measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from benchmarks._probe import AppendedLines
from benchmarks.common import (
    BENCH,
    PYTHON,
    RESULTS,
    CpuMeter,
    command_line,
    least_disturbed,
    percentile,
    print_table,
    run_benchmark,
    summarize_ms,
    vhost,
    wait_for_quiet,
)
from benchmarks.latency import measure_latency
from benchmarks.throughput import measure_workers

VENV = BENCH / ".venv-celery"
SIDE = BENCH / "celery_side"
CONCURRENCY = 8


def ensure_venv() -> Path:
    """benchmarks/.venv-celery with Celery 5.x, created when missing; its bin directory."""
    bin_dir = VENV / "bin"
    if not (bin_dir / "celery").exists():
        print(f"creating {VENV.relative_to(BENCH.parent)} with Celery 5.x ...", flush=True)
        subprocess.run([PYTHON, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q",
                        "celery>=5,<6"], check=True)
    return bin_dir


def celery_version(bin_dir: Path) -> str:
    code = "import celery; print(celery.__version__)"
    out = subprocess.run([str(bin_dir / "python"), "-c", code], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


class TaskLog:
    """The lines the task appends: index, sent, started, ended."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._appended = AppendedLines(path)
        self.tasks: dict[int, tuple[float, float, float]] = {}

    def read(self) -> None:
        for line in self._appended.read():
            index, sent, started, ended = line.split()
            self.tasks[int(index)] = (float(sent), float(started), float(ended))

    def wait(self, indexes: range, timeout: float, worker: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.read()
            if all(i in self.tasks for i in indexes):
                return
            if worker.poll() is not None:
                raise RuntimeError(f"the Celery worker exited with {worker.returncode}")
            if time.monotonic() > deadline:
                done = sum(1 for i in indexes if i in self.tasks)
                raise TimeoutError(f"{done}/{len(indexes)} Celery tasks after {timeout} s")
            time.sleep(0.01)


def tree_cpu(process: psutil.Process) -> float:
    """CPU seconds of a process, its live children and the children they reaped."""
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        try:
            t = member.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


@contextmanager
def celery_worker(bin_dir: Path, url: str, results: Path, queue_type: str
                  ) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "BENCH_BROKER_URL": url, "BENCH_RESULTS_FILE": str(results),
           "BENCH_QUEUE_TYPE": queue_type}
    log_path = RESULTS / "logs" / f"celery-{queue_type}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [str(bin_dir / "celery"), "-A", "tasks", "worker", "--pool", "prefork",
             "--concurrency", str(CONCURRENCY), "--loglevel", "WARNING", "--without-gossip",
             "--without-mingle", "--without-heartbeat", "-n", f"bench-{queue_type}@%h"],
            cwd=SIDE, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )
    try:
        yield worker
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def client(bin_dir: Path, url: str, queue_type: str, *args: str) -> None:
    env = {**os.environ, "BENCH_BROKER_URL": url, "BENCH_QUEUE_TYPE": queue_type}
    subprocess.run([str(bin_dir / "python"), "client.py", *args], cwd=SIDE, env=env, check=True)


def measure_celery(bin_dir: Path, queue_type: str, tasks: int, seconds: float
                   ) -> dict[str, Any]:
    with vhost(f"celery-{queue_type}") as host:
        results = RESULTS / f".celery-{queue_type}.log"
        results.unlink(missing_ok=True)
        log = TaskLog(results)
        with celery_worker(bin_dir, host.url, results, queue_type) as worker:
            # Warm-up; the first call also waits for the worker to be consuming.
            client(bin_dir, host.url, queue_type, "burst", "300", "0")
            log.wait(range(300), 120, worker)
            root = psutil.Process(worker.pid)
            meter = CpuMeter()
            meter.start()
            cpu_before = tree_cpu(root)
            first = 100_000
            client(bin_dir, host.url, queue_type, "burst", str(tasks), str(first))
            batch = range(first, first + tasks)
            log.wait(batch, 120 + tasks / 20, worker)
            cpu = tree_cpu(root) - cpu_before
            load = meter.stop()
            paced_first, paced = 1_000_000, int(50 * seconds)
            client(bin_dir, host.url, queue_type, "paced", "50", str(paced), str(paced_first))
            paced_range = range(paced_first, paced_first + paced)
            log.wait(paced_range, 60, worker)
        results.unlink(missing_ok=True)
    sent = min(log.tasks[i][0] for i in batch)
    ends = sorted(log.tasks[i][2] for i in batch)
    low, high = percentile(ends, 10), percentile(ends, 90)
    in_window = sum(1 for e in ends if low < e <= high)
    return {
        "label": f"Celery, prefork concurrency {CONCURRENCY}, {queue_type} queue",
        "tasks": tasks,
        "rate": round(tasks / (ends[-1] - sent), 1),
        "steady_rate": round(in_window / (high - low), 1) if high > low else None,
        "worker_cpu_ms_per_task": round(cpu * 1000 / tasks, 3),
        "broker_cpu_ms_per_task": round(load["broker_cpu_s"] * 1000 / tasks, 3),
        "others_cores": round((load["others_cpu_s"] - cpu) / load["wall_s"], 2),
        "latency_50": summarize_ms(log.tasks[i][1] - log.tasks[i][0] for i in paced_range),
        "latency_50_task_end": summarize_ms(
            log.tasks[i][2] - log.tasks[i][0] for i in paced_range),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    bin_dir = ensure_venv()
    result: dict[str, Any] = {"celery": celery_version(bin_dir),
                              "background_cores_before": wait_for_quiet(timeout=args.quiet)}
    async def celery(queue_type: str) -> dict[str, Any]:
        return await asyncio.to_thread(measure_celery, bin_dir, queue_type, args.tasks,
                                       args.seconds)

    result["celery_runs"] = [
        await least_disturbed(functools.partial(celery, queue_type), quiet=args.quiet)
        for queue_type in args.queue_types
    ]
    result["mq_worker_throughput"] = [
        await least_disturbed(functools.partial(measure_workers, CONCURRENCY, count, args.tasks),
                              quiet=args.quiet)
        for count in (1, 2)
    ]
    phases = await measure_latency([50.0], args.seconds, limit=CONCURRENCY)
    result["mq_worker_latency"] = phases[0]
    result["background_cores_after"] = wait_for_quiet(timeout=0)
    return result


def report(result: dict[str, Any]) -> None:
    rows: list[list[Any]] = []
    for run in result["celery_runs"]:
        lat = run["latency_50"]
        rows.append([run["label"], run["rate"], run["steady_rate"],
                     run["worker_cpu_ms_per_task"], run["broker_cpu_ms_per_task"],
                     "publish -> task started", lat["p50"], lat["p99"], run["others_cores"]])
    lat = result["mq_worker_latency"]["exec"]
    for run in result["mq_worker_throughput"]:
        one = run["workers"] == 1
        rows.append([f"{run['label']}, limit {run['limit']}", run["rate"], run["steady_rate"],
                     round(run["worker_cpu_ms_per_run"] + run["run_process_cpu_ms_per_run"], 3),
                     run["broker_cpu_ms_per_run"],
                     "publish -> process started" if one else "",
                     lat["p50"] if one else None, lat["p99"] if one else None,
                     run["others_cores"]])
    print_table(f"mq_worker and Celery {result['celery']}, /bin/true, concurrency {CONCURRENCY}",
                ["", "per s", "steady per s", "worker CPU ms each (with /bin/true)",
                 "broker CPU ms each", "latency at 50/s", "p50 ms", "p99 ms",
                 "other load (cores)"], rows)


def parse_args() -> argparse.Namespace:
    parser = command_line(__doc__, quiet=60.0)
    parser.add_argument("--tasks", type=int, default=4000, help="tasks (runs) per throughput")
    parser.add_argument("--seconds", type=float, default=10.0, help="of the 50/s latency phase")
    parser.add_argument("--queue-types", default="classic,quorum",
                        help="Celery queue types to measure")
    args = parser.parse_args()
    args.queue_types = [q for q in args.queue_types.split(",") if q]
    return args


def main() -> None:
    run_benchmark("compare_celery", parse_args(), main_async, report)


if __name__ == "__main__":
    main()
