"""The supervisor's health port: one port for all its worker processes.

* `/livez`: 200 while the supervisor's event loop answers.
* `/readyz` (and `/health`): 200 when every worker process answers its own `/readyz`
  with 200; 503 otherwise, with each process's status and reason.
* `/metrics`: every worker process's metrics, each sample labelled `worker="<name>-<i>"`
  (sum them in the query: `sum without (worker) (...)`), plus the supervisor's own
  `mq_worker_supervisor_restarts_total` and `mq_worker_supervisor_processes_up`.

The worker processes serve their own endpoints on 127.0.0.1, on ephemeral ports they
report to the supervisor; the supervisor asks them at each probe or scrape.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import anyio
import anyio.abc
import orjson
from prometheus_client import CollectorRegistry, make_asgi_app
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from mq_worker.health import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    PATHS,
    HealthServer,
    _json,
    _Response,
)

if TYPE_CHECKING:
    from mq_worker.supervisor import Child, Supervisor

CHILD_TIMEOUT = 2.0
_T = TypeVar("_T")


async def http_get(port: int, path: str, timeout: float = CHILD_TIMEOUT) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path; (0, b"") when it does not answer."""
    chunks: list[bytes] = []
    try:
        with anyio.fail_after(timeout):
            async with await anyio.connect_tcp("127.0.0.1", port) as connection:
                await connection.send(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      "Accept: text/plain\r\n\r\n".encode("latin-1"))
                async for chunk in connection:
                    chunks.append(chunk)
    except (OSError, TimeoutError, anyio.BrokenResourceError):
        return 0, b""
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    return (int(parts[1]), body) if len(parts) > 1 and parts[1].isdigit() else (0, b"")


async def child_readiness(child: Child) -> tuple[bool, str]:
    port = child.health_port
    if port is None:
        return False, "not started"
    status, body = await http_get(port, "/readyz")
    if status == 200:
        return True, "ok"
    try:
        reason = str(orjson.loads(body).get("reason") or "not ready")
    except (orjson.JSONDecodeError, AttributeError):
        reason = "not answering"
    return False, reason


async def ask_each(children: Sequence[Child],
                   ask: Callable[[Child], Awaitable[_T]]) -> list[_T]:
    """`ask` every child at once; the answers in the order of `children`."""
    answers: dict[int, _T] = {}

    async def one(index: int, child: Child) -> None:
        answers[index] = await ask(child)

    async with anyio.create_task_group() as tg:
        for index, child in enumerate(children):
            tg.start_soon(one, index, child)
    return [answers[index] for index in range(len(children))]


async def all_ready(children: Sequence[Child]) -> bool:
    return all([(await child_readiness(child))[0] for child in children])


class _Scraped(Collector):
    """The metric families last fetched from the children, relabelled by worker."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_families(texts: Iterable[tuple[str, str]]) -> list[Metric]:
    """Prometheus text of each worker, as (worker name, text), merged into one family per
    name with a `worker` label on every sample."""
    merged: dict[str, Metric] = {}
    for worker, text in texts:
        for family in text_string_to_metric_families(text):
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation,
                                                      family.type, family.unit)
            for sample in family.samples:
                target.add_sample(sample.name, {**sample.labels, "worker": worker},
                                  sample.value, sample.timestamp, sample.exemplar)
    return list(merged.values())


def supervisor_families(children: Sequence[Child]) -> list[Metric]:
    restarts = Metric("mq_worker_supervisor_restarts", "Worker processes restarted.", "counter")
    up = Metric("mq_worker_supervisor_processes_up",
                "1 while a worker process reports its health port.", "gauge")
    for child in children:
        restarts.add_sample("mq_worker_supervisor_restarts_total", {"worker": child.name},
                            float(child.restarts))
        up.add_sample("mq_worker_supervisor_processes_up", {"worker": child.name},
                      1.0 if child.health_port is not None else 0.0)
    return [restarts, up]


class SupervisorHealth(HealthServer):
    """Answers like a worker's HealthServer, for all the supervisor's worker processes."""

    def __init__(self, supervisor: Supervisor, *,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 header_timeout: float = DEFAULT_HEADER_TIMEOUT) -> None:
        self.supervisor = supervisor
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.refused = 0
        self._connections: set[anyio.abc.ByteStream] = set()
        self._scraped = _Scraped()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self._scraped)
        self._metrics_app = make_asgi_app(registry)

    async def respond(self, method: str, target: str, headers: dict[str, str]) -> _Response:
        path, _, query = target.partition("?")
        if path not in PATHS:
            return _json(404, {"status": "not found", "paths": list(PATHS)})
        if method not in ("GET", "HEAD"):
            return _json(405, {"status": "method not allowed"})
        children = self.supervisor.children
        if path == "/livez":
            return _json(200, {"status": "ok", "processes": len(children)})
        if path == "/metrics":
            texts = await ask_each(children, self._child_metrics)
            self._scraped.families = [
                *merge_families((c.name, t) for c, t in zip(children, texts, strict=True) if t),
                *supervisor_families(children)]
            return await self._metrics(method, path, query, headers)
        states = await ask_each(children, child_readiness)
        ready = all(ok for ok, _ in states) and not self.supervisor.stopping
        return _json(200 if ready else 503, {
            "status": "ok" if ready else "unavailable",
            "reason": "ok" if ready else ("stopping" if self.supervisor.stopping
                                          else "a worker process is not ready"),
            "processes": {c.name: reason for c, (_, reason) in zip(children, states,
                                                                  strict=True)},
        })

    async def _child_metrics(self, child: Child) -> str:
        if child.health_port is None:
            return ""
        status, body = await http_get(child.health_port, "/metrics")
        return body.decode() if status == 200 else ""
