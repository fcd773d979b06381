"""The local broker as tests administer it: the management API, rabbitmqctl, a vhost per test."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import aio_pika

HOST = os.environ.get("MQ_WORKER_TEST_HOST", "127.0.0.1")
PORT = int(os.environ.get("MQ_WORKER_TEST_PORT", "5672"))
MANAGEMENT = os.environ.get("MQ_WORKER_TEST_MANAGEMENT", f"http://{HOST}:15672/api")


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
