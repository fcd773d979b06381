"""The dashboard's pages: server-rendered HTML that works without script, made live by it."""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime
from typing import Any

import aiormq.exceptions
import anyio
import structlog
from aiohttp import web
from yarl import URL

from mq_worker import topology
from mq_worker.dashboard import actions, charts
from mq_worker.dashboard.access import CSRF_FIELD
from mq_worker.dashboard.app import APP_KEY, Dashboard
from mq_worker.dashboard.queries import RunFilter
from mq_worker.errors import BrokerError
from mq_worker.ledger.records import STATES, TERMINAL_STATES, RunRecord
from mq_worker.redaction import masked

log = structlog.get_logger("mq_worker.dashboard")
routes = web.RouteTableDef()
RECENT_RUNS = 25
PAGE_SIZE = 50


def when(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")


def ago(value: float | None) -> str:
    if value is None:
        return "-"
    seconds = max(0.0, value)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


TEMPLATE_GLOBALS: dict[str, Any] = {"STATES": STATES, "TERMINAL_STATES": TERMINAL_STATES,
                                    "CSRF_FIELD": CSRF_FIELD, "outcome_bars": charts.outcome_bars,
                                    "percentile_lines": charts.percentile_lines,
                                    "topology": topology}
def pretty(value: Any) -> str:
    """JSON for people: indented, non-ASCII as it is (the template escapes it for HTML)."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


TEMPLATE_FILTERS: dict[str, Any] = {"when": when, "ago": ago, "seconds": charts.seconds,
                                    "pretty": pretty}


def _dashboard(request: web.Request) -> Dashboard:
    return request.app[APP_KEY]


async def overview_data(dashboard: Dashboard) -> dict[str, Any]:
    page = await dashboard.call(dashboard.queries.search_runs, RunFilter(), limit=RECENT_RUNS)
    stats = await dashboard.last_hour()

    async def known() -> list[tuple[str, str]]:
        """The work queues to look at when the management API cannot list them."""
        found = await dashboard.call(dashboard.queries.known_queues, time.time() - 86400)
        found.append((topology.DEFAULT_POOL, topology.DEFAULT_QUEUE))
        for row in dashboard.feed.worker_rows():
            found.extend((row["pool"], q) for q in row["queues"])
        return list(found)

    try:
        with anyio.fail_after(5):
            source, queues = await dashboard.broker.queue_depths(known)
    except Exception as exc:  # the broker away must not take the page down
        log.warning("queue depths unavailable", error=str(exc))
        source, queues = f"unavailable ({type(exc).__name__})", []
    workers = dashboard.feed.worker_rows()
    pools = sorted({w["pool"] for w in workers} | {q.name.split(".")[1] for q in queues
                                                   if q.name.count(".") == 2})
    return {"runs": page.runs, "stats": stats, "queues": queues, "queue_source": source,
            "workers": workers, "pools": pools}


@routes.get("/")
async def overview(request: web.Request) -> web.Response:
    dashboard = _dashboard(request)
    return dashboard.render(request, "overview.html", **await overview_data(dashboard))


@routes.get("/partials/overview")
async def overview_partial(request: web.Request) -> web.Response:
    """The charts and queues, refreshed by the page every few seconds."""
    dashboard = _dashboard(request)
    return dashboard.render(request, "overview_stats.html", **await overview_data(dashboard))


def run_filter(query: Any) -> RunFilter:
    def number(name: str) -> float | None:
        text = (query.get(name) or "").strip()
        if not text:
            return None
        try:
            return float(text)
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise web.HTTPBadRequest(text=f"{name}: not a time: {text!r}") from None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()

    states = tuple(s for s in query.getall("state", []) if s in STATES)
    return RunFilter(
        states=states,
        pool=query.get("pool") or None, queue=query.get("queue") or None,
        worker=query.get("worker") or None, deployment=query.get("deployment") or None,
        tag=query.get("tag") or None, since=number("since"), until=number("until"),
        search=(query.get("q") or "").strip() or None)


def page_size(query: Any) -> int:
    try:
        return max(1, min(500, int(query.get("limit", PAGE_SIZE))))
    except ValueError:
        raise web.HTTPBadRequest(text="limit: not a number") from None


def page_cursor(query: Any) -> str | None:
    """The `before` cursor of a runs page (`<created_at>/<run id>`), checked before any query."""
    cursor = (query.get("before") or "").strip()
    if not cursor:
        return None
    created, slash, run_id = cursor.partition("/")
    try:
        valid = bool(slash and run_id) and math.isfinite(float(created))
    except ValueError:
        valid = False
    if not valid:
        raise web.HTTPBadRequest(text=f"before: not a page cursor: {cursor[:80]!r}")
    return cursor


@routes.get("/runs")
async def runs(request: web.Request) -> web.Response:
    dashboard = _dashboard(request)
    where = run_filter(request.query)
    page = await dashboard.call(dashboard.queries.search_runs, where,
                                limit=page_size(request.query),
                                before=page_cursor(request.query))
    next_query = None
    if page.next_cursor:
        next_query = request.rel_url.update_query(before=page.next_cursor).query_string
    return dashboard.render(request, "runs.html", runs=page.runs, filter=where,
                            query=request.query, next_query=next_query)


def configuration_of(record: RunRecord) -> dict[str, Any] | None:
    """The job variables the worker ran it with (masked by the worker, and here again)."""
    for event in reversed(record.events):
        variables = event.data.get("job_variables")
        if event.type.endswith(".pending") and isinstance(variables, dict):
            result = masked(variables)
            return result if isinstance(result, dict) else None
    return None


@routes.get("/runs/{id}")
async def run_page(request: web.Request) -> web.Response:
    dashboard = _dashboard(request)
    run_id = request.match_info["id"]
    record = await dashboard.store.get_run(run_id)
    output = await dashboard.store.get_output(run_id) if record is not None else []
    return dashboard.render(
        request, "run.html", run_id=run_id, run=record, output=output,
        events=[{**e.as_dict(), "data": masked(e.data)} for e in (record.events if record
                                                                 else [])],
        configuration=configuration_of(record) if record else None,
        message=request.query.get("message"), error=request.query.get("error"))


async def _form(request: web.Request) -> Any:
    dashboard = _dashboard(request)
    form = await request.post()
    if not dashboard.access.csrf_ok(request, str(form.get(CSRF_FIELD) or "")):
        raise web.HTTPForbidden(text="missing or wrong CSRF token: reload the page and retry")
    return form


@routes.post("/runs/{id}/cancel")
async def cancel(request: web.Request) -> web.Response:
    await _form(request)
    run_id = request.match_info["id"]
    try:
        await actions.cancel_run(_dashboard(request), run_id, request.get("actor"))
    except actions.ActionError as exc:
        raise web.HTTPSeeOther(URL(f"/runs/{run_id}").with_query(error=str(exc))) from None
    raise web.HTTPSeeOther(URL(f"/runs/{run_id}").with_query(message="cancel published"))


@routes.get("/dead")
async def dead(request: web.Request) -> web.Response:
    dashboard = _dashboard(request)
    error = request.query.get("error")
    try:
        letters = await dashboard.broker.dead_letters()
    except (BrokerError, aiormq.exceptions.AMQPError, OSError) as exc:
        letters, error = [], f"the dead letters cannot be read now: {exc}"
    recent = await dashboard.call(dashboard.queries.actions, 20)
    return dashboard.render(request, "dead.html", letters=letters, actions=recent,
                            message=request.query.get("message"), error=error)


@routes.post("/dead")
async def dead_action(request: web.Request) -> web.Response:
    form = await _form(request)
    keys = [str(k) for k in form.getall("key", [])]
    edited = form.get("body")
    try:
        count = await actions.settle_dead_letters(
            _dashboard(request), request.get("actor"), str(form.get("action") or ""), keys,
            str(edited) if edited is not None else None)
    except actions.ActionError as exc:
        raise web.HTTPSeeOther(URL("/dead").with_query(error=str(exc))) from None
    verb = "replayed" if form.get("action") == "replay" else "discarded"
    raise web.HTTPSeeOther(URL("/dead").with_query(message=f"{count} {verb}"))


@routes.get("/submit")
async def submit_form(request: web.Request) -> web.Response:
    return _dashboard(request).render(request, "submit.html", values={}, error=None,
                                      default_pool=topology.DEFAULT_POOL,
                                      default_queue=topology.DEFAULT_QUEUE)


@routes.post("/submit")
async def submit(request: web.Request) -> web.Response:
    form = await _form(request)
    values = {k: str(form.get(k) or "") for k in
              ("pool", "queue", "command", "name", "job_variables", "start")}
    dashboard = _dashboard(request)
    try:
        run = await actions.submit_run(
            dashboard, request.get("actor"), pool=values["pool"] or topology.DEFAULT_POOL,
            queue=values["queue"] or topology.DEFAULT_QUEUE, command=values["command"],
            name=values["name"], job_variables=actions.parse_job_variables(
                values["job_variables"]), start=actions.parse_start_time(values["start"]))
    except actions.ActionError as exc:
        response = dashboard.render(request, "submit.html", values=values, error=str(exc),
                                    default_pool=topology.DEFAULT_POOL,
                                    default_queue=topology.DEFAULT_QUEUE)
        response.set_status(400)
        return response
    raise web.HTTPSeeOther(f"/runs/{run.id}?message=submitted")
