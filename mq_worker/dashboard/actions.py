"""The dashboard's actions (cancel, submit, replay, discard), shared by its pages and JSON API.

Each is logged and recorded in the ledger's `dashboard_actions` table, with
who did it; a failed one raises ActionError with a reason for the operator.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import aiormq.exceptions
import orjson
import structlog
from pydantic import ValidationError

from mq_worker import topology
from mq_worker.dashboard.brokerview import DeadLetterError
from mq_worker.errors import BrokerError, ConfigurationError, UnroutableError
from mq_worker.messages import RunMessage
from mq_worker.publisher import new_run

if TYPE_CHECKING:
    from mq_worker.dashboard.app import Dashboard

log = structlog.get_logger("mq_worker.dashboard")


class ActionError(ValueError):
    """An action that was refused or failed; the message says why."""


async def _record(dashboard: Dashboard, action: str, target: str, detail: dict[str, Any],
                  actor: str | None) -> None:
    log.info("dashboard action", action=action, target=target, actor=actor, **detail)
    await dashboard.call(dashboard.queries.record_action, action, target, detail, actor)


async def cancel_run(dashboard: Dashboard, run_id: str, actor: str | None,
                     reason: str | None = None, pool: str | None = None) -> str:
    """Publish a cancel for the run to its pool (the ledger's, else `pool`); return the pool.

    A run no worker has taken yet is not in the ledger: its pool must be given.
    """
    record = await dashboard.store.get_run(run_id)
    if record is None and not pool:
        raise ActionError(f"run {run_id} is not in the ledger: give its pool to cancel it")
    pool = (record.pool if record is not None else None) or pool or topology.DEFAULT_POOL
    reason = reason or f"cancelled from the dashboard by {actor}"
    try:
        await dashboard.broker.publisher().cancel(run_id, pool=pool, reason=reason)
    except (BrokerError, ConfigurationError, ValueError) as exc:
        raise ActionError(f"the cancel was not published: {exc}") from None
    await _record(dashboard, "cancel", run_id, {"pool": pool, "reason": reason}, actor)
    return pool


def parse_job_variables(text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ActionError(f"job variables are not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ActionError("job variables must be a JSON object")
    return value


def parse_start_time(text: str) -> datetime | None:
    if not text.strip():
        return None
    try:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ActionError(f"start time {text!r} is not an ISO 8601 time") from None


async def submit_run(dashboard: Dashboard, actor: str | None, *, pool: str, queue: str,
                     command: str, name: str | None, job_variables: dict[str, Any],
                     start: datetime | None) -> RunMessage:
    try:
        topology.check_name("pool", pool)
        topology.check_name("queue", queue)
        run = new_run(command.strip() or None, name=name or None, job_variables=job_variables,
                      scheduled_start_time=start)
    except (ConfigurationError, ValidationError) as exc:
        raise ActionError(str(exc).splitlines()[0]) from None
    try:
        await dashboard.broker.publisher().submit(run, pool=pool, queue=queue)
    except UnroutableError as exc:
        raise ActionError(f"no work queue takes the run: {exc}") from None
    except BrokerError as exc:
        raise ActionError(f"the run was not published: {exc}") from None
    await _record(dashboard, "submit", str(run.id), {"pool": pool, "queue": queue,
                                                     "name": run.name}, actor)
    return run


async def settle_dead_letters(dashboard: Dashboard, actor: str | None, action: str,
                              keys: list[str], edited_body: str | None = None) -> int:
    """Replay or discard dead letters by key; return how many were."""
    if action not in ("replay", "discard"):
        raise ActionError(f"unknown action {action!r}")
    if not keys:
        raise ActionError("no message selected")
    body = None
    if edited_body is not None and edited_body.strip():
        if len(keys) != 1:
            raise ActionError("an edited message is replayed one at a time")
        body = edited_body.encode()
    try:
        done = await dashboard.broker.settle_dead_letters(keys, action, body)
    except DeadLetterError as exc:
        raise ActionError(str(exc)) from None
    except (BrokerError, aiormq.exceptions.AMQPError, OSError) as exc:
        raise ActionError(f"the broker refused: {exc}") from None
    for letter in done:
        await _record(dashboard, action, letter.run_id or letter.key,
                      {"key": letter.key, "reason": letter.reason,
                       "routing_key": letter.routing_key, "edited": body is not None}, actor)
    if not done:
        raise ActionError("those messages are no longer in mq_worker.dead")
    return len(done)
