"""The outbox spool: events not yet confirmed survive a restart of the worker, whatever its name."""

from __future__ import annotations

import fcntl
import os
import resource
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mq_worker.events import EventType, OutgoingEvent, build_event
from mq_worker.spool import Spool
from tests.helpers import (
    HOST,
    PORT,
    PYTHON,
    EventLog,
    VHost,
    probe,
    publish_raw,
    run_body,
    started_runs,
    unique,
    wait_until,
)
from tests.proxy import link_proxy

pytestmark = pytest.mark.anyio


class UnnamedWorker:
    """`mq-worker start` without --name: its name is <hostname>-<pid>."""

    def __init__(self, url: str, *args: str, log: Path, limit_file_size: int | None = None
                 ) -> None:
        def limits() -> None:
            if limit_file_size is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_size, limit_file_size))

        self._log = log.open("ab")
        self.process = subprocess.Popen(
            [PYTHON, "-m", "mq_worker", "start", "--url", url, "--log-format", "json", *args],
            stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=limits,
        )

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._log.close()


@pytest.fixture
def unnamed_workers() -> Iterator[list[UnnamedWorker]]:
    started: list[UnnamedWorker] = []
    yield started
    for worker in started:
        worker.kill()


async def started_by_pid(events: EventLog, pid: int) -> str:
    found = await events.wait_for(lambda evs: [
        e for e in evs if e.type == "mq_worker.worker.started" and e.data["pid"] == pid],
        timeout=30)
    return str(found[0].subject)


def spool_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.outbox.jsonl"))


async def test_a_restarted_worker_with_the_default_name_publishes_the_spooled_events(
    vhost: VHost, events: EventLog, unnamed_workers: list[UnnamedWorker], tmp_path: Path
) -> None:
    spool, runs = tmp_path / "spool", tmp_path / "runs"
    runs.mkdir()
    gate = tmp_path / "cut"  # the run ends once the link is cut, never before
    body = run_body(probe(runs, extra=f"--gate {gate}"))
    async with link_proxy(HOST, PORT) as proxy:
        url = vhost.url_for("guest", "guest", port=proxy.port)
        first = UnnamedWorker(url, "--spool-dir", str(spool), log=tmp_path / "first.log")
        unnamed_workers.append(first)
        await started_by_pid(events, first.process.pid)
        await publish_raw(vhost.url, body)
        await wait_until(lambda: body["id"] in started_runs(runs))
        proxy.cut()
        gate.touch()
        await wait_until(lambda: (runs / f"{body['id']}.end").exists())
        # The completed event can only be in the spool now; kill the worker.
        await wait_until(lambda: any("run.completed" in f.read_text()
                                     for f in spool_files(spool)), timeout=10)
        first.kill()
        await proxy.restore()
    second = UnnamedWorker(vhost.url, "--spool-dir", str(spool), log=tmp_path / "second.log")
    unnamed_workers.append(second)
    await events.wait_terminal([body["id"]], timeout=30)
    types = [e.type for e in unique(events.of(body["id"]))]
    assert types == ["mq_worker.run.pending", "mq_worker.run.submitted",
                     "mq_worker.run.completed"]
    # Spool files do not pile up: the restarted worker writes to the same one.
    assert len(spool_files(spool)) == 1


async def test_live_workers_never_share_a_spool_and_orphans_are_adopted(
    vhost: VHost, events: EventLog, unnamed_workers: list[UnnamedWorker], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    # A spool left by a worker that is gone (named after an old process id).
    orphan_event = build_event(EventType.RUN_CANCELLED, source="/mq_worker/workers/old-123",
                               subject="7d1d4cc4-52e6-4f6e-8a43-3c8e3a3fbe0d",
                               data={"run_id": "7d1d4cc4-52e6-4f6e-8a43-3c8e3a3fbe0d"})
    orphan = Spool(spool / "old-host-123.outbox.jsonl")
    orphan.append(orphan_event)
    orphan.close()
    for name in ("a", "b"):
        worker = UnnamedWorker(vhost.url, "--spool-dir", str(spool), log=tmp_path / f"{name}.log")
        unnamed_workers.append(worker)
        await started_by_pid(events, worker.process.pid)
    await events.wait_for(lambda evs: any(e.id == orphan_event.id for e in evs))
    files = spool_files(spool)
    assert len(files) == 2, files
    for file in files:  # each is locked by its live worker
        with Spool.lock_path(file).open("a") as lock, pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


async def test_a_worker_whose_spool_cannot_be_written_goes_on_publishing(
    vhost: VHost, events: EventLog, unnamed_workers: list[UnnamedWorker], tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    # Writes beyond 4 KiB fail (EFBIG), like on a full disk: the spool's, the log's, the runs'.
    worker = UnnamedWorker(vhost.url, "--spool-dir", str(spool), "--limit", "8",
                           log=tmp_path / "worker.log", limit_file_size=4096)
    unnamed_workers.append(worker)
    await started_by_pid(events, worker.process.pid)
    bodies = [run_body("true", name="x" * 1000) for _ in range(60)]
    for body in bodies:
        await publish_raw(vhost.url, body)
    await events.wait_terminal([b["id"] for b in bodies], timeout=60)
    for body in bodies:
        assert [e.type for e in events.terminal(body["id"])] == ["mq_worker.run.completed"]
    assert worker.process.poll() is None


def _event(n: int) -> OutgoingEvent:
    return build_event(EventType.RUN_PENDING, source="/mq_worker/workers/t", subject=str(n),
                       data={"run_id": str(n)})


def test_a_torn_last_line_does_not_swallow_the_next_event(tmp_path: Path) -> None:
    path = tmp_path / "w.outbox.jsonl"
    events = [_event(1), _event(2)]
    first = Spool(path)
    first.append(events[0])
    first.close()
    with path.open("ab") as file:
        file.write(b'{"id": "torn by a cras')  # a write cut short
    second = Spool(path)
    second.append(events[1])
    second.close()
    assert [e.id for e in Spool(path).load()] == [e.id for e in events]


def test_the_spool_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "w.outbox.jsonl"
    path.write_bytes(b"")
    path.chmod(0o644)
    spool = Spool(path)
    spool.append(_event(1))
    spool.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
