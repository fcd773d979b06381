"""The health and metrics endpoint of a worker: `GET /health` and `GET /metrics` over HTTP.

`/health` answers 200 while the worker is connected and consuming, and 503
with the reason otherwise (reconnecting, outbox full, not consuming,
stopping); the body is a small JSON object either way. `/metrics` is the
worker's Prometheus registry in the text exposition format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
import anyio.abc
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from mq_worker.errors import ConfigurationError

if TYPE_CHECKING:
    from mq_worker.workers.base import BaseWorker

log = structlog.get_logger("mq_worker.health")

# Every interface: a container's health check and a Prometheus scraper both reach it.
DEFAULT_HOST = "0.0.0.0"


def make_app(worker: BaseWorker) -> web.Application:
    """The aiohttp application serving `worker`'s health and metrics."""

    async def health(request: web.Request) -> web.Response:
        healthy, reason = worker.health()
        body = {
            "status": "ok" if healthy else "unavailable",
            "reason": reason,
            "worker": worker.name,
            "in_flight": len(worker.in_flight),
            "free_slots": worker.free_slots,
        }
        return web.json_response(body, status=200 if healthy else 503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=worker.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def serve_health(
    worker: BaseWorker,
    port: int,
    *,
    host: str = DEFAULT_HOST,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `/health` and `/metrics` on `port` (0: any free port) until cancelled.

    Reports the port actually bound through `task_status`; a port that cannot be
    bound is a ConfigurationError.
    """
    runner = web.AppRunner(make_app(worker), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve the health endpoint on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        bound = _bound_port(runner, port)
        log.info("health endpoint listening", host=host, port=bound,
                 paths=["/health", "/metrics"])
        task_status.started(bound)
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await runner.cleanup()


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested
