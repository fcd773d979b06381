"""Run output end to end on a real RabbitMQ: batches on `mq_worker.output` as the contract
says, the per-run cap and bounded buffers under a flood and without a broker, `mq-worker logs
--follow` live and `submit --wait --logs`."""

from __future__ import annotations

import json
import shlex
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import anyio
import anyio.abc
import psutil
import pytest

from mq_worker.ledger import LedgerStore
from mq_worker.output import OutputShipper
from mq_worker.publisher import Publisher, new_run
from mq_worker.topology import OUTPUT_EXCHANGE
from mq_worker.workers.process import ProcessWorker
from tests.contract import committed_document, message_for_routing_key, payload_validator
from tests.helpers import (
    HOST,
    PORT,
    PYTHON,
    EventLog,
    VHost,
    management,
    running_worker,
    unique,
    wait_until,
    worker_settings,
)
from tests.helpers.ledger import (
    LedgerProcess,
    cli_env,
    collect_output,
    ledger_database,
    ledger_processes,
    mq_worker,
    output_lines,
    spawn,
    wait_recorded,
)
from tests.proxy import link_proxy

pytestmark = pytest.mark.anyio


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    with ledger_database("sqlite", tmp_path) as url:
        yield url


@pytest.fixture
def ledgers(vhost: VHost, tmp_path: Path) -> Iterator[Callable[..., LedgerProcess]]:
    with ledger_processes(vhost, tmp_path) as start:
        yield start


async def test_logs_follow_streams_a_running_run_live_and_exits_when_it_ends(
    vhost: VHost, events: EventLog, tmp_path: Path,
) -> None:
    env = cli_env(vhost, tmp_path)
    release = tmp_path / "release"
    script = ("import os, time\n"
              "print('first', flush=True)\n"
              f"while not os.path.exists({str(release)!r}):\n"
              "    time.sleep(0.05)\n"
              "print('second')\n")
    run = new_run(shlex.join([PYTHON, "-c", script]))
    out = tmp_path / "follow.out"
    async with running_worker(vhost.url), Publisher(vhost.url) as publisher:
        with out.open("w") as sink:
            follower = spawn(env, sink, "logs", str(run.id), "--follow", "--timeout", "60")
            try:
                # Subscribed before the run exists: the follower declares its queue first.
                await wait_until(lambda: any(
                    b["routing_key"] == f"output.*.{run.id}"
                    for b in management("GET", f"/bindings/{quote(vhost.name, safe='')}")),
                    timeout=30, interval=0.2)
                await publisher.submit(run)
                await wait_until(lambda: out.read_text() == "first\n", timeout=30)
                assert follower.poll() is None  # live: the run is still running
                assert events.terminal(run.id) == []
                release.touch()
                code = await anyio.to_thread.run_sync(lambda: follower.wait(timeout=60))
            finally:
                if follower.poll() is None:
                    follower.kill()
    assert code == 0, follower.stderr.read() if follower.stderr else ""
    assert out.read_text() == "first\nsecond\n"
    assert [e.type for e in events.terminal(run.id)] == ["mq_worker.run.completed"]


async def test_submit_wait_logs_shows_the_output_and_keeps_the_run_id_first_on_stdout(
    vhost: VHost, tmp_path: Path,
) -> None:
    env = cli_env(vhost, tmp_path)
    script = "import sys; print('hello'); print('to stderr', file=sys.stderr); sys.exit(4)"
    async with running_worker(vhost.url):
        result = await mq_worker(env, "submit", "--wait", "--logs", "--", PYTHON, "-c", script)
    assert result.returncode == 4, result.stderr
    assert uuid.UUID(result.stdout.strip())  # only the run id: RUN=$(mq-worker submit ...)
    lines = result.stderr.splitlines()
    assert "hello" in lines and "to stderr" in lines
    assert lines.index("hello") < next(i for i, x in enumerate(lines) if "run.crashed" in x)


