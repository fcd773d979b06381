"""The dashboard's JSON API (each page's data, the actions) and its live streams.

Live updates are server-sent events: one-way is all the pages need, they pass
proxies as plain HTTP, and browsers reconnect by themselves. Actions through
the API need the CSRF header unless the caller authenticated with the bearer
token (which a browser never sends by itself).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import aiormq.exceptions
import anyio
import orjson
from aiohttp import web

from mq_worker import topology
from mq_worker.dashboard import actions
from mq_worker.dashboard.access import CSRF_HEADER
from mq_worker.dashboard.views import (
    _dashboard,
    configuration_of,
    overview_data,
    page_cursor,
    page_size,
    run_filter,
)
from mq_worker.errors import BrokerError
from mq_worker.ledger.records import TERMINAL_STATES, OutputAssembler, OutputBatch, OutputLine
from mq_worker.redaction import masked

routes = web.RouteTableDef()
KEEPALIVE_SECONDS = 15.0
# While a run has not ended, its page's stream also reads the run from the ledger this often:
# an event published while the page (re)connected is then shown all the same, and the output
# the ledger recorded after the page read it (the ledger writes in batches) too.
LEDGER_POLL_SECONDS = 1.0


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value, default=str), status=status,
                        content_type="application/json")


@routes.get("/api/overview")
async def overview(request: web.Request) -> web.Response:
    data = await overview_data(_dashboard(request))
    stats = data["stats"]
    return _json({
        "workers": data["workers"],
        "queues": [asdict(q) for q in data["queues"]], "queue_source": data["queue_source"],
        "runs": [r.as_dict() for r in data["runs"]],
        "last_hour": {"outcomes": stats.outcomes, "crash_reasons": stats.crash_reasons,
                      "start_delay_p50": stats.delay_p50, "start_delay_p99": stats.delay_p99,
                      "duration_p50": stats.duration_p50, "duration_p99": stats.duration_p99,
                      "per_minute": [asdict(m) for m in stats.minutes]},
    })


@routes.get("/api/workers")
async def workers(request: web.Request) -> web.Response:
    return _json({"workers": _dashboard(request).feed.worker_rows()})


@routes.get("/api/runs")
async def runs(request: web.Request) -> web.Response:
    dashboard = _dashboard(request)
    page = await dashboard.call(dashboard.queries.search_runs, run_filter(request.query),
                                limit=page_size(request.query),
                                before=page_cursor(request.query))
    return _json({"runs": [r.as_dict() for r in page.runs], "next": page.next_cursor})


@routes.get("/api/runs/{id}")
async def run(request: web.Request) -> web.Response:
    record = await _dashboard(request).store.get_run(request.match_info["id"])
    if record is None:
        return _json({"error": "no such run in the ledger"}, 404)
    result = record.as_dict(with_events=True)
    result["events"] = [{**e, "data": masked(e["data"])} for e in result["events"]]
    result["job_variables"] = configuration_of(record)
    return _json(result)


@routes.get("/api/runs/{id}/output")
async def output(request: web.Request) -> web.Response:
    lines = await _dashboard(request).store.get_output(request.match_info["id"])
    return _json({"lines": [line.as_dict() for line in lines]})


@routes.get("/api/dead")
async def dead(request: web.Request) -> web.Response:
    try:
        letters = await _dashboard(request).broker.dead_letters()
    except (BrokerError, aiormq.exceptions.AMQPError, OSError) as exc:
        return _json({"error": f"the dead letters cannot be read now: {exc}"}, 503)
    return _json({"messages": [letter.as_dict() for letter in letters]})


async def _body(request: web.Request) -> dict[str, Any]:
    dashboard = _dashboard(request)
    if request.get("actor") != "token" and not dashboard.access.csrf_ok(
            request, request.headers.get(CSRF_HEADER)):
        raise web.HTTPForbidden(text="missing or wrong X-CSRF-Token header")
    try:
        value = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError as exc:
        raise web.HTTPBadRequest(text=f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise web.HTTPBadRequest(text="expected a JSON object")
    return value


@routes.post("/api/runs/{id}/cancel")
async def cancel(request: web.Request) -> web.Response:
    body = await _body(request)
    try:
        pool = await actions.cancel_run(_dashboard(request), request.match_info["id"],
                                        request.get("actor"), body.get("reason"),
                                        body.get("pool"))
    except actions.ActionError as exc:
        return _json({"error": str(exc)}, 409)
    return _json({"cancelled": request.match_info["id"], "pool": pool})


@routes.post("/api/submit")
async def submit(request: web.Request) -> web.Response:
    body = await _body(request)
    try:
        variables = body.get("job_variables") or {}
        if not isinstance(variables, dict):
            raise actions.ActionError("job_variables must be an object")
        run = await actions.submit_run(
            _dashboard(request), request.get("actor"),
            pool=str(body.get("pool") or topology.DEFAULT_POOL),
            queue=str(body.get("queue") or topology.DEFAULT_QUEUE),
            command=str(body.get("command") or ""),
            name=body.get("name"), job_variables=variables,
            start=actions.parse_start_time(str(body.get("start") or "")))
    except actions.ActionError as exc:
        return _json({"error": str(exc)}, 400)
    return _json({"id": str(run.id)})


@routes.post("/api/dead/{action}")
async def dead_action(request: web.Request) -> web.Response:
    body = await _body(request)
    keys = body.get("keys")
    try:
        count = await actions.settle_dead_letters(
            _dashboard(request), request.get("actor"), request.match_info["action"],
            [str(k) for k in keys] if isinstance(keys, list) else [], body.get("body"))
    except actions.ActionError as exc:
        return _json({"error": str(exc)}, 409)
    return _json({request.match_info["action"]: count})


# -- live streams -----------------------------------------------------------------------


async def _send(response: web.StreamResponse, message: dict[str, Any]) -> None:
    await response.write(b"data: " + orjson.dumps(message, default=str) + b"\n\n")


@routes.get("/api/stream")
async def stream(request: web.Request) -> web.StreamResponse:
    """Every run and worker event, as they happen: what the overview shows live."""
    return await _stream(request, None)


@routes.get("/api/runs/{id}/stream")
async def run_stream(request: web.Request) -> web.StreamResponse:
    """One run's events and its output lines (stored ones first, each line numbered)."""
    return await _stream(request, request.match_info["id"])


