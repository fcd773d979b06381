"""Fixtures: a vhost of its own on the real broker for every test, workers, event logs.

Every test gets a fresh vhost (created through the management API, deleted
afterwards), so the fixed names of the wire contract never collide between
tests. Nothing here mocks the broker.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import pytest

from mq_worker import logs
from mq_worker.events import Event
from mq_worker.settings import WorkerSettings
from mq_worker.topology import EVENTS_EXCHANGE
from mq_worker.workers.process import ProcessWorker

HOST = os.environ.get("MQ_WORKER_TEST_HOST", "127.0.0.1")
PORT = int(os.environ.get("MQ_WORKER_TEST_PORT", "5672"))
MANAGEMENT = os.environ.get("MQ_WORKER_TEST_MANAGEMENT", f"http://{HOST}:15672/api")
PROBE = str(Path(__file__).parent / "helpers" / "probe.py")
PYTHON = sys.executable

logs.configure("console", os.environ.get("MQ_WORKER_TEST_LOG_LEVEL", "WARNING"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def management(method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(MANAGEMENT + path, method=method, data=data)
    request.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        payload = response.read()
    return json.loads(payload) if payload else None


def rabbitmqctl(*args: str, node: str | None = None) -> str:
    command = ["rabbitmqctl", *(["-n", node] if node else []), *args]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout


@dataclass
class VHost:
    """A vhost of the local broker, owned by one test."""

    name: str
    user: str = "guest"
    password: str = "guest"

    @property
    def url(self) -> str:
        return self.url_for(self.user, self.password)

    def url_for(self, user: str, password: str, port: int = PORT) -> str:
        return f"amqp://{user}:{password}@{HOST}:{port}/{urllib.parse.quote(self.name, safe='')}"

    def consumers(self, queue: str | None = None) -> list[dict[str, str]]:
        """Consumers as the broker lists them right now (rabbitmqctl, not statistics)."""
        out = rabbitmqctl("list_consumers", "-p", self.name, "--formatter", "json",
                          "queue_name", "consumer_tag", "channel_pid")
        rows = json.loads(out or "[]")
        return [r for r in rows if queue is None or r["queue_name"] == queue]

    def queue_counts(self) -> dict[str, tuple[int, int]]:
        """{queue: (ready, unacknowledged)} as the broker has them right now."""
        out = rabbitmqctl("list_queues", "-p", self.name, "--formatter", "json",
                          "name", "messages_ready", "messages_unacknowledged")
        return {r["name"]: (int(r["messages_ready"]), int(r["messages_unacknowledged"]))
                for r in json.loads(out or "[]")}

    def connections(self) -> list[tuple[str, str]]:
        """(pid, client properties as the broker prints them) of this vhost's connections."""
        out = rabbitmqctl("list_connections", "-q", "--no-table-headers", "vhost", "pid",
                          "client_properties")
        rows = [line.split("\t", 2) for line in out.splitlines() if line.count("\t") >= 2]
        return [(pid, props) for vhost, pid, props in rows if vhost == self.name]

    def close_connections(self, match: str = "") -> int:
        """Close (rabbitmqctl close_connection) this vhost's connections whose name has `match`."""
        closed = 0
        for pid, props in self.connections():
            if '"connection_name","' in props and match in props:
                rabbitmqctl("close_connection", pid, "closed by a test")
                closed += 1
        return closed


@pytest.fixture
def vhost() -> Iterator[VHost]:
    name = f"t-{uuid.uuid4().hex[:12]}"
    management("PUT", f"/vhosts/{name}")
    management("PUT", f"/permissions/{name}/guest",
               {"configure": ".*", "write": ".*", "read": ".*"})
    try:
        yield VHost(name)
    finally:
        management("DELETE", f"/vhosts/{name}")