async def test_output_batches_on_the_wire_follow_the_contract(
    vhost: VHost, events: EventLog,
) -> None:
    received: list[aio_pika.abc.AbstractIncomingMessage] = []
    script = "import sys\nfor i in range(3000):\n    print('line', i, 'x' * 40)\n"
    async with anyio.create_task_group() as tg:
        await tg.start(collect_output, vhost.url, received)
        async with running_worker(vhost.url, pool="p1", output_max_bytes=100_000), \
                Publisher(vhost.url) as publisher:
            run = await publisher.submit(new_run(shlex.join([PYTHON, "-c", script])), pool="p1")
            await events.wait_terminal([run.id], timeout=60)
            await wait_until(lambda: any(json.loads(m.body)["eof"] for m in received))
        tg.cancel_scope.cancel()
    document = committed_document()
    declared = message_for_routing_key(document, OUTPUT_EXCHANGE, "output.{pool}.{runId}")
    validator = payload_validator(document, declared)
    bodies = []
    for message in received:
        assert message.routing_key == f"output.p1.{run.id}"
        assert message.content_type == declared["contentType"]
        body = json.loads(message.body)
        assert validator.is_valid(body), list(validator.iter_errors(body))[:1]
        bodies.append(body)
    assert [b["sequence"] for b in bodies] == list(range(len(bodies)))
    assert [b["eof"] for b in bodies] == [False] * (len(bodies) - 1) + [True]
    assert [b["truncated"] for b in bodies].count(True) >= 1
    texts = [line["text"] for b in bodies for line in b["lines"]]
    shipped = len(texts)
    assert texts == [f"line {i} {'x' * 40}" for i in range(shipped)]
    assert 0 < sum(len(t) for t in texts) <= 100_000 < 3000 * 48  # capped, in order
    assert all(b["first_line"] <= shipped for b in bodies)


class _ShipsOnlyAfterTheEvents(OutputShipper):
    """Output that reaches the broker later than events: it is held until `go` is set."""

    go: anyio.Event

    async def ship_forever(self, connection: aio_pika.abc.AbstractConnection) -> None:
        await self.go.wait()
        await super().ship_forever(connection)


@pytest.mark.parametrize("stopped_at_drain", [False, True], ids=["ended", "cancelled"])
async def test_output_of_a_run_that_ended_just_before_a_graceful_stop_is_delivered(
    vhost: VHost, events: EventLog, tmp_path: Path, stopped_at_drain: bool,
) -> None:
    """The worker is stopped (gracefully) right after its run's terminal event, or while the
    run runs (then it is cancelled at the drain timeout and prints as it goes), with the
    run's output still queued: output ships on a channel of its own, without order against
    the events, and here is held until the worker's last events are out. The worker flushes
    it before closing its connection: a subscriber gets every line and the `eof` batch."""
    worker = ProcessWorker(worker_settings(vhost.url, drain_timeout=0))
    shipper = _ShipsOnlyAfterTheEvents(pool=worker.pool, worker=worker.name)
    shipper.go = anyio.Event()
    worker.output = shipper
    events_out = worker._outbox.wait_empty

    async def wait_empty() -> None:  # the outbox is emptied once stopping: output may go
        await events_out()
        shipper.go.set()

    worker._outbox.wait_empty = wait_empty  # type: ignore[method-assign]
    received: list[aio_pika.abc.AbstractIncomingMessage] = []
    running = tmp_path / "running"
    script = "for i in range(500):\n    print('line', i)\n"
    if stopped_at_drain:
        script += ("import os, signal, sys, time\n"
                   "def bye(*_):\n    print('line 500', flush=True)\n    sys.exit(0)\n"
                   "signal.signal(signal.SIGTERM, bye)\n"
                   f"open({str(running)!r}, 'w').close()\n"
                   "while True:\n    time.sleep(1)\n")
    expected = [f"line {i}" for i in range(501 if stopped_at_drain else 500)]
    async with anyio.create_task_group() as tg:
        await tg.start(collect_output, vhost.url, received)
        async with anyio.create_task_group() as serving:
            serving.start_soon(worker.serve)
            with anyio.fail_after(30):
                await worker.ready.wait()
            async with Publisher(vhost.url) as publisher:
                run = await publisher.submit(new_run(shlex.join([PYTHON, "-c", script])))
            if stopped_at_drain:
                await wait_until(running.exists, timeout=60)
            else:
                await events.wait_terminal([run.id], timeout=60)
            worker.stop()
        assert shipper.go.is_set()  # held until the stop
        # serve() has returned: what it shipped is at the broker, on its way to the subscriber.
        await wait_until(lambda: any(json.loads(m.body)["eof"] for m in received), timeout=30)
        tg.cancel_scope.cancel()
    outcome = "cancelled" if stopped_at_drain else "completed"
    assert [e.type for e in events.terminal(run.id)] == [f"mq_worker.run.{outcome}"]
    bodies = [json.loads(m.body) for m in received]
    assert [b["sequence"] for b in bodies] == list(range(len(bodies)))
    assert [line["text"] for b in bodies for line in b["lines"]] == expected
    assert bodies[-1]["dropped_lines"] == 0
    assert shipper.stats().shipped_lines == len(expected)


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


