"""Secrets in job variables are masked in the events a worker publishes."""

from __future__ import annotations

from pathlib import Path

import pytest

from mq_worker import Publisher, new_run
from mq_worker.redaction import MASK
from tests.helpers import EventLog, VHost, probe, running_worker


@pytest.mark.anyio
async def test_the_pending_event_carries_the_job_variables_with_secrets_masked(
        vhost: VHost, events: EventLog, tmp_path: Path) -> None:
    async with running_worker(vhost.url), Publisher(vhost.url) as publisher:
        run = await publisher.submit(new_run(probe(tmp_path), job_variables={
            "env": {"DB_PASSWORD": "hunter2", "TIER": "prod"}}))
        await events.wait_terminal([run.id])
    pending = next(e for e in events.of(run.id) if e.type == "mq_worker.run.pending")
    variables = pending.data["job_variables"]
    assert variables["env"] == {"DB_PASSWORD": MASK, "TIER": "prod"}
    assert variables["command"] == probe(tmp_path) and variables["grace_seconds"] == 30.0
    assert all(b"hunter2" not in m.body for m in events.raw)