@dataclass
class EventLog:
    """Every event published in a vhost, as subscribers receive them."""

    events: list[Event] = field(default_factory=list)
    raw: list[aio_pika.abc.AbstractIncomingMessage] = field(default_factory=list)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    def _add(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.raw.append(message)
        self.events.append(Event.from_body(message.body))
        self._changed.set()
        self._changed = anyio.Event()

    def of(self, run_id: Any) -> list[Event]:
        return [e for e in self.events if e.subject == str(run_id)]

    def types(self, run_id: Any) -> list[str]:
        return [e.type.removeprefix("mq_worker.") for e in self.of(run_id)]

    def terminal(self, run_id: Any) -> list[Event]:
        return [e for e in self.of(run_id) if e.is_terminal]

    async def wait_for(self, predicate: Callable[[list[Event]], Any], timeout: float = 15) -> Any:
        """Wait until predicate(events) is truthy; return its value."""
        with anyio.fail_after(timeout):
            while True:
                value = predicate(self.events)
                if value:
                    return value
                await self._changed.wait()

    async def wait_terminal(self, run_ids: Any, timeout: float = 15) -> None:
        ids = [str(r) for r in run_ids]
        await self.wait_for(lambda _: all(self.terminal(r) for r in ids), timeout)


def unique(events: list[Event]) -> list[Event]:
    """Events without the copies a reconnection may publish again (same id)."""
    seen: set[str] = set()
    kept = []
    for event in events:
        if event.id not in seen:
            seen.add(event.id)
            kept.append(event)
    return kept


@asynccontextmanager
async def event_log(url: str) -> AsyncIterator[EventLog]:
    log = EventLog()
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(EVENTS_EXCHANGE, "topic", durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "#")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            log._add(message)

        await queue.consume(on_message, no_ack=True)
        yield log
    finally:
        with anyio.move_on_after(10, shield=True):
            await connection.close()


@pytest.fixture
async def events(vhost: VHost) -> AsyncIterator[EventLog]:
    async with event_log(vhost.url) as log:
        yield log


def worker_settings(url: str | list[str], **overrides: Any) -> WorkerSettings:
    defaults: dict[str, Any] = {
        "url": url if isinstance(url, list) else [url], "name": f"w-{uuid.uuid4().hex[:6]}",
        "heartbeat_seconds": 30.0, "prefetch_seconds": 10.0,
    }
    return WorkerSettings(**{**defaults, **overrides})


@asynccontextmanager
async def running_worker(
    url: str | list[str], **overrides: Any
) -> AsyncIterator[ProcessWorker]:
    """A worker serving in this test's event loop (with these broker addresses, in order),
    stopped (and drained) at exit."""
    worker = ProcessWorker(worker_settings(url, **overrides))
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.serve)
        with anyio.fail_after(30):
            await worker.ready.wait()
        try:
            yield worker
        finally:
            worker.stop(force=True)


async def publish_raw(
    url: str,
    body: bytes | dict[str, Any],
    *,
    routing_key: str = "run.scheduled.default.default",
    headers: dict[str, Any] | None = None,
    exchange: str = "mq_worker.runs",
) -> None:
    """Publish like an outside client would: plain aio-pika, no mq_worker code."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        target = await channel.get_exchange(exchange) if exchange else channel.default_exchange
        await target.publish(
            aio_pika.Message(body, content_type="application/json",
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT, headers=headers),
            routing_key=routing_key,
        )


def probe(directory: Path, *, sleep: float = 0.0, exit_code: int = 0, extra: str = "") -> str:
    """A command that records its run in `directory` (see tests/helpers/probe.py)."""
    return shlex.join([PYTHON, PROBE, str(directory), "--sleep", str(sleep),
                       "--exit", str(exit_code)]) + (f" {extra}" if extra else "")


def run_body(command: str | None = None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": str(uuid.uuid4())}
    if command is not None:
        body["job_variables"] = {"command": command}
    body.update(fields)
    return body


def started_runs(directory: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in directory.glob("*.start")}


def ended_runs(directory: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in directory.glob("*.end")}


class WorkerProcess:
    """`mq-worker start` as a separate process, as operators run it."""

    def __init__(self, url: str, *args: str, name: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name or f"p-{uuid.uuid4().hex[:6]}"
        self.log_path = Path(f"/tmp/mq_worker-test-{self.name}.log")
        self._log_file = self.log_path.open("w")
        self.process = subprocess.Popen(
            [PYTHON, "-m", "mq_worker", "start", "--url", url, "--name", self.name,
             "--log-format", "json", *args],
            stdout=self._log_file, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                lines.append({"event": line})
        return lines

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._log_file.close()


@pytest.fixture
def worker_processes() -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(url: str, *args: str, **kwargs: Any) -> WorkerProcess:
        process = WorkerProcess(url, *args, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


async def wait_until(condition: Callable[[], Any], timeout: float = 15,
                     interval: float = 0.05) -> Any:
    """Poll an outside condition (a file, the broker's state) until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout} s")
        await anyio.sleep(interval)
