"""Testing against a real RabbitMQ: throwaway vhosts, the broker's own view of them, and a log
of every event the workers publish.

For the tests of code that submits runs or follows events (and for mq_worker's own tests
and benchmarks), with a broker running locally and its management plugin enabled::

    from mq_worker.testing import LocalBroker, event_log

    broker = LocalBroker.from_environment()
    with broker.throwaway_vhost("my-test") as vhost:
        async with event_log(vhost.url) as events:
            ...  # start a worker and submit runs on vhost.url
            await events.wait_terminal([run.id])

Vhosts are created and deleted through the management API. Connections are listed and
closed with `rabbitmqctl` on the local node: the management API lists a new connection only
once its statistics are collected (every 5 s). For a queue's messages ready and consumers
now, declare it passively: the counts of `rabbitmqctl list_queues` (and the management API's)
of a quorum queue lag by seconds.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aio_pika.abc
import anyio

from mq_worker.events import Event
from mq_worker.topology import EVENT_TYPE_PREFIX, EVENTS_EXCHANGE, JSON_CONTENT_TYPE

# Every vhost may be given to the user fully: a test's vhost is its own.
_ALL = {"configure": ".*", "write": ".*", "read": ".*"}


@dataclass(frozen=True)
class LocalBroker:
    """A RabbitMQ node to test against: its AMQP address, management API and credentials."""

    host: str = "127.0.0.1"
    port: int = 5672
    management_url: str = "http://127.0.0.1:15672/api"
    user: str = "guest"
    password: str = "guest"

    @classmethod
    def from_environment(cls, prefix: str = "MQ_WORKER_TEST") -> LocalBroker:
        """The broker named by `<prefix>_HOST`, `_PORT` and `_MANAGEMENT`, else the local one."""
        host = os.environ.get(f"{prefix}_HOST", cls.host)
        return cls(
            host=host,
            port=int(os.environ.get(f"{prefix}_PORT", str(cls.port))),
            management_url=os.environ.get(f"{prefix}_MANAGEMENT", f"http://{host}:15672/api"),
        )

    def management(self, method: str, path: str, body: Any = None) -> Any:
        """One call of the management API (`path` after `/api`); its JSON answer, if any."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.management_url + path, method=method, data=data)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request.add_header("Authorization", "Basic " + token)
        request.add_header("content-type", JSON_CONTENT_TYPE)
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def create_vhost(self, name: str) -> VHost:
        """A new vhost, fully permitted to this broker's user."""
        quoted = urllib.parse.quote(name, safe="")
        self.management("PUT", f"/vhosts/{quoted}")
        self.management("PUT", f"/permissions/{quoted}/{self.user}", _ALL)
        return VHost(name, self)

    def delete_vhost(self, name: str) -> None:
        self.management("DELETE", f"/vhosts/{urllib.parse.quote(name, safe='')}")

    @contextmanager
    def throwaway_vhost(self, prefix: str = "t") -> Iterator[VHost]:
        """A vhost of its own (`<prefix>-<random>`), deleted afterwards with all it holds."""
        vhost = self.create_vhost(f"{prefix}-{uuid.uuid4().hex[:12]}")
        try:
            yield vhost
        finally:
            with suppress(OSError):
                self.delete_vhost(vhost.name)


def rabbitmqctl(*args: str, node: str | None = None) -> str:
    """`rabbitmqctl` (on PATH) against the local node, or `node`; its standard output."""
    command = ["rabbitmqctl", *(["-n", node] if node else []), *args]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout


@dataclass
class VHost:
    """A vhost of a broker, owned by one test."""

    name: str
    broker: LocalBroker = field(default_factory=LocalBroker.from_environment)

    @property
    def url(self) -> str:
        return self.url_for(self.broker.user, self.broker.password)

    def url_for(self, user: str, password: str, port: int | None = None) -> str:
        """The AMQP URL of this vhost for another user, or through another port (a proxy)."""
        quoted = urllib.parse.quote(self.name, safe="")
        return f"amqp://{user}:{password}@{self.broker.host}:{port or self.broker.port}/{quoted}"

    def consumers(self, queue: str | None = None) -> list[dict[str, str]]:
        """Consumers as the broker lists them right now (rabbitmqctl, not statistics)."""
        out = rabbitmqctl("list_consumers", "-p", self.name, "--formatter", "json",
                          "queue_name", "consumer_tag", "channel_pid")
        rows: list[dict[str, str]] = json.loads(out or "[]")
        return [r for r in rows if queue is None or r["queue_name"] == queue]

    def queue_counts(self) -> dict[str, tuple[int, int]]:
        """{queue: (ready, unacknowledged)} of every queue, as `rabbitmqctl` lists them: those
        of a quorum queue can be seconds old."""
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
        """Close this vhost's connections whose client-given name contains `match`; their
        number. The broker has sent them its close; the clients see it next.

        By `rabbitmqctl`, not the management API, which neither lists nor closes (404) a
        connection opened less than a statistics interval (up to 5 s) ago."""
        closed = 0
        for pid, props in self.connections():
            if '"connection_name","' in props and match in props:
                rabbitmqctl("close_connection", pid, "closed by a test")
                closed += 1
        return closed


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
        return [e.type.removeprefix(EVENT_TYPE_PREFIX) for e in self.of(run_id)]

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
    """Every event published on `mq_worker.events` of the vhost at `url` while inside."""
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
