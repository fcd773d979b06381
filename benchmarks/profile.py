"""Profile of a worker process under the throughput benchmark's load, sampled with py-spy.

    .venv/bin/python -m benchmarks.profile [--runs 4000] [--limit 8] [--rate 200]

A worker process (`python -m mq_worker start`) runs `runs` runs of /bin/true published as
fast as confirms allow, while `py-spy record` samples it (py-spy is installed in .venv with
`pip install py-spy`; it needs ptrace rights: root, or CAP_SYS_PTRACE). The collapsed stacks
are kept in benchmarks/results/profile.folded (flamegraph.pl, speedscope or inferno read
them). Printed: where the worker's busy samples go, by category (each sample counted once,
by the innermost frame that belongs to a category) and by mq_worker function (inclusive).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks._amqp import (
    RUN_COMPLETED,
    WORKER_STARTED,
    EventWatch,
    Publisher,
    new_id,
    wait_workers_started,
)
from benchmarks._broker import vhost
from benchmarks._machine import CpuMeter, wait_for_quiet
from benchmarks._paths import PYTHON, RESULTS
from benchmarks._probe import run_body
from benchmarks._report import print_table
from benchmarks._runner import command_line, run_benchmark
from benchmarks._workers import workers

# (category, substrings of a frame "function (file:line)"), tried in order on each frame
# from the innermost outwards.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("process spawn (posix_spawn, subprocess.Popen)", ("(subprocess.py:", "mq_worker/spawn.py")),
    ("guardian (Guardian.watch/forget)", ("mq_worker/guardian.py",)),
    ("job variables checked by jsonschema", ("jsonschema/", "referencing/")),
    ("pydantic validation", ("pydantic/", "pydantic_core/", "model_validate")),
    ("events: build_event (ids, datetime, orjson)", ("build_event (", "mq_worker/event_ids.py")),
    ("logging (structlog, logging)", ("structlog/", "logging/")),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("environment copies (os.environ)", ("<frozen os>", "base_environment")),
    ("uuid", ("(uuid.py:",)),
    ("shlex", ("(shlex.py:",)),
    ("psutil", ("psutil/",)),
    ("AMQP client (aiormq, pamqp, aio_pika)", ("aiormq/", "pamqp/", "aio_pika/")),
    ("socket I/O (asyncio streams)", ("asyncio/streams.py", "asyncio/selector_events.py")),
    ("anyio (task groups, cancel scopes, events)", ("anyio/",)),
    ("mq_worker.consumer (flow control)",
     ("mq_worker/consumer.py", "mq_worker/window.py", "mq_worker/delivery.py")),
    ("mq_worker.outbox", ("mq_worker/outbox.py", "mq_worker/confirmed_batch.py",
                          "mq_worker/publish_frames.py")),
    ("mq_worker.infrastructure", ("mq_worker/infrastructure.py", "mq_worker/process_stop.py")),
    ("mq_worker.job_configuration", ("mq_worker/job_configuration.py",)),
    ("mq_worker.workers (base, process)", ("mq_worker/workers/",)),
    ("mq_worker (other modules)", ("mq_worker/",)),
    ("event loop (asyncio, uvloop)", ("asyncio/", "uvloop", "Runner.run")),
]


def read_folded(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            stacks.append((stack.split(";"), int(count)))
    return stacks


def categorize(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, patterns in CATEGORIES:
            if any(p in frame for p in patterns):
                return name
    return "other"


def analyse(stacks: list[tuple[list[str], int]]) -> dict[str, Any]:
    total = sum(count for _, count in stacks)
    categories: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        categories[categorize(frames)] += count
        leaf[frames[-1]] += count
        functions = set()  # several lines of one function count once
        for frame in frames:
            if "mq_worker/" in frame and "__main__" not in frame and "cli.py" not in frame:
                name, _, where = frame.partition(" (")
                functions.add(f"{name} ({where.split(':')[0]})")
        for function in functions:
            inclusive[function] += count
    return {
        "samples": total,
        "categories": {k: round(100 * v / total, 1) for k, v in categories.most_common()},
        "mq_worker_inclusive": {k: round(100 * v / total, 1)
                                for k, v in inclusive.most_common(30)},
        "leaf": {k: round(100 * v / total, 1) for k, v in leaf.most_common(25)},
    }


def find_py_spy() -> str:
    spy = shutil.which("py-spy") or str(Path(PYTHON).with_name("py-spy"))
    if not Path(spy).exists():
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    return spy


def start_sampler(spy: str, pid: int, rate: int, output: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
         "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def stop_sampler(sampler: subprocess.Popen[bytes], output: Path) -> None:
    sampler.send_signal(2)  # SIGINT: py-spy writes its output and exits
    _, err = sampler.communicate(timeout=60)
    if not output.exists():
        sys.exit(f"py-spy wrote no profile: {err.decode(errors='replace')}")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    spy = find_py_spy()
    background = wait_for_quiet(timeout=args.quiet)
    folded = RESULTS / "profile.folded"
    with vhost("profile") as host:
        async with EventWatch(host.url, [WORKER_STARTED, RUN_COMPLETED]) as watch, \
                Publisher(host.url) as publisher:
            with workers(host.url, 1, limit=args.limit, prefix="profile",
                         loop=args.loop) as started:
                worker = started[0]
                await wait_workers_started(watch, [worker.name], started)
                await publisher.publish_many(run_body(new_id(), "/bin/true") for _ in range(200))
                await watch.wait_count(RUN_COMPLETED, 200, 120, worker.check_alive)
                sampler = start_sampler(spy, worker.pid, args.rate, folded)
                await asyncio.sleep(1.0)
                meter = CpuMeter(started)
                meter.start()
                await publisher.publish_many(
                    run_body(new_id(), "/bin/true") for _ in range(args.runs))
                await watch.wait_count(RUN_COMPLETED, 200 + args.runs, 120 + args.runs / 20,
                                       worker.check_alive)
                cpu = meter.stop()
                stop_sampler(sampler, folded)
    stacks = read_folded(folded)
    result = analyse(stacks)
    result.update({"runs": args.runs, "limit": args.limit, "rate_hz": args.rate,
                   "cpu": cpu, "background_cores_before": background,
                   "folded": str(folded.relative_to(RESULTS.parent.parent))})
    return result


def report(result: dict[str, Any]) -> None:
    print(f"\n{result['samples']} busy samples of the worker at {result['rate_hz']} Hz; "
          f"worker CPU {result['cpu']['workers_cpu_s']:.1f} s for {result['runs']} runs")
    print_table("where the worker's busy time goes (each sample once, innermost category)",
                ["category", "% of samples"], list(result["categories"].items()))
    print_table("mq_worker functions, inclusive", ["function", "% of samples"],
                list(result["mq_worker_inclusive"].items())[:25])
    print_table("innermost frames (self time)", ["frame", "% of samples"],
                list(result["leaf"].items())[:15])


def main() -> None:
    parser = command_line(__doc__, quiet=60.0, loop=True)
    parser.add_argument("--runs", type=int, default=4000)
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    run_benchmark("profile", parser.parse_args(), main_async, report)


if __name__ == "__main__":
    main()
