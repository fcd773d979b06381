"""The dashboard's web application: its state, its routes, and serving it until cancelled."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import jinja2
import structlog
from aiohttp import web

from mq_worker.broker import TlsOptions
from mq_worker.dashboard.access import Access
from mq_worker.dashboard.brokerview import BrokerView
from mq_worker.dashboard.live import LiveFeed
from mq_worker.dashboard.queries import DashboardStore, Overview
from mq_worker.ledger.database import redact
from mq_worker.ledger.store import AsyncLedgerStore

log = structlog.get_logger("mq_worker.dashboard")

HERE = Path(__file__).parent
APP_KEY: web.AppKey[Dashboard] = web.AppKey("dashboard")
LAST_HOUR_CACHE_SECONDS = 3.0


@dataclass(frozen=True)
class DashboardOptions:
    urls: Sequence[str]
    db: str
    host: str = "127.0.0.1"
    port: int = 8080
    auth_file: Path | None = None
    signing_key_file: Path | None = None
    management_url: str | None = None
    tls: TlsOptions | None = None


class Dashboard:
    """Everything the handlers share: the ledger, the live feed, the broker, the templates."""

    def __init__(self, options: DashboardOptions, store: AsyncLedgerStore,
                 access: Access) -> None:
        self.options = options
        self.store = store
        self.queries: DashboardStore = store.store  # type: ignore[assignment]
        self.access = access
        self.feed = LiveFeed(options.urls, tls=options.tls)
        self.broker = BrokerView(options.urls, tls=options.tls,
                                 signing_key_file=options.signing_key_file,
                                 management_url=options.management_url)
        self._last_hour: tuple[float, Overview] | None = None
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True, undefined=jinja2.StrictUndefined, enable_async=False)
        from mq_worker.dashboard import views

        self.templates.globals.update(views.TEMPLATE_GLOBALS)
        self.templates.filters.update(views.TEMPLATE_FILTERS)

    async def last_hour(self) -> Overview:
        """The last hour's statistics, shared by the pages that ask within a few seconds:
        each open overview refreshes them, and they read every run of the hour."""
        now = time.monotonic()
        if self._last_hour is None or now - self._last_hour[0] > LAST_HOUR_CACHE_SECONDS:
            self._last_hour = (now, await self.call(self.queries.overview))
        return self._last_hour[1]

    async def call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        return await self.store.call(method, *args, **kwargs)

    def render(self, request: web.Request, template: str, **context: Any) -> web.Response:
        """`template` rendered with `context` and what every page needs."""
        context.setdefault("message", None)
        context.setdefault("error", None)
        html = self.templates.get_template(template).render(
            csrf_token=self.access.csrf_token, path=request.path,
            connected=self.feed.connected, **context)
        return web.Response(text=html, content_type="text/html")


def build_app(dashboard: Dashboard) -> web.Application:
    from mq_worker.dashboard import api, views

    app = web.Application(middlewares=[dashboard.access.middleware],
                          client_max_size=2 * 1024 * 1024)
    app[APP_KEY] = dashboard
    app.add_routes(views.routes)
    app.add_routes(api.routes)
    app.router.add_static("/static/", HERE / "static", name="static")
    return app


async def open_store(db: str) -> AsyncLedgerStore:
    store = await anyio.to_thread.run_sync(lambda: DashboardStore(db))
    wrapped = AsyncLedgerStore(store)
    await wrapped.call(store.prepare)
    return wrapped


async def serve_dashboard(options: DashboardOptions,
                          started: anyio.Event | None = None) -> None:
    """Serve the dashboard (and follow the broker for it) until cancelled."""
    access = Access.for_host(options.host, options.auth_file)
    store = await open_store(options.db)
    dashboard = Dashboard(options, store, access)
    runner = web.AppRunner(build_app(dashboard), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, options.host, options.port)
        await site.start()
        log.info("dashboard serving", url=f"http://{options.host}:{options.port}/",
                 db=redact(options.db), authentication=access.secret is not None)
        if started is not None:
            started.set()
        await dashboard.feed.serve()
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
            with contextlib.suppress(Exception):
                await dashboard.broker.close()
            with contextlib.suppress(Exception):
                await store.close()
