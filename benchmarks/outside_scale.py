"""Idle pools of real workers, seen from outside: an installed `mq-worker` and the broker's
management API only.

    .venv/bin/python -m benchmarks.outside_scale --mq-worker /tmp/venv/bin/mq-worker
        [--sizes 4,12,24] [--window 10]

Where `benchmarks.scale` simulates most of its workers, every worker here is a real
`mq-worker start --heartbeat-seconds 1 --limit 1` process of the given installation (a
fresh venv with the package installed, as a user has it), in a vhost of its own. For
each N: broker deliveries/s over `--window` seconds (management API), against the
bound 3N + 10; broker CPU and the workers' mean CPU; one `mq-worker status --pool`
call (wall clock, workers listed, pings published on `mq_worker.ping`, and whether
`mq-worker events` showed any ping); then each worker gets a `sleep` run, a worker
that is not the reporter is killed (SIGKILL): delay to its `worker.lost`, how many
were published, and its run's `run.crashed` reason; then the reporter is killed:
delay to its `worker.lost` from its successor, and how long the successor took to
replay the heartbeat stream. Last, two pools side by side (`--pools A,B` workers,
`A` first): deliveries/s to pool B's workers while pool A beats.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from benchmarks._broker import VHost, management, vhost
from benchmarks._machine import broker_process, cpu_seconds
from benchmarks._paths import RESULTS
from benchmarks._report import print_table
from benchmarks._runner import command_line, run_benchmark
from benchmarks.scale import delivery_rate

LOST = "mq_worker.worker.lost"


def _quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


class Installed:
    """Processes of the installed `mq-worker` command in one vhost."""

    def __init__(self, binary: str, host: VHost) -> None:
        self.binary, self.host = binary, host
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def log(self, name: str) -> Path:
        return RESULTS / "logs" / f"{name}.log"

    def start(self, name: str, pool: str) -> None:
        self.log(name).parent.mkdir(parents=True, exist_ok=True)
        with self.log(name).open("wb") as log:
            self.workers[name] = subprocess.Popen(
                [self.binary, "start", "--url", self.host.url, "--pool", pool, "--name", name,
                 "--heartbeat-seconds", "1", "--limit", "1", "--drain-timeout", "1",
                 "--log-level", "INFO", "--log-format", "json"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def client(self, command: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.binary, command, "--url", self.host.url, *args],
                              capture_output=True, text=True, timeout=120, check=False)

    def logged(self, name: str, event: str) -> dict[str, Any] | None:
        for line in self.log(name).read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == event:
                    return dict(record)
        return None

    def stop_all(self) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.workers.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


class EventFeed:
    """`mq-worker events --json`, each line kept with the moment it arrived."""

    def __init__(self, installed: Installed) -> None:
        self.lines: list[tuple[float, dict[str, Any]]] = []
        self._process = subprocess.Popen(
            [installed.binary, "events", "--json", "--url", installed.host.url],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            with contextlib.suppress(ValueError):
                self.lines.append((time.monotonic(), json.loads(line)))

    def of(self, kind: str, subject: str | None = None) -> list[tuple[float, dict[str, Any]]]:
        return [(t, e) for t, e in list(self.lines)
                if e.get("type") == kind and (subject is None or e.get("subject") == subject)]

    def close(self) -> None:
        self._process.terminate()
        self._process.wait(10)


def wait_until(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not within {timeout} s")


def consumers(host: VHost, queue: str) -> int:
    try:
        stats = management("GET", f"/queues/{_quoted(host.name)}/{_quoted(queue)}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # not declared yet
            return 0
        raise
    return int(stats.get("consumers", 0))


def worker_cpu(installed: Installed) -> float:
    return sum(cpu_seconds(psutil.Process(p.pid)) for p in installed.workers.values()
               if p.poll() is None)


@contextlib.contextmanager
def idle_pool(binary: str, size: int, pool: str = "idle") -> Iterator[Installed]:
    with vhost(f"outside{size}") as host:
        installed = Installed(binary, host)
        try:
            for i in range(size):
                installed.start(f"out{size}-{i}", pool)
            wait_until(lambda: consumers(host, f"mq_worker.{pool}.default") == size,
                       60 + 5 * size, f"{size} workers consuming")
            yield installed
        finally:
            installed.stop_all()


def measure_size(binary: str, size: int, window: int) -> dict[str, Any]:
    with idle_pool(binary, size) as installed:
        host = installed.host
        time.sleep(5)  # the start settles: election tokens, the reporter's replay
        broker = broker_process()
        began, broker_before, workers_before = time.monotonic(), cpu_seconds(broker), \
            worker_cpu(installed)
        time.sleep(window + 5)  # the management API samples every 5 s
        wall = time.monotonic() - began
        row: dict[str, Any] = {
            "workers": size,
            "load_1min": round(os.getloadavg()[0], 1),
            "deliveries_per_s": round(delivery_rate(host, window), 1),
            "bound_3n_plus_10": 3 * size + 10,
            "broker_cpu_pct": round(100 * (cpu_seconds(broker) - broker_before) / wall, 1),
            "worker_cpu_pct": round(
                100 * (worker_cpu(installed) - workers_before) / wall / size, 2),
        }
        feed = EventFeed(installed)
        try:
            time.sleep(2)  # the feed's queue is bound before status pings
            row.update(status_cost(installed, feed, size))
            row.update(lost_and_failover(installed, feed, size))
        finally:
            feed.close()
        return row


def status_cost(installed: Installed, feed: EventFeed, size: int) -> dict[str, Any]:
    def pings() -> int:
        stats = management("GET", f"/exchanges/{_quoted(installed.host.name)}/mq_worker.ping")
        return int(stats.get("message_stats", {}).get("publish_in", 0))

    before = pings()
    began = time.monotonic()
    status = installed.client("status", "--pool", "idle", "--json")
    took = time.monotonic() - began
    listed = len(json.loads(status.stdout)["workers"]) if status.returncode == 0 else 0
    time.sleep(6)  # exchange counters are refreshed every 5 s
    return {"status_s": round(took, 2), "status_listed": f"{listed}/{size}",
            "pings_published": pings() - before,
            "pings_in_events": sum(1 for _, e in feed.lines if "ping" in str(e.get("type")))}


def lost_and_failover(installed: Installed, feed: EventFeed, size: int) -> dict[str, Any]:
    runs = [installed.client("submit", "--pool", "idle", "--", "sleep", "300").stdout.strip()
            for _ in range(size)]
    held = wait_until(lambda: {e["data"]["worker"]: e["subject"] for _, e in feed.of(
        "mq_worker.run.submitted")} if len(feed.of("mq_worker.run.submitted")) == size
        else None, 60, "every worker holding a run")
    reporter = wait_until(lambda: [n for n in installed.workers if installed.logged(
        n, "elected to report lost workers")], 30, "an elected reporter")[0]
    victim = next(n for n in installed.workers if n != reporter and n in held)
    # Its heartbeat must list the run, or no reporter could crash it.
    wait_until(lambda: any(e["data"].get("in_flight") for _, e in feed.of(
        "mq_worker.worker.heartbeat", victim)), 10, "the victim's heartbeat")
    installed.workers[victim].kill()
    killed = time.monotonic()
    arrived, _ = wait_until(lambda: feed.of(LOST, victim), 60, "worker.lost")[0]
    crashed = wait_until(lambda: feed.of("mq_worker.run.crashed", held[victim]), 10,
                         "run.crashed")
    installed.workers[reporter].kill()
    failed_over = time.monotonic()
    reported, lost = wait_until(lambda: feed.of(LOST, reporter), 60, "the reporter lost")[0]
    successor = lost["data"]["reported_by"]
    caught_up = installed.logged(successor, "reporter has caught up with its pool's heartbeats")
    time.sleep(3)  # measuring: a second report of either would come within 3 intervals
    return {
        "runs": len(runs),
        "lost_delay_s": round(arrived - killed, 2),
        "lost_reports": len(feed.of(LOST, victim)),
        "crash_reason": crashed[0][1]["data"].get("reason"),
        "failover_lost_delay_s": round(reported - failed_over, 2),
        "failover_replay_s": caught_up.get("seconds") if caught_up else None,
        "reporter_lost_reports": len(feed.of(LOST, reporter)),
    }


def measure_two_pools(binary: str, sizes: tuple[int, int], window: int) -> dict[str, Any]:
    crowd, alone = sizes
    with vhost("outside-pools") as host:
        installed = Installed(binary, host)
        try:
            for pool, count in (("crowd", crowd), ("alone", alone)):
                for i in range(count):
                    installed.start(f"{pool}-{i}", pool)
                wait_until(lambda p=pool, c=count: consumers(host, f"mq_worker.{p}.default") == c,
                           60 + 5 * count, f"pool {pool}")
            time.sleep(5)
            time.sleep(window + 5)
            names = {n for n in installed.workers if n.startswith("alone-")}
            rate = sum(_connection_rate(host, f"mq_worker {n}", window) for n in names)
            return {"pool_a_workers": crowd, "pool_b_workers": alone,
                    "load_1min": round(os.getloadavg()[0], 1),
                    "deliveries_per_s_to_pool_b": round(rate, 1),
                    "pool_b_own_heartbeats_per_s": alone}
        finally:
            installed.stop_all()


def _connection_rate(host: VHost, connection_name: str, window: int) -> float:
    quoted = _quoted(host.name)
    names = [c["name"] for c in management("GET", f"/vhosts/{quoted}/connections")
             if c.get("user_provided_name") == connection_name]
    total = 0.0
    for channel in management("GET", f"/vhosts/{quoted}/channels"):
        if channel["connection_details"]["name"] not in names:
            continue
        stats = management("GET", f"/channels/{_quoted(channel['name'])}"
                                  f"?msg_rates_age={window}&msg_rates_incr=5")
        samples = (stats.get("message_stats", {}).get("deliver_get_details", {})
                   .get("samples", []))
        if len(samples) >= 2:
            seconds = (samples[0]["timestamp"] - samples[-1]["timestamp"]) / 1000
            total += (samples[0]["sample"] - samples[-1]["sample"]) / seconds
    return total


def measure_all(args: argparse.Namespace) -> dict[str, Any]:
    binary = args.mq_worker or shutil.which("mq-worker")
    assert binary, "no installed mq-worker: pass --mq-worker"
    rows = []
    for size in args.sizes.split(","):
        rows.append(measure_size(binary, int(size), args.window))
        print(json.dumps(rows[-1]), flush=True)
    pools = tuple(int(n) for n in args.pools.split(","))
    assert len(pools) == 2
    return {"binary": binary, "rows": rows,
            "two_pools": measure_two_pools(binary, (pools[0], pools[1]), args.window)}


def report(result: dict[str, Any]) -> None:
    rows = result["rows"]
    print_table(f"idle pools of installed workers ({result['binary']}), heartbeats every 1 s",
                list(rows[0]), [list(r.values()) for r in rows])
    pools = result["two_pools"]
    print_table("two pools", list(pools), [list(pools.values())])


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--mq-worker", help="the installed command (default: on PATH)")
    parser.add_argument("--sizes", default="4,12,24")
    parser.add_argument("--window", type=int, default=10, help="measuring window, seconds")
    parser.add_argument("--pools", default="12,4", help="workers of pool A and of pool B")
    run_benchmark("outside_scale", parser.parse_args(), measure_all, report)


if __name__ == "__main__":
    main()
