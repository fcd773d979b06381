"""The run ledger and run output, end to end: real RabbitMQ, real SQLite and PostgreSQL.

The ledger runs as `mq-worker ledger` in a process of its own (so it can be
stopped and killed), and what it recorded is read back through `mq-worker
runs`, `run` and `logs`, as a user would.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import anyio
import anyio.abc
import psutil
import pytest

from mq_worker.ledger import LedgerStore
from mq_worker.publisher import Publisher, new_run
from mq_worker.topology import OUTPUT_EXCHANGE
from tests.conftest import (
    HOST,
    PORT,
    PYTHON,
    EventLog,
    VHost,
    management,
    publish_raw,
    running_worker,
    unique,
    wait_until,
)
from tests.contract import committed_document, message_for_routing_key, payload_validator
from tests.helpers.ledger import ledger_database
from tests.proxy import link_proxy
from tests.test_security import broker_user

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with ledger_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    with ledger_database("sqlite", tmp_path) as url:
        yield url


def cli_env(vhost: VHost, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQ_WORKER_")}
    # A home of the test's own: no default ledger of the user is read or created.
    return {**env, "MQ_WORKER_URL": vhost.url, "HOME": str(home), "XDG_DATA_HOME": str(home)}


async def mq_worker(env: dict[str, str], *args: str,
                    timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(
        lambda: subprocess.run([PYTHON, "-m", "mq_worker", *args], capture_output=True,
                               text=True, timeout=timeout, env=env))


def spawn(env: dict[str, str], sink: Any, *args: str) -> subprocess.Popen[str]:
    """`mq-worker ARGS` started, its stdout to `sink`."""
    return subprocess.Popen([PYTHON, "-m", "mq_worker", *args], stdout=sink,
                            stderr=subprocess.PIPE, text=True, env=env)


class LedgerProcess:
    """`mq-worker ledger` in a process of its own."""

    def __init__(self, env: dict[str, str], db: str, log: Path, *args: str) -> None:
        self.log = log
        self._file = log.open("a")
        self.process = subprocess.Popen(
            [PYTHON, "-m", "mq_worker", "ledger", "--db", db, "--log-format", "json", *args],
            stdout=self._file, stderr=subprocess.STDOUT, env=env)

    def ready(self) -> bool:
        return "recording runs" in self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=30)
        self._file.close()
        return code


@pytest.fixture
def ledgers(vhost: VHost, tmp_path: Path) -> Iterator[Callable[..., LedgerProcess]]:
    started: list[LedgerProcess] = []

    def start(db: str, *args: str) -> LedgerProcess:
        process = LedgerProcess(cli_env(vhost, tmp_path), db,
                                tmp_path / f"ledger-{len(started)}.log", *args)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop(signal.SIGKILL)


def recorded(db: str) -> dict[str, Any]:
    """Run id -> (state, event count), as the ledger has them now."""
    with LedgerStore(db) as store:
        return {r.id: (r.state, r.event_count)
                for r in store.list_runs(limit=100_000).runs}


def output_lines(db: str, run_id: str) -> int:
    with LedgerStore(db) as store:
        record = store.get_run(run_id)
        return record.output_lines if record else 0


async def wait_recorded(db: str, expected: dict[str, int], timeout: float = 60) -> None:
    """Until every run of `expected` is in a terminal state with that many events."""
    def done() -> bool:
        now = recorded(db)
        return all(now.get(r, ("", 0))[1] >= n and now[r][0] not in ("pending", "submitted")
                   for r, n in expected.items())

    await wait_until(done, timeout=timeout, interval=0.2)


async def test_every_outcome_is_recorded_with_its_timeline(
    vhost: VHost, events: EventLog, ledgers: Callable[..., LedgerProcess], db_url: str,
    tmp_path: Path,
) -> None:
    env = cli_env(vhost, tmp_path)
    ledger = ledgers(db_url)
    await wait_until(ledger.ready, timeout=30)
    async with running_worker(vhost.url, limit=4), Publisher(vhost.url) as publisher:
        completed = await publisher.submit(new_run("echo hello", name="ok", tags=["demo"]))
        crashed = await publisher.submit(new_run(f"{PYTHON} -c 'raise SystemExit(3)'"))
        cancelled = await publisher.submit(new_run("sleep 60", name="long"))
        rejected = await publisher.submit(new_run("true", job_variables={"undeclared": 1}))
        await events.wait_for(lambda _: "run.submitted" in events.types(cancelled.id))
        await publisher.cancel(cancelled.id, reason="changed my mind")
        await publish_raw(vhost.url, b"not json at all")
        runs = [completed.id, crashed.id, cancelled.id, rejected.id]
        await events.wait_terminal(runs, timeout=60)
        unreadable = await events.wait_for(lambda evs: [
            e for e in evs if e.type == "mq_worker.run.rejected" and e.subject is None])
    expected = {str(r): len(unique(events.of(r))) for r in runs}
    expected[unreadable[0].id] = 1
    await wait_recorded(db_url, expected)

    listed = await mq_worker(env, "runs", "--db", db_url, "--json")
    assert listed.returncode == 0, listed.stderr
    by_id = {r["id"]: r for r in json.loads(listed.stdout)}
    assert {k: by_id[str(k)]["state"] for k in runs} == {
        completed.id: "completed", crashed.id: "crashed", cancelled.id: "cancelled",
        rejected.id: "rejected"}
    assert by_id[str(completed.id)]["status_code"] == 0
    assert by_id[str(crashed.id)]["status_code"] == 3
    assert by_id[unreadable[0].id]["state"] == "rejected"
    assert "JSON" in by_id[unreadable[0].id]["reason"]
    for run_id in runs:
        row = by_id[str(run_id)]
        assert {"id", "name", "state", "pool", "queue", "worker", "status_code"} <= set(row)
        assert row["pool"] == "default" and row["queue"] == "default"

    shown = await mq_worker(env, "run", str(cancelled.id), "--db", db_url, "--json")
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert [e["type"] for e in detail["events"]] == [
        e.type for e in unique(events.of(cancelled.id))]
    assert [e["type"] for e in detail["events"]][-1] == "mq_worker.run.cancelled"
    assert detail["reason"] == "changed my mind" and detail["name"] == "long"
    assert detail["pending_at"] <= detail["submitted_at"] <= detail["ended_at"]
    assert detail["duration_seconds"] > 0 and detail["start_delay_seconds"] is not None
    done = json.loads((await mq_worker(env, "run", str(completed.id), "--db", db_url,
                                       "--json")).stdout)
    assert done["tags"] == ["demo"] and done["events"][0]["data"]["run_name"] == "ok"
    rejected_detail = json.loads((await mq_worker(env, "run", str(rejected.id), "--db", db_url,
                                                  "--json")).stdout)
    assert "undeclared" in rejected_detail["reason"]

    table = await mq_worker(env, "runs", "--db", db_url, "--state", "crashed")
    assert str(crashed.id) in table.stdout and str(completed.id) not in table.stdout
    logs = await mq_worker(env, "logs", str(completed.id), "--db", db_url)
    assert logs.returncode == 0 and logs.stdout == "hello\n"
    assert ledger.stop() == 0


async def test_output_is_stored_in_order_and_complete(
    vhost: VHost, events: EventLog, ledgers: Callable[..., LedgerProcess], db_url: str,
    tmp_path: Path,
) -> None:
    env = cli_env(vhost, tmp_path)
    ledger = ledgers(db_url)
    await wait_until(ledger.ready, timeout=30)
    script = ("import sys\n"
              "for i in range(5000):\n"
              "    print(f'out {i}', file=sys.stderr if i % 3 == 0 else sys.stdout)\n"
              "print('no newline at the end', end='')\n")
    async with running_worker(vhost.url), Publisher(vhost.url) as publisher:
        run = await publisher.submit(new_run(shlex.join([PYTHON, "-c", script])))
        await events.wait_terminal([run.id], timeout=60)
    await wait_recorded(db_url, {str(run.id): len(unique(events.of(run.id)))})
    await wait_until(lambda: output_lines(db_url, str(run.id)) == 5001, timeout=30,
                     interval=0.2)

    result = await mq_worker(env, "logs", str(run.id), "--db", db_url, "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    stdout = [x["text"] for x in lines if x["stream"] == "stdout"]
    stderr = [x["text"] for x in lines if x["stream"] == "stderr"]
    assert stdout == [f"out {i}" for i in range(5000) if i % 3] + ["no newline at the end"]
    assert stderr == [f"out {i}" for i in range(5000) if i % 3 == 0]
    assert len(lines) == 5001
    ledger.stop()


async def test_runs_that_end_while_the_ledger_is_down_are_recorded_when_it_is_back(
    vhost: VHost, events: EventLog, ledgers: Callable[..., LedgerProcess], sqlite_url: str,
) -> None:
    first = ledgers(sqlite_url)
    await wait_until(first.ready, timeout=30)
    assert first.stop() == 0
    async with running_worker(vhost.url, limit=4), Publisher(vhost.url) as publisher:
        runs = [await publisher.submit(new_run(f"echo run {i}")) for i in range(6)]
        await events.wait_terminal([r.id for r in runs], timeout=60)
    assert recorded(sqlite_url) == {}
    ledgers(sqlite_url)
    await wait_recorded(sqlite_url, {str(r.id): len(unique(events.of(r.id))) for r in runs})
    with LedgerStore(sqlite_url) as store:
        assert [line.text for line in store.get_output(str(runs[4].id))] == ["run 4"]


async def test_a_ledger_killed_mid_batch_loses_nothing_and_records_nothing_twice(
    vhost: VHost, events: EventLog, ledgers: Callable[..., LedgerProcess], db_url: str,
) -> None:
    async with running_worker(vhost.url, limit=8), Publisher(vhost.url) as publisher:
        ledger = ledgers(db_url)
        await wait_until(ledger.ready, timeout=30)
        runs = [await publisher.submit(new_run(f"echo {i}")) for i in range(150)]

        def some_recorded() -> bool:
            count = len(recorded(db_url))
            return 0 < count < len(runs)

        await wait_until(some_recorded, timeout=60, interval=0.02)
        ledger.stop(signal.SIGKILL)
        await events.wait_terminal([r.id for r in runs], timeout=120)
    ledgers(db_url)
    expected = {str(r.id): len(unique(events.of(r.id))) for r in runs}
    await wait_recorded(db_url, expected, timeout=90)
    now = recorded(db_url)
    assert {r: now[r][1] for r in expected} == expected
    with LedgerStore(db_url) as store:
        for run in runs[:: 25]:
            record = store.get_run(str(run.id))
            assert record is not None
            assert [e.id for e in record.events] == [e.id for e in unique(events.of(run.id))]
            assert [line.text for line in store.get_output(str(run.id))] == [
                str(runs.index(run))]


async def test_two_ledgers_on_one_postgresql_record_each_run_and_event_once(
    vhost: VHost, events: EventLog, ledgers: Callable[..., LedgerProcess],
) -> None:
    with ledger_database("postgresql", Path("/nonexistent")) as db:
        both = [ledgers(db), ledgers(db)]
        await wait_until(lambda: all(ledger.ready() for ledger in both), timeout=30)
        async with running_worker(vhost.url, limit=8), Publisher(vhost.url) as publisher:
            runs = [await publisher.submit(new_run(f"echo {i}")) for i in range(220)]
            await events.wait_terminal([r.id for r in runs], timeout=180)
        expected = {str(r.id): len(unique(events.of(r.id))) for r in runs}
        await wait_recorded(db, expected, timeout=90)
        import psycopg

        with psycopg.connect(db) as connection:
            events_per_run = dict(connection.execute(
                "SELECT run_id, COUNT(*) FROM events GROUP BY run_id").fetchall())
            total_runs = connection.execute("SELECT COUNT(*) FROM runs").fetchone()
        assert events_per_run == expected
        assert total_runs == (len(runs),)
        with LedgerStore(db) as store:
            assert {str(r.id): [line.text for line in store.get_output(str(r.id))]
                    for r in runs} == {str(r.id): [str(i)] for i, r in enumerate(runs)}
        assert recorded(db) == {r: ("completed", n) for r, n in expected.items()}
        for ledger in both:
            assert ledger.stop() == 0


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


async def _collect_output(url: str, into: list[aio_pika.abc.AbstractIncomingMessage],
                          *, task_status: anyio.abc.TaskStatus[None]) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(OUTPUT_EXCHANGE, "topic", durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "output.#")
        task_status.started()
        async with queue.iterator(no_ack=True) as messages:
            async for message in messages:
                into.append(message)


async def test_output_batches_on_the_wire_follow_the_contract(
    vhost: VHost, events: EventLog,
) -> None:
    received: list[aio_pika.abc.AbstractIncomingMessage] = []
    script = "import sys\nfor i in range(3000):\n    print('line', i, 'x' * 40)\n"
    async with anyio.create_task_group() as tg:
        await tg.start(_collect_output, vhost.url, received)
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


LEDGER_PERMISSIONS = {
    "configure": r"^mq_worker\.(runs|events|output|due|dead|ledger)$",
    "write": r"^(amq\.default|mq_worker\.ledger)$",
    "read": r"^mq_worker\.(events|output|ledger)$",
}


async def test_a_ledger_works_with_exactly_the_documented_permissions(
    vhost: VHost, events: EventLog, sqlite_url: str, tmp_path: Path,
) -> None:
    documented = " ".join((ROOT / "docs" / "ledger.md").read_text().replace("\\\n", " ").split())
    assert " ".join(f"'{LEDGER_PERMISSIONS[k]}'" for k in ("configure", "write", "read")) \
        in documented
    password = uuid.uuid4().hex
    with broker_user(vhost, password=password, **LEDGER_PERMISSIONS) as user:
        env = {**cli_env(vhost, tmp_path), "MQ_WORKER_URL": vhost.url_for(user, password)}
        ledger = LedgerProcess(env, sqlite_url, tmp_path / "ledger.log")
        try:
            await wait_until(ledger.ready, timeout=30)
            async with running_worker(vhost.url), Publisher(vhost.url) as publisher:
                run = await publisher.submit(new_run("echo allowed"))
                await events.wait_terminal([run.id], timeout=60)
            await wait_recorded(sqlite_url, {str(run.id): len(unique(events.of(run.id)))})
            await wait_until(lambda: output_lines(sqlite_url, str(run.id)) == 1, timeout=30)
            assert ledger.process.poll() is None
        finally:
            ledger.stop()
    assert "ACCESS_REFUSED" not in ledger.log.read_text()


async def test_runs_older_than_keep_days_are_pruned_with_their_events_and_output(
    vhost: VHost, events: EventLog, ledgers: Callable[..., LedgerProcess], db_url: str,
) -> None:
    keep_seconds = 6.0
    ledger = ledgers(db_url, "--keep-days", str(keep_seconds / 86400), "--prune-interval", "0.5")
    await wait_until(ledger.ready, timeout=30)
    async with running_worker(vhost.url), Publisher(vhost.url) as publisher:
        old = await publisher.submit(new_run("echo old"))
        await events.wait_terminal([old.id], timeout=60)
        await wait_recorded(db_url, {str(old.id): len(unique(events.of(old.id)))})
        await wait_until(lambda: output_lines(db_url, str(old.id)) == 1, timeout=30)
        # Long enough after the old run ended that it is due, the new one is not.
        await wait_until(lambda: (datetime.now(UTC) - events.terminal(old.id)[0].time
                                  ).total_seconds() > keep_seconds - 2, timeout=30)
        new = await publisher.submit(new_run("echo new"))
        await events.wait_terminal([new.id], timeout=60)
    await wait_recorded(db_url, {str(new.id): len(unique(events.of(new.id)))})
    await wait_until(lambda: str(old.id) not in recorded(db_url), timeout=30)
    with LedgerStore(db_url) as store:
        assert store.get_output(str(old.id)) == []
        assert store.get_run(str(old.id)) is None
        assert store.get_run(str(new.id)) is not None
    assert ledger.stop() == 0


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
        await tg.start(_collect_output, vhost.url, received)
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
