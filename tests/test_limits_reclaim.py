"""A worker back from a lost connection takes back its own slots, not those of others
cut off after it (see docs/pools.md, "Telling a released token from a lost one")."""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import aio_pika
import anyio
import pytest
from pamqp import commands as spec

from mq_worker import pool_control, slots
from mq_worker.control import TokenMessage, encode
from mq_worker.limits import ControlState, Limit
from mq_worker.slot_requests import SlotRequests
from mq_worker.topology import limit_queue_name, waiting_queue_name
from mq_worker.workers import session
from mq_worker.workers.process import ProcessWorker
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
    until_ready,
    wait_until,
)
from tests.helpers.workers import reconnects
from tests.proxy import LinkProxy, link_proxy
from tests.test_limits import cli, most_at_once

pytestmark = pytest.mark.anyio


def process_spans(directory: Path, markers: dict[str, Path]) -> dict[str, tuple[float, float]]:
    """(start, stop) of each run's process, from its probe's records: it stops at its end
    record or, stopped by its worker, when it wrote its marker on SIGTERM."""
    spans = {}
    for run_id, record in started_runs(directory).items():
        end = directory / f"{run_id}.end"
        marker = markers.get(run_id)
        if end.exists():
            stop = float(json.loads(end.read_text())["t"])
        elif marker is not None and marker.exists():
            stop = float(marker.read_text())
        else:
            stop = float("inf")
        spans[run_id] = (float(record["t"]), stop)
    return spans



def limited_run(tmp_path: Path, markers: dict[str, Path], name: str,
                sleep: float, extra: str = "") -> dict[str, object]:
    """A run of key:db whose probe leaves a marker file (kept in `markers`) on SIGTERM."""
    body = run_body(concurrency_key="db")
    markers[str(body["id"])] = tmp_path / f"{name}.term"
    body["job_variables"] = {"command": probe(
        tmp_path, sleep=sleep, extra=f"--term-marker {markers[str(body['id'])]} {extra}")}
    return body

async def start_limited(vhost: VHost, tmp_path: Path, queue: str,
                        runs: dict[str, dict[str, object]]) -> None:
    """Publish each run to its pool and wait until all have started and hold every slot."""
    for pool, run in runs.items():
        await publish_raw(vhost.url, run, routing_key=f"run.scheduled.{pool}.default")
    await wait_until(lambda: {run["id"] for run in runs.values()} <= set(started_runs(tmp_path)),
                     timeout=20)
    await until_ready(vhost.url, {queue: 0})


async def cut_off_while_c_takes_its_slot(vhost: VHost, link: LinkProxy, worker: ProcessWorker,
                                         queue: str, run_c: dict[str, object]
                                         ) -> tuple[int, float]:
    """Cut `worker` off; once its slot is back at the broker, a run of pool c takes it
    (and holds it before it starts). Its reconnections before, and when it was cut."""
    back = reconnects(worker)
    link.cut()
    cut_at = time.monotonic()
    await wait_until(lambda: not worker.connected, timeout=10)
    await until_ready(vhost.url, {queue: 1})  # its slot, back at the broker
    await publish_raw(vhost.url, run_c, routing_key="run.scheduled.c.default")
    await until_ready(vhost.url, {queue: 0})  # taken by C's run, which holds it
    return back, cut_at


