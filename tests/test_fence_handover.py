"""A run that ends while its worker is cut off, reported lost by a peer meanwhile."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import (
    HOST,
    PORT,
    EventLog,
    VHost,
    probe,
    publish_raw,
    run_body,
    running_worker,
    started_runs,
    wait_until,
)
from tests.proxy import link_proxy

pytestmark = pytest.mark.anyio


async def test_a_run_ended_while_cut_off_and_reported_lost_has_one_terminal_event(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    # Heartbeats every 1.5 s: the lease breaks about 4.4 s into a silence, after the short
    # run has ended (let go as the link is cut), so its own ending waits in the outbox when
    # the peer reports it. The report then comes before the cut worker's reconnection
    # attempt 6.2 s into the cut (its back-off doubles from 0.2 s), not just after it, when
    # the next one is 5 s later.
    busy = run_body(probe(tmp_path, sleep=600))
    gate = tmp_path / "cut"
    short = run_body(probe(tmp_path, extra=f"--gate {gate}"))
    async with (link_proxy(HOST, PORT) as proxy,
                running_worker(vhost.url, name="peer", heartbeat_seconds=1.5, limit=1)):
            await publish_raw(vhost.url, busy)
            await wait_until(lambda: busy["id"] in started_runs(tmp_path))
            url = vhost.url_for("guest", "guest", port=proxy.port)
            async with running_worker(url, name="cut", heartbeat_seconds=1.5,
                                      limit=1) as worker:
                await publish_raw(vhost.url, short)
                await events.wait_for(lambda evs: any(
                    e.type == "mq_worker.worker.heartbeat" and e.subject == "cut"
                    and short["id"] in e.data["in_flight"] for e in evs))
                # The worker has taken in the broker's confirmation of such a heartbeat
                # (a peer reports what the worker's confirmed heartbeat lists).
                await wait_until(lambda: short["id"] in worker._lease.confirmed_runs)
                proxy.cut()
                gate.touch()
                await wait_until(lambda: (tmp_path / f"{short['id']}.end").exists(), timeout=15)
                await events.wait_for(lambda evs: any(
                    e.type == "mq_worker.worker.lost" and e.subject == "cut" for e in evs),
                    timeout=30)
                await events.wait_terminal([short["id"]], timeout=10)
                await wait_until(lambda: not worker.in_flight, timeout=15)
                # Heartbeats are emitted only while connected and published in order:
                # once one received after the report is in, what waited before it is out.
                reported_at = len(events.events)
                await proxy.restore()
                await events.wait_for(lambda evs: any(
                    e.type == "mq_worker.worker.heartbeat" and e.subject == "cut"
                    for e in evs[reported_at:]), timeout=30)
    terminal = events.terminal(short["id"])
    assert {e.id for e in terminal} == {terminal[0].id}, [
        (e.type, e.data.get("reason"), e.data.get("reported_by")) for e in terminal]
    assert terminal[0].type == "mq_worker.run.crashed"
    assert terminal[0].data["reason"] == "worker-lost"
