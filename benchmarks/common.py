"""What every benchmark shares: vhosts, worker processes, raw AMQP publishing and event watching,
the probe command, statistics, tables and result files.

Everything here talks to the broker the way an outside client would: plain aio-pika and the
names of the wire contract (docs/protocol.md), never mq_worker's own publisher or subscriber.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aio_pika
import aio_pika.abc
import orjson
import psutil

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
BUILD = RESULTS / ".build"
PYTHON = sys.executable  # an absolute interpreter path: `python3` on PATH may be a shim

HOST = os.environ.get("MQ_WORKER_BENCH_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("MQ_WORKER_BENCH_PORT", "5672"))
MANAGEMENT = os.environ.get("MQ_WORKER_BENCH_MANAGEMENT", f"http://{HOST}:15672/api")
USER, PASSWORD = "guest", "guest"

# The wire contract (docs/protocol.md).
RUNS_EXCHANGE = "mq_worker.runs"
EVENTS_EXCHANGE = "mq_worker.events"
SCHEDULED_KEY = "run.scheduled.default.default"
CANCEL_KEY = "run.cancel.default"
WORKER_STARTED = "mq_worker.worker.started"
RUN_PENDING = "mq_worker.run.pending"
RUN_SUBMITTED = "mq_worker.run.submitted"
RUN_COMPLETED = "mq_worker.run.completed"
RUN_CRASHED = "mq_worker.run.crashed"
RUN_CANCELLED = "mq_worker.run.cancelled"
RUN_REJECTED = "mq_worker.run.rejected"
FAILURES = (RUN_CRASHED, RUN_REJECTED)


# -- the broker's management API and vhosts ---------------------------------------------


def management(method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(MANAGEMENT + path, method=method, data=data)
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    request.add_header("Authorization", "Basic " + token)
    request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = response.read()
    return json.loads(payload) if payload else None


@dataclass(frozen=True)
class VHost:
    name: str

    @property
    def url(self) -> str:
        quoted = urllib.parse.quote(self.name, safe="")
        return f"amqp://{USER}:{PASSWORD}@{HOST}:{AMQP_PORT}/{quoted}"


@contextlib.contextmanager
def vhost(prefix: str) -> Iterator[VHost]:
    """A vhost of its own for one benchmark, deleted afterwards."""
    name = f"bench-{prefix}-{uuid.uuid4().hex[:8]}"
    management("PUT", f"/vhosts/{name}")
    management("PUT", f"/permissions/{name}/{USER}",
               {"configure": ".*", "write": ".*", "read": ".*"})
    try:
        yield VHost(name)
    finally:
        with contextlib.suppress(OSError):
            management("DELETE", f"/vhosts/{name}")


# -- the machine -------------------------------------------------------------------------


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


def broker_process(port: int = 5672) -> psutil.Process | None:
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


# -- the probe command -------------------------------------------------------------------


def probe_command() -> str:
    """The path of the probe (benchmarks/probe.c), compiled if needed; see probe.c.

    Without a C compiler, a bash script with the same behaviour is used (bash's
    start-up then counts in the figures: about a millisecond more).
    """
    source = BENCH / "probe.c"
    binary = BUILD / "probe"
    compiler = shutil.which("cc") or shutil.which("gcc")
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return str(binary)
    if compiler is not None:
        BUILD.mkdir(parents=True, exist_ok=True)
        subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], check=True)
        return str(binary)
    return str(BENCH / "probe.sh")


@dataclass
class ProbeLog:
    """The lines the probe appends: 'S <run id> <unix time>' at start, 'T ...' on SIGTERM."""

    path: Path
    _offset: int = 0
    _partial: bytes = b""
    started: dict[str, float] = field(default_factory=dict)
    terminated: dict[str, float] = field(default_factory=dict)

    def read(self) -> None:
        """Read what was appended since the last call."""
        try:
            with self.path.open("rb") as file:
                file.seek(self._offset)
                chunk = file.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            kind, run_id, stamp = line.decode().split()
            (self.started if kind == "S" else self.terminated)[run_id] = float(stamp)

    async def wait_started(self, run_id: str, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while run_id not in self.started:
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} did not start within {timeout} s")
            await asyncio.sleep(0.0005)
            self.read()
        return self.started[run_id]


def run_body(run_id: str, command: str, **variables: Any) -> bytes:
    job_variables = {"command": command, "stream_output": False, **variables}
    return orjson.dumps({"id": run_id, "job_variables": job_variables})


# -- worker processes --------------------------------------------------------------------


class WorkerProcess:
    """`python -m mq_worker start` as a process of its own; SIGTERM stops it gracefully."""

    def __init__(
        self,
        url: str,
        *,
        limit: int,
        name: str,
        loop: str = "auto",
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.argv = [
            PYTHON, "-m", "mq_worker", "start", "--url", url, "--limit", str(limit),
            "--name", name, "--log-level", "WARNING", "--log-format", "json", "--loop", loop,
            *extra_args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.log_path = RESULTS / "logs" / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=log, env=self.env,
                                          cwd=ROOT, stdin=subprocess.DEVNULL)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def rss_bytes(self) -> int:
        return int(self.process.memory_info().rss)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"worker {self.name} exited with {self.popen.returncode}:\n{tail}")


@contextlib.contextmanager
def workers(
    url: str, count: int, *, limit: int, prefix: str, loop: str = "auto",
    env: dict[str, str] | None = None,
) -> Iterator[list[WorkerProcess]]:
    started = [
        WorkerProcess(url, limit=limit, name=f"{prefix}-{i}", loop=loop, env=env).start()
        for i in range(count)
    ]
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()


# -- raw AMQP: publishing runs and cancels, watching events ---------------------------------


class Publisher:
    """Publishes runs and cancels with plain aio-pika: persistent, mandatory, confirmed."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    async def __aenter__(self) -> Self:
        self._connection = await aio_pika.connect_robust(self.url)
        channel = await self._connection.channel(publisher_confirms=True)
        self._exchange = await channel.declare_exchange(
            RUNS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def publish(self, body: bytes, routing_key: str = SCHEDULED_KEY) -> float:
        """Publish and wait for the broker's confirm; return the time just before publishing."""
        assert self._exchange is not None
        message = aio_pika.Message(
            body, content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        sent = time.time()
        await self._exchange.publish(message, routing_key=routing_key, mandatory=True)
        return sent

    async def publish_run(self, run_id: str, command: str, **variables: Any) -> float:
        return await self.publish(run_body(run_id, command, **variables))

    async def cancel(self, run_id: str, reason: str = "benchmark") -> float:
        body = orjson.dumps({"id": run_id, "reason": reason})
        return await self.publish(body, CANCEL_KEY)

    async def publish_many(self, bodies: Iterable[bytes], outstanding: int = 256) -> list[float]:
        """Publish as fast as confirms allow, with up to `outstanding` unconfirmed at once."""
        gate = asyncio.Semaphore(outstanding)

        async def one(body: bytes) -> float:
            try:
                return await self.publish(body)
            finally:
                gate.release()

        tasks = []
        for body in bodies:
            await gate.acquire()
            tasks.append(asyncio.ensure_future(one(body)))
        return list(await asyncio.gather(*tasks))


@dataclass(slots=True)
class Seen:
    """An event as the watcher received it."""

    type: str
    subject: str | None
    received: float  # time.time() when it reached the watcher
    produced: float  # the event's own `time`
    data: dict[str, Any]


class EventWatch:
    """A private queue bound to `mq_worker.events` for `types`; records every event's arrival."""

    def __init__(self, url: str, types: Sequence[str]) -> None:
        self.url = url
        self.types = list(types)
        self.events: dict[str, dict[str, Seen]] = defaultdict(dict)
        self.counts: dict[str, int] = defaultdict(int)
        self._waiters: dict[tuple[str, str], asyncio.Future[Seen]] = {}
        self._count_waiters: list[tuple[str, int, asyncio.Event]] = []
        self.on_event: Callable[[Seen], None] | None = None
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def __aenter__(self) -> Self:
        self._connection = await aio_pika.connect(self.url)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=0)
        exchange = await channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        for event_type in self.types:
            await queue.bind(exchange, routing_key=event_type)
        await queue.consume(self._on_message, no_ack=True)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        received = time.time()
        event = orjson.loads(message.body)
        produced = datetime.fromisoformat(event["time"]).timestamp()
        seen = Seen(event["type"], event.get("subject"), received, produced,
                    event.get("data") or {})
        subject = seen.subject or ""
        self.events[seen.type][subject] = seen
        self.counts[seen.type] += 1
        waiter = self._waiters.pop((seen.type, subject), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(seen)
        for event_type, count, done in self._count_waiters:
            if event_type == seen.type and self.counts[event_type] >= count:
                done.set()
        if self.on_event is not None:
            self.on_event(seen)

    async def wait_for(self, event_type: str, subject: str, timeout: float = 30.0) -> Seen:
        seen = self.events[event_type].get(subject)
        if seen is not None:
            return seen
        future: asyncio.Future[Seen] = asyncio.get_running_loop().create_future()
        self._waiters[(event_type, subject)] = future
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise TimeoutError(f"no {event_type} for {subject} within {timeout} s") from None

    async def wait_count(self, event_type: str, count: int, timeout: float,
                         check: Callable[[], None] | None = None) -> None:
        """Wait until `count` events of `event_type` have arrived; `check` runs every second."""
        done = asyncio.Event()
        entry = (event_type, count, done)
        self._count_waiters.append(entry)
        deadline = time.monotonic() + timeout
        try:
            while self.counts[event_type] < count:
                if time.monotonic() > deadline:
                    failures = {t: self.counts[t] for t in FAILURES if self.counts[t]}
                    raise TimeoutError(
                        f"{self.counts[event_type]}/{count} {event_type} after {timeout} s"
                        + (f"; failures: {failures}" if failures else "")
                    )
                if check is not None:
                    check()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 1.0)
        finally:
            self._count_waiters.remove(entry)


async def wait_workers_started(watch: EventWatch, names: Iterable[str],
                               started: Sequence[WorkerProcess] = (),
                               timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for name in names:
        while name not in watch.events[WORKER_STARTED]:
            for worker in started:
                worker.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {name} did not start within {timeout} s")
            await asyncio.sleep(0.05)


def new_id() -> str:
    return str(uuid.uuid4())


# -- statistics and output -------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_ms(seconds: Iterable[float]) -> dict[str, float]:
    """n, p50, p90, p99, max and mean of latencies given in seconds, in milliseconds."""
    values = sorted(s * 1000 for s in seconds)
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p90": round(percentile(values, 90), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(values[-1], 3),
        "mean": round(sum(values) / len(values), 3),
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "-" if value is None else str(value)


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c)
              for i, c in enumerate(columns)]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    for raw, row in zip(rows, cells, strict=True):
        lines.append("| " + " | ".join(
            v.rjust(w) if isinstance(r, int | float) and not isinstance(r, bool) else v.ljust(w)
            for r, v, w in zip(raw, row, widths, strict=True)
        ) + " |")
    return "\n".join(lines)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(f"\n{title}\n")
    print(table(columns, rows))
    sys.stdout.flush()


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write benchmarks/results/<name>.json with the machine's description."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": name,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(PYTHON).name, "-m", f"benchmarks.{name}", *sys.argv[1:]]),
        "machine": machine_info(),
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    print(f"\nresults written to {path.relative_to(ROOT)}")
    return path


def banner(name: str) -> None:
    print(f"# {name}\n\nmachine: {describe_machine(machine_info())}")
    sys.stdout.flush()
