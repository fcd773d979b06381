"""The probe and metrics port of a worker: `/livez`, `/readyz` (alias `/health`), `/metrics`.

* `GET /livez`: 200 while the worker's event loop answers. A liveness probe: it stays
  200 during a broker outage, so an orchestrator does not restart every worker then.
* `GET /readyz` (and `/health`, its older name): 200 while the worker is connected and
  consuming, 503 with the reason otherwise (reconnecting, outbox full, not consuming,
  stopping). A readiness probe. The body is a small JSON object either way.
* `GET /metrics`: the worker's Prometheus registry, served by prometheus-client's own
  handler (its ASGI app): the text format or OpenMetrics as the scraper's `Accept` header
  asks, gzip when accepted, `name[]` filtering.

The port binds 127.0.0.1 unless told otherwise (`--health-host`). It is a deliberately
small HTTP/1.1 server, one request per connection, that cannot be made to hold the
worker's file descriptors: at most `max_connections` connections are served at once
(the excess is answered 503 and closed at once), a request's headers must arrive within
`header_timeout` seconds and fit in 8 KiB.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Coroutine, MutableMapping
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import orjson
import structlog
from anyio.streams.buffered import BufferedByteReceiveStream
from prometheus_client import make_asgi_app

from mq_worker.errors import ConfigurationError

if TYPE_CHECKING:
    from mq_worker.workers.base import BaseWorker

log = structlog.get_logger("mq_worker.health")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_MAX_CONNECTIONS = 64
# A failed accept for want of descriptors or memory is retried after this long.
ACCEPT_RETRY_SECONDS = 0.5
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
DEFAULT_HEADER_TIMEOUT = 5.0
MAX_HEADER_BYTES = 8192
PATHS = ("/livez", "/readyz", "/health", "/metrics")

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            503: "Service Unavailable"}


class _Response:
    def __init__(self, status: int, body: bytes, content_type: str = "application/json",
                 headers: list[tuple[str, str]] | None = None) -> None:
        self.status = status
        self.body = body
        self.headers = [("Content-Type", content_type), *(headers or [])]

    def encode(self, head_only: bool = False) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {_REASONS.get(self.status, '')}",
                 *(f"{name}: {value}" for name, value in self.headers),
                 f"Content-Length: {len(self.body)}", "Cache-Control: no-store",
                 "Connection: close"]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


def _json(status: int, body: dict[str, object]) -> _Response:
    return _Response(status, orjson.dumps(body))


class HealthServer:
    """Answers the probes and /metrics of one worker."""

    def __init__(self, worker: BaseWorker, *, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 header_timeout: float = DEFAULT_HEADER_TIMEOUT) -> None:
        self.worker = worker
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.refused = 0
        self._connections: set[anyio.abc.ByteStream] = set()
        self._metrics_app = make_asgi_app(worker.metrics.registry)

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def respond(self, method: str, target: str, headers: dict[str, str]) -> _Response:
        path, _, query = target.partition("?")
        if path not in PATHS:
            return _json(404, {"status": "not found", "paths": list(PATHS)})
        if method not in ("GET", "HEAD"):
            return _json(405, {"status": "method not allowed"})
        worker = self.worker
        if path == "/metrics":
            return await self._metrics(method, path, query, headers)
        if path == "/livez":
            return _json(200, {"status": "ok", "worker": worker.name})
        healthy, reason = worker.health()
        return _json(200 if healthy else 503, {
            "status": "ok" if healthy else "unavailable",
            "reason": reason,
            "worker": worker.name,
            "in_flight": len(worker.in_flight),
            "free_slots": worker.free_slots,
        })

    async def _metrics(self, method: str, path: str, query: str,
                       headers: dict[str, str]) -> _Response:
        """prometheus-client's ASGI app, called for one request."""
        scope = {"type": "http", "method": method, "path": path,
                 "query_string": query.encode("latin-1"),
                 "headers": [(k.encode("latin-1"), v.encode("latin-1"))
                             for k, v in headers.items()]}
        sent: list[MutableMapping[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        await self._metrics_app(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        response_headers = [(k.decode("latin-1"), v.decode("latin-1"))
                            for k, v in start.get("headers", [])]
        content_type = next((v for k, v in response_headers if k.lower() == "content-type"),
                            "text/plain")
        others = [(k, v) for k, v in response_headers
                  if k.lower() not in ("content-type", "content-length")]
        return _Response(int(start["status"]), body, content_type, others)

    async def handle(self, connection: anyio.abc.ByteStream) -> None:
        """Answer one request on `connection`, then close it."""
        async with connection:
            if len(self._connections) >= self.max_connections:
                self.refused += 1
                await self._send(connection, _json(503, {"status": "busy"}).encode())
                return
            self._connections.add(connection)
            try:
                response, head_only = await self._read_request(connection)
                await self._send(connection, response.encode(head_only))
            finally:
                self._connections.discard(connection)

    async def _read_request(self, connection: anyio.abc.ByteStream) -> tuple[_Response, bool]:
        try:
            with anyio.fail_after(self.header_timeout):
                head = await BufferedByteReceiveStream(connection).receive_until(
                    b"\r\n\r\n", MAX_HEADER_BYTES)
        except TimeoutError:
            return _json(408, {"status": "headers too slow"}), False
        except anyio.DelimiterNotFound:
            return _json(431, {"status": "headers too large"}), False
        except (anyio.IncompleteRead, anyio.BrokenResourceError, ConnectionError):
            return _json(400, {"status": "incomplete request"}), False
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _json(400, {"status": "bad request line"}), False
        method, path, _ = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return await self.respond(method, path, headers), method == "HEAD"

    async def _send(self, connection: anyio.abc.ByteStream, data: bytes) -> None:
        with anyio.move_on_after(self.header_timeout), contextlib.suppress(
                anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
            await connection.send(data)


async def serve_health(
    worker: BaseWorker,
    port: int,
    host: str = DEFAULT_HOST,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the probes and /metrics on host:port (port 0: any free port) until cancelled.

    Reports the port actually bound through `task_status`; a port that cannot be
    bound is a ConfigurationError.
    """
    handler = HealthServer(worker, max_connections=max_connections,
                           header_timeout=header_timeout)
    await serve_handler(handler, port, host, task_status=task_status)


async def serve_handler(
    handler: HealthServer, port: int, host: str = DEFAULT_HOST, *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` (a HealthServer or one that answers like it) on host:port."""
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port,
                                                   backlog=128)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve the health endpoint on {host}:{port}: {exc.strerror or exc}"
        ) from exc

    async def answer(connection: anyio.abc.ByteStream) -> None:
        try:
            await handler.handle(connection)
        except Exception:  # one failed request must not stop the endpoint
            log.exception("health request failed")

    async with listener:
        bound = listener.extra(anyio.abc.SocketAttribute.local_port)
        log.info("health endpoint listening", host=host, port=bound, paths=list(PATHS))
        task_status.started(bound)
        # Cancelled, the listeners close and every connection's task ends with it.
        async with anyio.create_task_group() as tg:
            for one in listener.listeners:
                assert isinstance(one, anyio.abc.SocketListener), one
                tg.start_soon(_accept_forever, one, answer, tg)


async def _accept_forever(
    listener: anyio.abc.SocketListener,
    answer: Callable[[anyio.abc.SocketStream], Coroutine[Any, Any, None]],
    tg: anyio.abc.TaskGroup,
) -> None:
    """Accept connections; out of descriptors or memory, wait and accept again.

    anyio's `serve` ends at the first failed accept, which would let a client that
    exhausts the worker's descriptors close the endpoint for good.
    """
    while True:
        try:
            connection = await listener.accept()
        except OSError as exc:
            if exc.errno not in _RESOURCE_ERRORS:
                raise
            log.warning("health endpoint cannot accept: waiting for resources",
                        error=exc.strerror or str(exc), retry_seconds=ACCEPT_RETRY_SECONDS)
            await anyio.sleep(ACCEPT_RETRY_SECONDS)
            continue
        tg.start_soon(answer, connection)