async def _stream(request: web.Request, run_id: str | None) -> web.StreamResponse:
    dashboard = _dashboard(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    lines: list[OutputLine] = []
    assembler = OutputAssembler(lines.append)
    sent = 0

    async def flush() -> None:
        nonlocal sent
        if len(lines) > sent:
            await _send(response, {"kind": "lines", "from": sent,
                                   "lines": [line.as_dict() for line in lines[sent:]]})
            sent = len(lines)

    async def stored() -> None:
        if run_id is not None:
            for batch in await dashboard.store.get_output_batches(run_id):
                assembler.add(batch)
            await flush()

    last_state: str | None = None

    async def ledger_state() -> None:
        """The run's state as the ledger has it: events a page missed while it (re)connected."""
        nonlocal last_state
        record = await dashboard.store.get_run(run_id) if run_id is not None else None
        if record is not None and record.state != last_state:
            if last_state not in TERMINAL_STATES:
                await stored()  # the output the run printed before it ended, all of it
            last_state = record.state
            await _send(response, {"kind": "state", "id": run_id, "state": record.state,
                                   "status_code": record.status_code})

    async with dashboard.feed.subscribe(run_id) as subscription:
        await _send(response, {"kind": "hello", "connected": dashboard.feed.connected,
                               "workers": dashboard.feed.worker_rows()})
        await stored()  # after subscribing: what is printed from now on comes live
        await ledger_state()
        while not subscription.overflowed:
            timeout = KEEPALIVE_SECONDS if run_id is None else LEDGER_POLL_SECONDS
            message = None
            with anyio.move_on_after(timeout):
                message = await subscription.next()
            if message is None:
                if run_id is not None and last_state not in TERMINAL_STATES:
                    await ledger_state()
                await response.write(b": keepalive\n\n")
                continue
            if message["kind"] == "output":
                try:
                    assembler.add(OutputBatch.from_message(message["batch"]))
                except (KeyError, TypeError, ValueError, AttributeError):
                    continue
                await flush()
            elif message["kind"] == "run":
                if run_id is not None and message["id"] != run_id:
                    continue
                message = {**message, "event": {**message["event"],
                                                "data": masked(message["event"]["data"])}}
                await _send(response, message)
            elif run_id is None:
                await _send(response, message)
    return response
