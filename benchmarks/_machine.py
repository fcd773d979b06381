"""The machine a benchmark measures on: its description, CPU time by whom, and waiting
for other processes to calm down before measuring."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from benchmarks._broker import AMQP_PORT, management

if TYPE_CHECKING:
    from benchmarks._workers import WorkerProcess


def _package(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram_gib = psutil.virtual_memory().total / 2**30
    broker: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        overview = management("GET", "/overview")
        broker = {"rabbitmq": overview.get("rabbitmq_version"),
                  "erlang": overview.get("erlang_version")}
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram_gib, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        **broker,
        "packages": {name: _package(name) for name in (
            "mq-worker", "aio-pika", "aiormq", "anyio", "pydantic", "orjson", "structlog",
            "uvloop",
        )},
    }


def describe_machine(info: dict[str, Any]) -> str:
    packages = info["packages"]
    return (f"{info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB, "
            f"Linux {info['kernel']}, Python {info['python']}, "
            f"RabbitMQ {info.get('rabbitmq')} (Erlang {info.get('erlang')}), "
            f"aio-pika {packages['aio-pika']}, uvloop {packages['uvloop']}")


def broker_process(port: int = AMQP_PORT) -> psutil.Process | None:
    """The Erlang VM of the RabbitMQ node listening on `port`, to account for its CPU time.

    Other nodes (a test cluster, a TLS test node) may run beside it.
    """
    for connection in psutil.net_connections("tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port \
                and connection.pid is not None:
            with contextlib.suppress(psutil.Error):
                return psutil.Process(connection.pid)
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "beam.smp":
            return process
    return None


def cpu_seconds(process: psutil.Process | None) -> float:
    if process is None:
        return math.nan
    try:
        times = process.cpu_times()
    except psutil.Error:
        return math.nan
    return float(times.user + times.system)


class CpuMeter:
    """CPU seconds spent between `start()` and `stop()`: by this process, the workers (with
    their live children: the guardian), the runs they reaped, the broker, and everything else
    on the machine."""

    def __init__(self, workers: Sequence[WorkerProcess] = ()) -> None:
        self.workers = list(workers)
        self._broker = broker_process()
        self._start: dict[str, float] = {}
        self.result: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        system = psutil.cpu_times()
        own = psutil.Process().cpu_times()
        own_time = runs = helpers = 0.0
        for worker in self.workers:
            with contextlib.suppress(psutil.Error):
                process = worker.process
                t = process.cpu_times()
                own_time += t.user + t.system
                runs += t.children_user + t.children_system  # reaped: the runs
                helpers += sum(cpu_seconds(c) for c in process.children(recursive=True))
        return {
            "wall": time.monotonic(),
            "system": system.user + system.system + system.nice + system.irq + system.softirq,
            "measurer": own.user + own.system,
            "workers": own_time + helpers,
            "workers_self": own_time,
            "runs": runs,
            "broker": cpu_seconds(self._broker),
        }

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        end = self._sample()
        delta = {k: end[k] - self._start[k] for k in end}
        wall = delta.pop("wall")
        delta["others"] = (delta["system"] - delta["measurer"] - delta["workers"] - delta["runs"]
                           - delta["broker"])
        self.result = {f"{k}_cpu_s": round(v, 3) for k, v in delta.items()}
        self.result["wall_s"] = round(wall, 3)
        self.result["others_cores"] = round(delta["others"] / wall, 2) if wall else math.nan
        return self.result


def background_load(seconds: float = 2.0) -> float:
    """Cores kept busy by other processes than the broker, over `seconds` (this one idles)."""
    meter = CpuMeter()
    meter.start()
    time.sleep(seconds)
    result = meter.stop()
    return float(result["others_cores"])


def wait_for_quiet(threshold: float = 0.2, timeout: float = 120.0) -> float:
    """Wait (up to `timeout`) until other processes use less than `threshold` cores."""
    deadline = time.monotonic() + timeout
    load = background_load()
    while load > threshold and time.monotonic() < deadline:
        print(f"waiting for a quieter machine: others use {load:.2f} cores", file=sys.stderr)
        load = background_load()
    if load > threshold:
        print(f"warning: measuring on a busy machine (others use {load:.2f} cores)",
              file=sys.stderr)
    return load


async def least_disturbed(
    measure: Callable[[], Awaitable[dict[str, Any]]], *, attempts: int = 3,
    threshold: float = 0.3, quiet: float = 60.0,
) -> dict[str, Any]:
    """Run `measure` (whose result has "others_cores") after waiting for a quiet machine;
    again, up to `attempts` times, while other processes used more than `threshold` cores
    during it. The least disturbed attempt is returned, with the number of attempts."""
    best: dict[str, Any] | None = None
    for attempt in range(1, attempts + 1):
        await asyncio.to_thread(wait_for_quiet, threshold * 2 / 3, quiet)
        result = await measure()
        result["attempts"] = attempt
        if best is None or result["others_cores"] < best["others_cores"]:
            best = result
        if result["others_cores"] <= threshold:
            break
        print(f"other processes used {result['others_cores']:.2f} cores during the "
              f"measurement: measuring again", file=sys.stderr)
    assert best is not None
    return best
