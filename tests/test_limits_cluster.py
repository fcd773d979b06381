"""Shared limits on the real 3-node cluster: the loss of the node that leads a limit's
token queue, under a steady stream of limited runs.

The cluster, its fixtures and helpers are those of tests/test_cluster.py. Concurrency
is measured as a subscriber sees it, from each run's `submitted` event to its
terminal event, across both workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from mq_worker.topology import limit_queue_name
from tests.helpers import WorkerProcess, event_log, probe, publish_raw, run_body
from tests.test_cli import mq_worker
from tests.test_cluster import (  # noqa: F401  (cluster and cvhost are fixtures)
    Cluster,
    ClusterVHost,
    cluster,
    cvhost,
    eventually,
    in_thread,
)
from tests.test_limits import intervals, most_at_once

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]

LIMIT = 3
TARGET = "key:db"


@pytest.mark.slow  # about 60-100 s
@pytest.mark.timeout(300)
async def test_a_key_limit_holds_when_the_node_leading_its_slots_is_killed(
    cluster: Cluster, cvhost: ClusterVHost,  # noqa: F811  (the fixtures imported above)
    worker_processes: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    result = await mq_worker("limit", "set", TARGET, str(LIMIT), "--url", cvhost.url(1))
    assert result.returncode == 0, result.stderr
    slots = limit_queue_name(TARGET)
    leader = int((await in_thread(cluster.queues, cvhost.name))[slots]["leader"][3])
    other, survivor = sorted({1, 2, 3} - {leader})
    print(f"\nslot queue leader: node {leader}; node {survivor} publishes and subscribes")
    # One worker on the leader's node (it loses its connection and its slots with it),
    # one on another node; each lists every node, its own first.
    common = ["--limit", "4", "--log-level", "INFO"]
    on_leader = worker_processes(cvhost.url(leader), *cvhost.url_args(leader, other, survivor),
                                 *common, name="lw-leader")
    elsewhere = worker_processes(cvhost.url(other), *cvhost.url_args(other, survivor, leader),
                                 *common, name="lw-other")
    names = {on_leader.name, elsewhere.name}

    async with event_log(cvhost.url(survivor)) as events:
        await events.wait_for(lambda evs: names <= {
            e.data.get("worker") for e in evs if e.type == "mq_worker.worker.started"}, 60)
        bodies: list[dict[str, object]] = []

        async def steady_stream() -> None:
            """Five limited runs a second for 12 s: more than the limit can take
            (5 runs of 1 s each second against 3 slots, so runs always wait)."""
            for _ in range(60):
                body = run_body(probe(tmp_path, sleep=1.0), concurrency_key="db")
                with anyio.fail_after(60):
                    while True:  # as a client does when the broker refuses a publish
                        try:
                            await publish_raw(cvhost.url(survivor), body)
                            break
                        except Exception as exc:
                            print(f"publish refused, tried again: {exc}")
                            await anyio.sleep(0.5)
                bodies.append(body)
                await anyio.sleep(0.2)

        killed_at = 0.0
        async with anyio.create_task_group() as tg:
            tg.start_soon(steady_stream)
            # The worker on the leader's node holds a slot, runs wait: then the node dies.
            await events.wait_for(lambda evs: any(
                e.type == "mq_worker.run.submitted" and e.data.get("worker") == on_leader.name
                and not events.terminal(e.subject) for e in evs
            ) and any(e.data.get("waiting_for") == TARGET for e in evs), 60)
            killed_at = time.time()
            await in_thread(cluster.kill, leader)
        ids = [str(b["id"]) for b in bodies]
        await events.wait_terminal(ids, timeout=180)

    spans = intervals(events.events, set(ids))
    peak = most_at_once(spans)
    after = sorted(start for start, _ in spans if start > killed_at)
    print(f"peak {peak} of limit {LIMIT}; first start after the kill "
          f"{after[0] - killed_at:.2f} s later" if after else "no start after the kill")
    assert peak <= LIMIT, peak
    # None lost: every run completed (a run can be delivered twice around a node's death,
    # as any run; it then completes twice, within the limit).
    assert all("run.completed" in events.types(r) for r in ids), [
        events.types(r) for r in ids if "run.completed" not in events.types(r)]
    # The slots were usable again within seconds of the node loss.
    assert after and after[0] - killed_at < 20, after[:1]
    # No slot used twice or lost: all of them free again, none held.
    await eventually(lambda: cluster.queue_depths(cvhost.name).get(slots) == (LIMIT, LIMIT, 0),
                     60, f"{LIMIT} free tokens in {slots}")
