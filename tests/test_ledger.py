"""The run ledger end to end: real RabbitMQ, real SQLite and PostgreSQL.

The ledger runs as `mq-worker ledger` in a process of its own (so it can be
stopped and killed), and what it recorded is read back through `mq-worker
runs`, `run` and `logs`, as a user would.
"""

from __future__ import annotations

import json
import shlex
import signal
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mq_worker.ledger import LedgerStore
from mq_worker.publisher import Publisher, new_run
from tests.helpers import (
    PYTHON,
    EventLog,
    VHost,
    publish_raw,
    running_worker,
    unique,
    wait_until,
)
from tests.helpers.ledger import (
    LedgerProcess,
    cli_env,
    ledger_database,
    ledger_processes,
    mq_worker,
    output_lines,
    output_recorded,
    recorded,
    wait_recorded,
)
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


@pytest.fixture
def ledgers(vhost: VHost, tmp_path: Path) -> Iterator[Callable[..., LedgerProcess]]:
    with ledger_processes(vhost, tmp_path) as start:
        yield start


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
    await wait_until(lambda: output_recorded(sqlite_url, [str(runs[4].id)]), timeout=30)
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
    await wait_until(lambda: output_recorded(db_url, [str(r.id) for r in runs[:: 25]]),
                     timeout=30, interval=0.2)
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
        await wait_until(lambda: output_recorded(db, [str(r.id) for r in runs]), timeout=60,
                         interval=0.5)
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


