"""The data of worker events (`worker.started`, `stopped`, `heartbeat`, `lost`): their
models and, next to each, the one function that builds it, as in `mq_worker.events`, which
re-exports them all.

`_EventData`, the base of every event's data model, is here so that `mq_worker.events`
imports this module and not the other way round.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field


class _EventData(BaseModel):
    model_config = ConfigDict(extra="allow")


class WorkerData(_EventData):
    worker: str
    pool: str
    queues: list[str]
    type: str
    limit: int
    hostname: str
    pid: int
    version: str
    heartbeat_seconds: float
    follows: str | None = None
    paused: list[str] = Field(
        default_factory=list,
        description="Pauses that stop this worker's intake (pool:<pool>, queue:<pool>/<queue>).",
    )
    run_events: Literal["all", "outcomes"] = Field(
        default="all",
        description="The run events this worker publishes: all, or its runs' outcomes alone "
        "(no run.pending, no run.submitted).",
    )


def worker_data(
    *, worker: str, pool: str, queues: list[str], type: str, limit: int, hostname: str,
    pid: int, version: str, heartbeat_seconds: float, follows: str | None, paused: list[str],
    run_events: str,
) -> dict[str, Any]:
    return {"worker": worker, "pool": pool, "queues": queues, "type": type, "limit": limit,
            "hostname": hostname, "pid": pid, "version": version,
            "heartbeat_seconds": heartbeat_seconds, "follows": follows, "paused": paused,
            "run_events": run_events}


class HeartbeatRun(BaseModel):
    """A run a worker holds, as its heartbeat lists it."""

    model_config = ConfigDict(extra="allow")

    id: UUID
    name: str | None = None
    queue: str | None = None
    state: str = Field(description="held, starting, running, or retrying (its next attempt "
                                   "is being parked).")
    infrastructure_pid: str | None = None
    attempt: int = Field(default=1, ge=1, description="Which attempt of the run, from 1.")


class HeartbeatData(WorkerData):
    free_slots: int
    in_flight: list[UUID] = Field(description="Runs this worker holds: waiting or running.")
    runs: list[HeartbeatRun] = Field(default_factory=list, description="The same runs, in detail.")
    outbox_depth: int = 0


def heartbeat_data(
    worker: dict[str, Any], *, free_slots: float, runs: list[dict[str, Any]], outbox_depth: int,
) -> dict[str, Any]:
    """`runs` as `HeartbeatRun` fields; `in_flight` is their ids."""
    return {**worker, "free_slots": free_slots, "in_flight": [r["id"] for r in runs],
            "runs": runs, "outbox_depth": outbox_depth}


class WorkerLostData(_EventData):
    worker: str
    pool: str
    last_seen: datetime
    in_flight: list[UUID]
    reported_by: str


def worker_lost_data(
    *, worker: str, pool: str, last_seen: str, in_flight: list[str], reported_by: str,
) -> dict[str, Any]:
    return {"worker": worker, "pool": pool, "last_seen": last_seen, "in_flight": in_flight,
            "reported_by": reported_by}
