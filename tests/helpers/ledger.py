"""Ledger databases and processes for tests: an SQLite file or a PostgreSQL database of the
test's own, `mq-worker ledger` in a process, the CLI as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import anyio.abc

from mq_worker.ledger import LedgerStore
from mq_worker.topology import OUTPUT_EXCHANGE
from tests.helpers import PYTHON, VHost, wait_until

PG_ADMIN = os.environ.get("MQ_WORKER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432")


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database `mqw_test_<uuid>` on the local PostgreSQL, dropped afterwards."""
    import psycopg

    name = f"mqw_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{PG_ADMIN}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN}/{name}"
    finally:
        with psycopg.connect(f"{PG_ADMIN}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def ledger_database(kind: str, directory: Path) -> Iterator[str]:
    if kind == "postgresql":
        with postgres_database() as url:
            yield url
    else:
        yield f"sqlite:///{directory / 'ledger.db'}"


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


@contextmanager
def ledger_processes(vhost: VHost, tmp_path: Path) -> Iterator[Callable[..., LedgerProcess]]:
    """start(db, *args) -> a ledger process; every one is killed at exit."""
    started: list[LedgerProcess] = []

    def start(db: str, *args: str) -> LedgerProcess:
        process = LedgerProcess(cli_env(vhost, tmp_path), db,
                                tmp_path / f"ledger-{len(started)}.log", *args)
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.stop(signal.SIGKILL)


def recorded(db: str) -> dict[str, Any]:
    """Run id -> (state, event count), as the ledger has them now."""
    with LedgerStore(db) as store:
        return {r.id: (r.state, r.event_count)
                for r in store.list_runs(limit=100_000).runs}


def output_recorded(db: str, run_ids: list[str]) -> bool:
    """Whether the ledger has output of every run of `run_ids`. Output comes on a stream of
    its own (`mq_worker.output`, published on another channel than the events), in no
    order with the run's events: a run recorded as ended may not have its output yet."""
    with LedgerStore(db) as store:
        return all(store.get_output(run_id) for run_id in run_ids)


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



async def collect_output(url: str, into: list[aio_pika.abc.AbstractIncomingMessage],
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