@pytest.mark.slow
async def test_a_60_mb_output_flood_is_capped_and_neither_grows_the_worker_nor_slows_others(
    vhost: VHost, events: EventLog, ledgers: Callable[..., LedgerProcess], sqlite_url: str,
    worker_processes: Callable[..., Any], tmp_path: Path,
) -> None:
    ledger = ledgers(sqlite_url)
    worker = worker_processes(vhost.url, "--limit", "4", "--log-level", "WARNING")
    await wait_until(ledger.ready, timeout=30)
    await events.wait_for(lambda evs: any(e.type == "mq_worker.worker.started" for e in evs),
                          timeout=30)
    flood = ("import sys\nline = 'f' * 99 + '\\n'\nw = sys.stdout.write\n"
             "for _ in range(600_000):\n    w(line)\n")
    baseline = _rss(worker.process.pid)
    peak = baseline
    async with Publisher(vhost.url) as publisher:
        quiet = [await publisher.submit(new_run("echo quiet")) for _ in range(5)]
        await events.wait_terminal([r.id for r in quiet], timeout=60)
        before = [_start_delay(events, r.id) for r in quiet]
        big = await publisher.submit(new_run(shlex.join([PYTHON, "-c", flood])))
        await events.wait_for(lambda _: "run.submitted" in events.types(big.id), timeout=60)
        during = []
        while not events.terminal(big.id):
            run = await publisher.submit(new_run("echo during"))
            await events.wait_terminal([run.id], timeout=60)
            during.append(_start_delay(events, run.id))
            peak = max(peak, _rss(worker.process.pid))
        await events.wait_terminal([big.id], timeout=120)
    await wait_recorded(sqlite_url, {str(big.id): len(unique(events.of(big.id)))})
    await wait_until(lambda: output_lines(sqlite_url, str(big.id)) > 0, timeout=30)
    with LedgerStore(sqlite_url) as store:
        record = store.get_run(str(big.id))
        lines = store.get_output(str(big.id))
    print(f"worker RSS {baseline / 2**20:.1f} MiB -> peak {peak / 2**20:.1f} MiB; "
          f"start delay before {max(before):.3f} s, during the flood max {max(during):.3f} s "
          f"over {len(during)} runs; {len(lines)} lines stored")
    assert record is not None and record.state == "completed" and record.output_truncated
    assert sum(line.stream == "ledger" and "truncated" in line.text for line in lines) == 1
    assert 10 * 2**20 * 0.9 < sum(len(line.text) + 1 for line in lines) <= 10 * 2**20 + 200
    assert peak - baseline < 40 * 2**20  # far from the 60 MB printed
    assert during and all(d < 1.0 for d in during)


def _start_delay(events: EventLog, run_id: Any) -> float:
    pending = next(e for e in events.of(run_id) if e.type == "mq_worker.run.pending")
    submitted = next(e for e in events.of(run_id) if e.type == "mq_worker.run.submitted")
    return (submitted.time - pending.time).total_seconds()


@pytest.mark.slow
async def test_output_is_dropped_and_counted_while_the_broker_is_away_never_blocking_the_run(
    vhost: VHost, events: EventLog, tmp_path: Path,
) -> None:
    """The run prints 30 MB while its worker cannot reach the broker: the run is not held up
    (it ends while the link is still cut), the worker keeps only a bounded buffer, and once
    the link is back the output says how many lines were dropped."""
    go, done = tmp_path / "go", tmp_path / "done"
    script = ("import os, sys, time\n"
              "print('before', flush=True)\n"
              f"while not os.path.exists({str(go)!r}):\n"
              "    time.sleep(0.02)\n"
              "line = 'd' * 99 + '\\n'\n"
              "for _ in range(300_000):\n"
              "    sys.stdout.write(line)\n"
              "sys.stdout.flush()\n"
              f"open({str(done)!r}, 'w').close()\n")
    received: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with link_proxy(HOST, PORT) as proxy, anyio.create_task_group() as tg:
        await tg.start(collect_output, vhost.url, received)
        url = vhost.url_for("guest", "guest", port=proxy.port)
        async with running_worker(url, output_max_bytes=100 * 2**20) as worker, \
                Publisher(vhost.url) as publisher:
            run = await publisher.submit(new_run(shlex.join([PYTHON, "-c", script])))
            await wait_until(lambda: len(received) >= 1, timeout=30)
            proxy.cut()
            await wait_until(lambda: not worker.connected, timeout=15)
            go.touch()
            await wait_until(done.exists, timeout=60)  # the run was never blocked
            assert not worker.connected
            stats = worker.output.stats()
            assert stats.dropped_lines > 0 and stats.pending_bytes <= 9 * 2**20
            await proxy.restore()
            await events.wait_terminal([run.id], timeout=60)
            await wait_until(lambda: any(json.loads(m.body)["eof"] for m in received),
                             timeout=60)
        tg.cancel_scope.cancel()
    bodies = [json.loads(m.body) for m in received]
    shipped = sum(len(b["lines"]) for b in bodies)
    dropped = bodies[-1]["dropped_lines"]
    assert bodies[-1]["eof"] and dropped > 0
    assert shipped + dropped == 300_001  # every line shipped or counted, none twice
    assert [b["sequence"] for b in bodies] == list(range(len(bodies)))