async def test_a_worker_back_from_a_lost_connection_takes_back_its_own_slot_not_another_s(
    vhost: VHost, events: EventLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers cut off one after the other: A, then B. A run elsewhere takes A's slot
    (marked by the broker as lost with a connection) and holds it before it starts. A,
    back in time, must not take B's slot, free since B was cut off, for its run: B's run,
    left without a slot, goes on until B's deadline, which is after the run elsewhere
    has started. A must find its own slot taken and stop its run."""
    # A's deadline made 4 s (and the hold of a lost slot 5 s with it), so that B can be
    # cut well after the run elsewhere took A's slot and A still be back in time on a
    # loaded machine; A retries its connection every 0.2 s, so it is back as soon as its
    # link is restored.
    monkeypatch.setattr(slots, "CUT_OFF_SECONDS", 4.0)
    monkeypatch.setattr(session, "_MAX_BACKOFF_SECONDS", 0.2)
    await cli("limit", "set", "key:db", "2", "--url", vhost.url)
    queue = limit_queue_name("key:db")
    markers: dict[str, Path] = {}
    limited = functools.partial(limited_run, tmp_path, markers)

    # Pools of their own: each worker takes only its own run.
    async with link_proxy(HOST, PORT) as link_a, link_proxy(HOST, PORT) as link_b:
        url_a = vhost.url_for("guest", "guest", port=link_a.port)
        url_b = vhost.url_for("guest", "guest", port=link_b.port)
        async with (
            running_worker(url_a, name="a", pool="a") as worker_a,
            running_worker(url_b, name="b", pool="b") as worker_b,
            running_worker(vhost.url, name="c", pool="c"),
        ):
            run_a, run_b = limited("a", sleep=12), limited("b", sleep=12)
            await start_limited(vhost, tmp_path, queue, {"a": run_a, "b": run_b})
            run_c = limited("c", sleep=1)
            back, a_cut_at = await cut_off_while_c_takes_its_slot(vhost, link_a, worker_a,
                                                                  queue, run_c)

            # The scenario's input, not a synchronisation: B is cut off 2 s after A
            # (more than the margin of the hold, 1 s, after C's run took A's slot), so
            # that B's run, if B's slot goes to A, runs on past the start of C's run.
            await anyio.sleep(max(0.0, a_cut_at + 2.0 - time.monotonic()))
            link_b.cut()
            await wait_until(lambda: not worker_b.connected, timeout=10)
            await until_ready(vhost.url, {queue: 1})  # B's slot, back at the broker
            await link_a.restore()
            await wait_until(lambda: reconnects(worker_a) > back and worker_a.connected,
                             timeout=10)
            a_back_after = time.monotonic() - a_cut_at

            await wait_until(lambda: run_c["id"] in started_runs(tmp_path), timeout=20)
            await wait_until(lambda: markers[str(run_b["id"])].exists(), timeout=20)
            await link_b.restore()
            ids = [str(run["id"]) for run in (run_a, run_b, run_c)]
            await events.wait_terminal(ids, timeout=60)
    assert a_back_after < slots.CUT_OFF_SECONDS, a_back_after  # (else not the scenario)
    spans = process_spans(tmp_path, markers)
    assert most_at_once(list(spans.values())) <= 2, spans
    # B's run stopped at its deadline; A's run, whose own slot C's run holds, too.
    for run in (run_a, run_b):
        ending = events.terminal(str(run["id"]))[-1]
        assert (ending.type, ending.data["reason"]) == ("mq_worker.run.crashed", "slot-lost")
    assert events.types(str(run_c["id"]))[-1] == "run.completed"


async def test_a_worker_whose_own_slot_was_taken_goes_on_with_one_a_run_released(
    vhost: VHost, events: EventLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A is cut off; a run elsewhere takes A's slot (marked as lost with a connection)
    and holds it before it starts; then another run elsewhere ends and releases its
    slot. A, back in time, does not find its own slot, but the released one is a slot no
    run holds: A's run goes on with it instead of being stopped, and the limit holds."""
    monkeypatch.setattr(slots, "CUT_OFF_SECONDS", 4.0)  # (as above: room for the steps)
    monkeypatch.setattr(session, "_MAX_BACKOFF_SECONDS", 0.2)
    await cli("limit", "set", "key:db", "2", "--url", vhost.url)
    queue = limit_queue_name("key:db")
    markers: dict[str, Path] = {}
    limited = functools.partial(limited_run, tmp_path, markers)
    gate = tmp_path / "first-c-run.gate"

    async with link_proxy(HOST, PORT) as link_a:
        url_a = vhost.url_for("guest", "guest", port=link_a.port)
        async with (
            running_worker(url_a, name="a", pool="a") as worker_a,
            running_worker(vhost.url, name="c", pool="c"),
        ):
            run_a, first_c = limited("a", sleep=8), limited("c1", sleep=0, extra=f"--gate {gate}")
            await start_limited(vhost, tmp_path, queue, {"a": run_a, "c": first_c})
            second_c = limited("c2", sleep=0.5)
            back, a_cut_at = await cut_off_while_c_takes_its_slot(vhost, link_a, worker_a,
                                                                  queue, second_c)
            gate.touch()
            await until_ready(vhost.url, {queue: 1})  # released by C's first run
            await link_a.restore()
            await wait_until(lambda: reconnects(worker_a) > back and worker_a.connected,
                             timeout=10)
            a_back_after = time.monotonic() - a_cut_at
            ids = [str(run["id"]) for run in (run_a, first_c, second_c)]
            await events.wait_terminal(ids, timeout=60)
    assert a_back_after < slots.CUT_OFF_SECONDS, a_back_after  # (else not the scenario)
    for run in (run_a, first_c, second_c):
        assert events.types(str(run["id"]))[-1] == "run.completed", events.terminal(
            str(run["id"]))
    spans = process_spans(tmp_path, markers)
    assert most_at_once(list(spans.values())) <= 2, spans


async def test_two_workers_back_at_the_same_moment_each_take_back_their_own_slot(
    vhost: VHost, events: EventLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers cut off and back at the same moment look for their own slots in the
    same token queue at once; each may take the other's first and hold it while it scans
    (it looks again if it missed its own). Both runs go on, and a run waiting elsewhere
    starts only once one of them has ended: never more runs at once than the limit."""
    # The deadline, and the grace before a waiting run is handed a slot that came back
    # without a release, made 3 s, so that a loaded machine's slow reconnection does not
    # hand the waiting run a slot that either worker takes back in time.
    monkeypatch.setattr(slots, "CUT_OFF_SECONDS", 3.0)
    monkeypatch.setattr(pool_control, "RETURNED_SLOT_GRACE_SECONDS", 3.0)
    monkeypatch.setattr(session, "_MAX_BACKOFF_SECONDS", 0.2)
    await cli("limit", "set", "key:db", "2", "--url", vhost.url)
    queue = limit_queue_name("key:db")
    markers: dict[str, Path] = {}
    limited = functools.partial(limited_run, tmp_path, markers)

    # Pools of their own: each worker takes only its own run. A and B share one link,
    # so that one cut closes both connections.
    async with link_proxy(HOST, PORT) as link:
        url = vhost.url_for("guest", "guest", port=link.port)
        async with (
            running_worker(url, name="a", pool="a") as worker_a,
            running_worker(url, name="b", pool="b") as worker_b,
            running_worker(vhost.url, name="c", pool="c"),
        ):
            run_a, run_b = limited("a", sleep=8), limited("b", sleep=8)
            await publish_raw(vhost.url, run_a, routing_key="run.scheduled.a.default")
            await publish_raw(vhost.url, run_b, routing_key="run.scheduled.b.default")
            await wait_until(lambda: {run_a["id"], run_b["id"]} <= set(started_runs(tmp_path)),
                             timeout=20)
            await until_ready(vhost.url, {queue: 0})
            run_c = limited("c", sleep=1)
            await publish_raw(vhost.url, run_c, routing_key="run.scheduled.c.default")
            await until_ready(vhost.url, {waiting_queue_name("key:db"): 1})

            back_a, back_b = reconnects(worker_a), reconnects(worker_b)
            link.cut()
            cut_at = time.monotonic()
            await wait_until(lambda: not (worker_a.connected or worker_b.connected), timeout=10)
            await link.restore()
            await wait_until(lambda: reconnects(worker_a) > back_a and worker_a.connected
                             and reconnects(worker_b) > back_b and worker_b.connected,
                             timeout=10)
            back_after = time.monotonic() - cut_at
            ids = [str(run["id"]) for run in (run_a, run_b, run_c)]
            await events.wait_terminal(ids, timeout=60)
    assert back_after < slots.CUT_OFF_SECONDS, back_after  # (else not the scenario)
    for run in (run_a, run_b, run_c):
        assert events.types(str(run["id"]))[-1] == "run.completed", events.terminal(
            str(run["id"]))
    spans = process_spans(tmp_path, markers)
    assert most_at_once(list(spans.values())) <= 2, spans


async def test_a_scan_takes_its_own_tokens_from_anywhere_in_a_large_queue_and_puts_back_the_rest(
    vhost: VHost,
) -> None:
    """The scan on a real token queue of 200 tokens: its own tokens are found wherever
    they are (here the first and the last), every other token is back exactly once, a
    free one as a new message, one lost with a connection still marked."""
    target = "key:db"
    queue = limit_queue_name(target)
    connection = await aio_pika.connect(vhost.url)
    try:
        channel = await (await connection.channel(publisher_confirms=False)
                         ).get_underlay_channel()
        await channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        await channel.tx_select()
        for number in range(200):
            await channel.basic_publish(
                encode(TokenMessage(target=target, number=number, version=1)),
                exchange="", routing_key=queue)
        await channel.tx_commit()
        holder = await aio_pika.connect(vhost.url)
        held = await (await holder.channel()).get_underlay_channel()
        for _ in range(2):  # tokens 0 and 1, lost with the holder's connection
            assert isinstance((await held.basic_get(queue)).delivery, spec.Basic.GetOk)
        await holder.close()

        requests = SlotRequests(ControlState(limits={target: Limit(target, 200,
                                                                   ((0, 200, 1),))}))
        kept, fresh = await requests.scan(channel, target, {(0, 1), (199, 1)})
        assert sorted(kept) == [(0, 1), (199, 1)] and kept[(0, 1)].returned
        assert len(fresh) == 197

        other = await (await connection.channel()).get_underlay_channel()
        seen: list[tuple[int, bool]] = []
        while isinstance((message := await other.basic_get(queue)).delivery, spec.Basic.GetOk):
            token = TokenMessage.model_validate_json(message.body)
            seen.append((token.number, bool(message.delivery.redelivered)))
    finally:
        await connection.close()
    assert sorted(number for number, _ in seen) == list(range(1, 199))
    assert [number for number, marked in seen if marked] == [1]
