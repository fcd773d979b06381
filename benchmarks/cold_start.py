"""Cold start behind a cancel window: a pool's first worker, with no snapshot, replays N cancels.

    .venv/bin/python -m benchmarks.cold_start [--cancels 100000] [--rounds 3]
        [--tree before=/tmp/before --tree after=.]

One vhost holds N cancels of pool `default` (published once, confirmed). Each round
starts, for every tree in turn (interleaved, so that the machine's load falls on all
alike), `python -m mq_worker start` from that tree's directory (its own mq_worker
package), after deleting the pool's snapshot stream so that the worker replays the whole
window: seconds from process start to its `worker.started` event, the worker's CPU
seconds (user + system, from /proc) and resident memory by then, the broker's CPU
seconds over the same span (its `beam.smp` process, which other clients share), and the
load average. Without `--tree`, this checkout alone.

Each tree's bytecode is compiled first, as `pip install` does for a deployed worker: where
PYTHONDONTWRITEBYTECODE is set, a checkout would otherwise compile every module of
mq_worker again at each start.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Any

import aiormq
import psutil

from benchmarks._amqp import publish_cancel_window
from benchmarks._broker import management, vhost
from benchmarks._machine import broker_process, cpu_seconds
from benchmarks._paths import RESULTS, ROOT
from benchmarks._report import print_table
from benchmarks._runner import command_line, run_benchmark
from mq_worker.topology import (
    EVENTS_EXCHANGE,
    cancel_snapshot_stream_name,
)

PYTHON = sys.executable


async def publish_window(url: str, count: int) -> float:
    connection = await aiormq.connect(url)
    try:
        return await publish_cancel_window(await connection.channel(), count)
    finally:
        await connection.close()


def forget_snapshots(vhost_name: str) -> None:
    quoted = urllib.parse.quote(vhost_name, safe="")
    try:
        management("DELETE", f"/queues/{quoted}/{cancel_snapshot_stream_name('default')}")
    except urllib.error.HTTPError as exc:
        if exc.code != 404:  # none yet
            raise


def start_worker(url: str, tree: Path, name: str) -> subprocess.Popen[bytes]:
    log = RESULTS / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as output:
        return subprocess.Popen(
            [PYTHON, "-m", "mq_worker", "start", "--url", url, "--limit", "4",
             "--name", name, "--log-level", "WARNING", "--log-format", "json"],
            cwd=tree, stdout=output, stderr=output, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(tree)})


async def cold_start(url: str, vhost_name: str, tree: Path, name: str) -> dict[str, float]:
    """Start a worker from `tree` with no snapshot kept; stop it once it has started."""
    forget_snapshots(vhost_name)
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        queue = await channel.queue_declare("", exclusive=True)
        assert queue.queue
        await channel.queue_bind(queue.queue, EVENTS_EXCHANGE,
                                 routing_key="mq_worker.worker.started")
        started = asyncio.Event()
        await channel.basic_consume(queue.queue, lambda _: started.set(), no_ack=True)
        broker = broker_process()
        broker_began = cpu_seconds(broker)
        began = time.monotonic()
        process = start_worker(url, tree, name)
        try:
            await asyncio.wait_for(started.wait(), 600)
            seconds = time.monotonic() - began
            worker = psutil.Process(process.pid)
            times = worker.cpu_times()
            return {"start_s": seconds, "cpu_s": times.user + times.system,
                    "rss_mib": worker.memory_info().rss / 2**20,
                    "broker_cpu_s": cpu_seconds(broker) - broker_began,
                    "load_1min": os.getloadavg()[0]}
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(process.wait, 60)
    finally:
        await connection.close()


def compile_bytecode(tree: Path) -> None:
    subprocess.run([PYTHON, "-m", "compileall", "-q", str(tree / "mq_worker")], check=True,
                   stdout=subprocess.DEVNULL)


async def measure(args: Any) -> dict[str, Any]:
    trees: dict[str, Path] = args.trees
    for tree in trees.values():
        compile_bytecode(tree)
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    with vhost("cold-start") as host:
        published = await publish_window(host.url, args.cancels)
        for number in range(args.rounds):
            for name, tree in trees.items():
                rounds[name].append(await cold_start(host.url, host.name, tree,
                                                     f"cold-{name}-{number}"))
    return {"cancels": args.cancels, "publish_s": round(published, 1),
            "trees": {name: str(tree) for name, tree in trees.items()},
            "rounds": rounds}


def report(result: dict[str, Any]) -> None:
    rows = []
    for name, rounds in result["rounds"].items():
        for key in ("start_s", "cpu_s", "broker_cpu_s", "rss_mib"):
            values = [r[key] for r in rounds if key in r]
            rows.append([name, key, round(statistics.median(values), 2),
                         " ".join(f"{v:.2f}" for v in values),
                         " ".join(f"{r['load_1min']:.1f}" for r in rounds)])
    print_table(f"cold first worker behind {result['cancels']:,} cancels",
                ["tree", "figure", "median", "rounds", "load (1 min) at each"], rows)


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--cancels", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                        help="a checkout to start workers from (repeat to compare)")
    args = parser.parse_args()
    args.trees = {name: Path(tree).resolve() for name, tree in
                  (tree.split("=", 1) for tree in args.tree)} or {"this": ROOT}
    run_benchmark("cold_start", args, measure, report)


if __name__ == "__main__":
    main()
