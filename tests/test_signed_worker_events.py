"""Worker events of workers with a signing key: signed, and refused unsigned by those who
act on them (the elected reporter, and a worker fencing itself on a peer's report)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from mq_worker.events import Event
from mq_worker.signing import Signer
from mq_worker.topology import SIGNATURE_V2_HEADER
from tests.helpers import (
    EventLog,
    VHost,
    probe,
    publish_raw,
    run_body,
    started_runs,
    wait_until,
)

pytestmark = pytest.mark.anyio

KEY = "worker-events-key-0123456789"
LOST = "mq_worker.worker.lost"


def _key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    return path


def _worker_event(kind: str, worker: str, *, runs: list[str] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"worker": worker, "pool": "default", "heartbeat_seconds": 1,
                            "queues": ["default"], "in_flight": runs or [], "runs": []}
    if kind == "lost":
        data = {"worker": worker, "pool": "default", "in_flight": runs or [],
                "last_seen": datetime.now(UTC).isoformat(), "reported_by": "mallory"}
    return {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/mallory",
            "type": f"mq_worker.worker.{kind}", "subject": worker,
            "time": datetime.now(UTC).isoformat(), "data": data}


async def _publish(url: str, event: dict[str, Any], *, signed: bool = False) -> None:
    """As a worker routes them (to subscribers and, BCC, to the pool's heartbeat stream),
    signed with the pool's key or not."""
    body = orjson.dumps(event)
    headers: dict[str, Any] = {"BCC": ["workers.default"]}
    if signed:
        headers.update(Signer([KEY.encode()]).headers(body, kind="worker", pool="default"))
    await publish_raw(url, body, routing_key=event["type"], exchange="mq_worker.events",
                      headers=headers)


def _lost(events: EventLog, name: str) -> list[Event]:
    return [e for e in events.events if e.type == LOST and e.subject == name]


async def test_workers_with_a_key_sign_their_worker_events(
    vhost: VHost, events: EventLog, worker_processes: Any, tmp_path: Path
) -> None:
    keys = _key_file(tmp_path)
    worker = worker_processes(vhost.url, "--heartbeat-seconds", "1",
                              "--signing-key-file", str(keys))
    await events.wait_for(lambda evs: [e for e in evs if e.subject == worker.name and
                                       e.type == "mq_worker.worker.heartbeat"], timeout=60)
    message = next(m for m in events.raw if m.headers.get(SIGNATURE_V2_HEADER))
    Signer([KEY.encode()]).verify(message.body, message.headers, kind="worker",
                                  pool="default")


async def test_a_forged_worker_lost_does_not_fence_a_live_signed_worker(
    vhost: VHost, events: EventLog, worker_processes: Any, tmp_path: Path
) -> None:
    keys = _key_file(tmp_path)
    args = ("--heartbeat-seconds", "1", "--signing-key-file", str(keys), "--limit", "1")
    worker = worker_processes(vhost.url, *args)
    await events.wait_for(lambda evs: [e for e in evs if e.subject == worker.name], timeout=60)
    body = run_body(probe(tmp_path, sleep=120))
    raw = orjson.dumps(body)
    await publish_raw(vhost.url, raw, headers=Signer([KEY.encode()]).headers(
        raw, kind="run", pool="default"))
    await wait_until(lambda: body["id"] in started_runs(tmp_path), timeout=30)
    await events.wait_for(lambda evs: [e for e in evs if e.subject == worker.name and
                                       body["id"] in e.data.get("in_flight", [])], timeout=30)

    await _publish(vhost.url, _worker_event("lost", worker.name, runs=[body["id"]]))

    await wait_until(lambda: [line for line in worker.log_lines()
                              if line.get("event") == "unsigned or forged worker.lost ignored"],
                     timeout=30)
    assert not events.terminal(body["id"])
    assert worker.process.poll() is None
    assert not [line for line in worker.log_lines()
                if line.get("event") == "a peer reported this worker lost"]


async def test_the_reporter_acts_only_on_signed_worker_events(
    vhost: VHost, events: EventLog, worker_processes: Any, tmp_path: Path
) -> None:
    keys = _key_file(tmp_path)
    for _ in range(2):
        worker_processes(vhost.url, "--heartbeat-seconds", "1", "--signing-key-file", str(keys))
    await events.wait_for(lambda evs: len({e.subject for e in evs if e.type ==
                                           "mq_worker.worker.heartbeat"}) == 2, timeout=60)
    # Once one signed silent worker is reported, the reporter follows its pool live.
    warm, forged, genuine = (f"{kind}-{uuid.uuid4().hex[:6]}"
                             for kind in ("warm", "forged", "genuine"))
    await _publish(vhost.url, _worker_event("heartbeat", warm), signed=True)
    await events.wait_for(lambda _: _lost(events, warm), timeout=30)
    await _publish(vhost.url, _worker_event("heartbeat", forged))
    await _publish(vhost.url, _worker_event("heartbeat", genuine), signed=True)

    # The signed one, published after, is followed and found lost: the forged one was
    # read before it, and never acted on.
    await events.wait_for(lambda _: _lost(events, genuine), timeout=30)
    assert not _lost(events, forged)
    rejected = await events.wait_for(lambda evs: [
        e.data["reason"] for e in evs if e.type == "mq_worker.run.rejected"
        and e.data.get("message_kind") == "worker-event"], timeout=15)
    assert "unsigned" in rejected[0], rejected
