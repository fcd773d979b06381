"""The life of a run's processes: what is executed, what is stopped, and when a worker stops."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path

import anyio
import psutil
import pytest

from tests.helpers import (
    PYTHON,
    EventLog,
    VHost,
    WorkerProcess,
    management,
    probe,
    publish_raw,
    run_body,
    running_worker,
    started_runs,
    wait_until,
)
from tests.test_reliability import started_event

pytestmark = pytest.mark.anyio


def alive(pid: int) -> bool:
    """True while `pid` is a process that has not terminated (a zombie has)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def executable(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode())
    path.chmod(0o755)
    return path


# -- the allow-list: exactly the checked file is executed ---------------------------------------


@pytest.mark.parametrize("unexecutable", [
    "echo this file has no shebang\n",
    "#!/bin/sh\r\necho a CRLF shebang names the interpreter '/bin/sh\\r'\r\n",
    "#!/nonexistent/interpreter\necho the interpreter is missing\n",
])
async def test_an_allowed_file_that_cannot_be_executed_never_falls_through_to_path(
    vhost: VHost, events: EventLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    unexecutable: str,
) -> None:
    flows, elsewhere = tmp_path / "flows", tmp_path / "elsewhere"
    executable(flows / "etl", unexecutable)
    marker = tmp_path / "escaped"
    executable(elsewhere / "etl", f"#!/bin/sh\n: > {marker}\n")  # no PATH needed
    monkeypatch.setenv("MQ_WORKER_ALLOW_COMMAND_PREFIX", str(flows))
    body = run_body(job_variables={"command": "etl", "env": {"PATH": f"{flows}:{elsewhere}"}})
    async with running_worker(vhost.url):
        await publish_raw(vhost.url, body)
        await events.wait_terminal([body["id"]])
    assert not marker.exists(), "a program outside the allow-list ran"
    terminal = events.terminal(body["id"])
    assert [e.type for e in terminal] == ["mq_worker.run.crashed"]
    assert terminal[0].data["reason"] == "submission-failed"
    assert str(flows / "etl") in terminal[0].data["message"]


# -- background children ------------------------------------------------------------------------


async def test_background_children_are_stopped_before_the_run_ends(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    pid_file = tmp_path / "background.pid"
    script = f"sleep 120 & echo $! > {shlex.quote(str(pid_file))}; echo done"
    body = run_body(shlex.join(["sh", "-c", script]))
    async with running_worker(vhost.url, limit=1) as worker:
        await publish_raw(vhost.url, body)
        await events.wait_terminal([body["id"]])
        background = int(pid_file.read_text())
        # When the run's terminal event is out, nothing of the run is left running.
        assert not alive(background)
        terminal = events.terminal(body["id"])
        assert [e.type for e in terminal] == ["mq_worker.run.completed"]
        assert worker.free_slots == 1


async def test_background_children_count_against_the_limit_until_they_are_gone(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    marker = tmp_path / "term-received"
    # The main process exits at once; its background child takes 2 s to honour SIGTERM.
    child = (f"import signal, time\n"
             f"def on_term(*_):\n"
             f"    time.sleep(2); open({str(marker)!r}, 'w').close(); raise SystemExit(0)\n"
             f"signal.signal(signal.SIGTERM, on_term)\n"
             f"time.sleep(120)\n")
    script = f"{shlex.quote(PYTHON)} -c {shlex.quote(child)} & sleep 0.5"
    first = run_body(shlex.join(["sh", "-c", script]))
    second = run_body(probe(tmp_path))
    async with running_worker(vhost.url, limit=1):
        await publish_raw(vhost.url, first)
        await publish_raw(vhost.url, second)
        await events.wait_terminal([first["id"], second["id"]])
    # The second run took the only slot after the first run's child was gone.
    assert marker.exists()
    assert started_runs(tmp_path)[second["id"]]["t"] >= marker.stat().st_mtime - 0.05


# -- stopping the worker ----------------------------------------------------------------------


async def test_second_sigterm_after_the_drain_timeout_stops_at_once(
    vhost: VHost, events: EventLog, worker_processes, tmp_path: Path
) -> None:
    worker = worker_processes(vhost.url, "--drain-timeout", "1")
    await started_event(events, worker.name)
    body = run_body(job_variables={"command": probe(tmp_path, sleep=600, extra="--ignore-term"),
                                   "grace_seconds": 3600})
    await publish_raw(vhost.url, body)
    await wait_until(lambda: body["id"] in started_runs(tmp_path))
    pid = started_runs(tmp_path)[body["id"]]["pid"]
    worker.signal(signal.SIGTERM)
    # The drain timeout has passed: the run was sent SIGTERM, which it ignores.
    await wait_until(lambda: any(line.get("event") == "cancelling runs still running"
                                 for line in worker.log_lines()), timeout=15)
    began = time.monotonic()
    worker.signal(signal.SIGTERM)
    assert await anyio.to_thread.run_sync(lambda: worker.wait(30)) == 0
    assert time.monotonic() - began < 10
    assert not alive(pid)
    terminal = await events.wait_for(lambda _: events.terminal(body["id"]))
    assert [e.type for e in terminal] == ["mq_worker.run.cancelled"]


async def test_second_signal_shortens_the_grace_of_a_cancel_in_progress(
    vhost: VHost, events: EventLog, worker_processes, tmp_path: Path
) -> None:
    from mq_worker import Publisher

    worker = worker_processes(vhost.url)
    await started_event(events, worker.name)
    body = run_body(job_variables={"command": probe(tmp_path, sleep=600, extra="--ignore-term"),
                                   "grace_seconds": 3600})
    await publish_raw(vhost.url, body)
    await wait_until(lambda: body["id"] in started_runs(tmp_path))
    pid = started_runs(tmp_path)[body["id"]]["pid"]
    async with Publisher(vhost.url) as publisher:
        await publisher.cancel(body["id"], pool="default", reason="by a test")
    await wait_until(lambda: any(line.get("event") == "cancel received"
                                 for line in worker.log_lines()))
    worker.signal(signal.SIGINT)
    await wait_until(lambda: any(line.get("event") == "waiting for running runs"
                                 for line in worker.log_lines()))
    began = time.monotonic()
    worker.signal(signal.SIGINT)
    assert await anyio.to_thread.run_sync(lambda: worker.wait(30)) == 0
    assert time.monotonic() - began < 10
    assert not alive(pid)
    terminal = await events.wait_for(lambda _: events.terminal(body["id"]))
    assert [e.type for e in terminal] == ["mq_worker.run.cancelled"]
    assert terminal[0].data["reason"] == "by a test"


async def test_sighup_drains_like_sigterm(
    vhost: VHost, events: EventLog, worker_processes, tmp_path: Path
) -> None:
    worker = worker_processes(vhost.url)
    await started_event(events, worker.name)
    body = run_body(probe(tmp_path, sleep=2))
    await publish_raw(vhost.url, body)
    await wait_until(lambda: body["id"] in started_runs(tmp_path))
    worker.signal(signal.SIGHUP)
    assert await anyio.to_thread.run_sync(lambda: worker.wait(30)) == 0
    await events.wait_for(lambda evs: any(
        e.type == "mq_worker.worker.stopped" and e.subject == worker.name for e in evs))
    assert [e.type for e in events.terminal(body["id"])] == ["mq_worker.run.completed"]
    assert (tmp_path / f"{body['id']}.end").exists()


# -- a worker whose surroundings fail -------------------------------------------------------


def start_with_a_closed_log_pipe(url: str, name: str) -> subprocess.Popen[bytes]:
    """`mq-worker start 2>&1 | head -c 100`: the reader goes away after the first line."""
    read, write = os.pipe()
    worker = subprocess.Popen(
        [PYTHON, "-m", "mq_worker", "start", "--url", url, "--name", name],
        stdout=write, stderr=write,
    )
    os.close(write)
    os.read(read, 100)
    os.close(read)  # from now on every log write fails (EPIPE)
    return worker


async def test_a_broken_log_pipe_does_not_stop_the_worker_or_its_runs(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    worker = await anyio.to_thread.run_sync(start_with_a_closed_log_pipe, vhost.url, "piped")
    try:
        await events.wait_for(lambda evs: any(
            e.type == "mq_worker.worker.started" and e.subject == "piped" for e in evs),
            timeout=30)
        bodies = [run_body(probe(tmp_path)) for _ in range(5)]
        for body in bodies:
            await publish_raw(vhost.url, body)
        await events.wait_terminal([b["id"] for b in bodies], timeout=30)
        for body in bodies:
            assert [e.type for e in events.terminal(body["id"])] == ["mq_worker.run.completed"]
        assert worker.poll() is None
        worker.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(lambda: worker.wait(30)) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


# -- a stalled worker reported lost by a peer ----------------------------------------------


async def _two_workers_one_run_each(
    vhost: VHost, events: EventLog, worker_processes, tmp_path: Path, *, run_seconds: float,
    stalled_is_elected: bool,
) -> tuple[object, object, dict[str, object]]:
    """A worker about to be stalled runs `body`; a peer runs another long run.

    The worker started first is the pool's elected reporter of lost workers. The
    stalled one's connection has AMQP heartbeats every 2 s, so the broker closes it
    after a few seconds of stall."""
    body = run_body(probe(tmp_path, sleep=run_seconds))
    other = run_body(probe(tmp_path, sleep=600))
    stalled_url = vhost.url + "?heartbeat=2" if stalled_is_elected else vhost.url
    order = [("stalled", stalled_url, body), ("peer", vhost.url, other)]
    if not stalled_is_elected:
        order.reverse()
    workers = {}
    for role, url, run in order:
        worker = worker_processes(url, "--heartbeat-seconds", "1", "--limit", "1")
        await started_event(events, worker.name)
        await publish_raw(vhost.url, run)
        await wait_until(lambda run=run: run["id"] in started_runs(tmp_path))
        workers[role] = worker
    stalled, peer = workers["stalled"], workers["peer"]
    # A process can start before its `submitted` event reaches this subscriber.
    await events.wait_for(lambda _: "run.submitted" in events.types(body["id"]))
    assert [e.data["worker"] for e in events.of(body["id"])
            if e.type == "mq_worker.run.submitted"] == [stalled.name]
    # Each has seen the other's heartbeats, and the last ones list the run.
    for worker in (stalled, peer):
        await events.wait_for(lambda evs, w=worker: sum(
            e.type == "mq_worker.worker.heartbeat" and e.subject == w.name for e in evs) >= 3)
    await events.wait_for(lambda evs: any(
        e.type == "mq_worker.worker.heartbeat" and e.subject == stalled.name
        and body["id"] in e.data["in_flight"] for e in evs))
    return stalled, peer, body


def _run_ended_at(worker: WorkerProcess, run_id: str, *, after: float) -> float | None:
    """When `worker` logged the end of `run_id` (however it ended), if it did after `after`."""
    for line in worker.log_lines():
        if (line.get("run_id") == run_id and str(line.get("event", "")).startswith("run ended")
                and isinstance(line.get("timestamp"), str)):
            at = datetime.fromisoformat(line["timestamp"]).timestamp()
            if at > after:
                return at
    return None


@pytest.mark.parametrize(("stalled_is_elected", "run_seconds"), [(False, 3), (True, 600)],
                         ids=["peer-elected-run-ends-while-stalled",
                              "stalled-elected-run-still-running"])
async def test_a_stalled_worker_reported_lost_gives_its_runs_one_terminal_event(
    vhost: VHost, events: EventLog, worker_processes, tmp_path: Path,
    stalled_is_elected: bool, run_seconds: float,
) -> None:
    stalled, peer, body = await _two_workers_one_run_each(
        vhost, events, worker_processes, tmp_path, run_seconds=run_seconds,
        stalled_is_elected=stalled_is_elected)
    pid = started_runs(tmp_path)[body["id"]]["pid"]

    stalled.signal(signal.SIGSTOP)  # a paused VM, a blocked event loop
    try:
        lost = await events.wait_for(lambda evs: [
            e for e in evs if e.type == "mq_worker.worker.lost" and e.subject == stalled.name],
            timeout=30)
        assert lost[0].data["reported_by"] == peer.name
        await events.wait_terminal([body["id"]], timeout=10)
        if run_seconds < 600:
            await wait_until(lambda: (tmp_path / f"{body['id']}.end").exists(), timeout=15)
    finally:
        stalled.signal(signal.SIGCONT)
    # Back, the worker stops the run the pool was told had crashed, and publishes no
    # other terminal event for it: once it has logged how the run ended, a heartbeat it
    # emitted after that comes after anything it published for the run (one outbox,
    # published in order).
    resumed = time.time()
    await wait_until(lambda: not alive(pid), timeout=15)
    ended = await wait_until(lambda: _run_ended_at(stalled, body["id"], after=resumed),
                             timeout=30)
    await events.wait_for(lambda evs: any(
        e.type == "mq_worker.worker.heartbeat" and e.subject == stalled.name
        and e.time.timestamp() > ended for e in evs), timeout=30)
    terminal = events.terminal(body["id"])
    assert len(terminal) == 1, [(e.type, e.source, e.data) for e in terminal]
    assert terminal[0].type == "mq_worker.run.crashed"
    assert terminal[0].data["reason"] == "worker-lost"
    # The worker goes on serving.
    after = run_body(probe(tmp_path))
    await publish_raw(vhost.url, after)
    await events.wait_terminal([after["id"]], timeout=30)
    assert [e.type for e in events.terminal(after["id"])] == ["mq_worker.run.completed"]


# -- descriptors exhausted at spawn -------------------------------------------------------------


def start_with_few_descriptors(
    url: str, name: str, log: Path, limit: int
) -> subprocess.Popen[bytes]:
    def few() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with log.open("ab") as output:
        return subprocess.Popen(
            [PYTHON, "-m", "mq_worker", "start", "--url", url, "--name", name,
             "--log-format", "json", "--health-port", "0"],
            stdout=output, stderr=subprocess.STDOUT, preexec_fn=few,
        )


def log_lines(path: Path) -> list[dict[str, object]]:
    lines = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            lines.append(json.loads(line))
    return lines


def _health_status(port: int) -> int:
    """The status of GET /livez on the health port; 0 if it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (ConnectionError, urllib.error.URLError, TimeoutError):
        return 0


async def test_runs_started_while_descriptors_are_exhausted_are_not_crashed(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    # The health port holds at most 64 connections open: with 72 descriptors in all,
    # those leave the worker none to spawn with.
    worker = await anyio.to_thread.run_sync(start_with_few_descriptors, vhost.url, "few", log, 72)
    idle: list[socket.socket] = []
    try:
        await events.wait_for(lambda evs: any(
            e.type == "mq_worker.worker.started" and e.subject == "few" for e in evs), timeout=30)
        port = await wait_until(lambda: next(
            (line["port"] for line in log_lines(log)
             if line.get("event") == "health endpoint listening"), None))
        # Idle connections to the health port until the worker has no descriptor left.
        for _ in range(150):
            idle.append(socket.create_connection(("127.0.0.1", int(port))))
        bodies = [run_body(probe(tmp_path)) for _ in range(3)]
        for body in bodies:
            await publish_raw(vhost.url, body)
        await wait_until(lambda: any(line.get("event") == "run given back: resources exhausted "
                                     "at spawn" for line in log_lines(log)), timeout=15)
        assert not [e for e in events.events if e.type == "mq_worker.run.crashed"]
        for connection in idle:
            connection.close()
        await events.wait_terminal([b["id"] for b in bodies], timeout=60)
        for body in bodies:
            assert [e.type for e in events.terminal(body["id"])] == ["mq_worker.run.completed"]
        # The health port, out of descriptors to accept with, answers again.
        await wait_until(lambda: _health_status(int(port)) == 200, timeout=15)
    finally:
        for connection in idle:
            connection.close()
        worker.kill()
        worker.wait()


# -- a fatal error while runs are running -------------------------------------------------------


async def test_a_fatal_error_at_reconnect_stops_the_runs_first_and_keeps_their_events(
    vhost: VHost, events: EventLog, worker_processes, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    worker = worker_processes(vhost.url, "--spool-dir", str(spool), name="fatal")
    await started_event(events, "fatal")
    body = run_body(probe(tmp_path, sleep=600))
    await publish_raw(vhost.url, body)
    await wait_until(lambda: body["id"] in started_runs(tmp_path))
    pid = started_runs(tmp_path)[body["id"]]["pid"]
    # An operator recreates the dead-letter queue with other arguments; at its next
    # connection the worker finds a TopologyMismatch, which it cannot serve with.
    management("DELETE", f"/queues/{vhost.name}/mq_worker.dead")
    management("PUT", f"/queues/{vhost.name}/mq_worker.dead", {"durable": True, "arguments": {}})
    assert vhost.close_connections("fatal") >= 1
    assert await anyio.to_thread.run_sync(lambda: worker.wait(60)) != 0
    assert not alive(pid)
    assert any(line.get("event") == "cannot serve" for line in worker.log_lines())

    # Once the queue is fixed, the restarted worker publishes the run's terminal event.
    management("DELETE", f"/queues/{vhost.name}/mq_worker.dead")
    worker_processes(vhost.url, "--spool-dir", str(spool), name="fatal")
    await events.wait_terminal([body["id"]], timeout=30)
    terminal = events.terminal(body["id"])
    assert [e.type for e in terminal] == ["mq_worker.run.cancelled"]
    assert "cannot serve" in terminal[0].data["reason"]


def start_as_subreaper(url: str, name: str, log: Path) -> subprocess.Popen[bytes]:
    """A worker that inherits orphaned processes, as PID 1 of a container without an init."""
    def subreaper() -> None:
        ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER

    with log.open("ab") as output:
        return subprocess.Popen(
            [PYTHON, "-m", "mq_worker", "start", "--url", url, "--name", name,
             "--log-format", "json"],
            stdout=output, stderr=subprocess.STDOUT, preexec_fn=subreaper,
        )


async def test_background_processes_orphaned_to_the_worker_are_reaped(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    worker = await anyio.to_thread.run_sync(start_as_subreaper, vhost.url, "reaper",
                                            tmp_path / "worker.log")
    try:
        await events.wait_for(lambda evs: any(
            e.type == "mq_worker.worker.started" and e.subject == "reaper" for e in evs),
            timeout=30)
        # The background process ends by itself; the worker, its new parent, must reap it.
        body = run_body(job_variables={"command": "sh -c 'sleep 0.3 & exit 0'",
                                       "grace_seconds": 60})
        published = time.monotonic()
        await publish_raw(vhost.url, body)
        await events.wait_terminal([body["id"]], timeout=30)
        assert time.monotonic() - published < 20
        assert [e.type for e in events.terminal(body["id"])] == ["mq_worker.run.completed"]
    finally:
        worker.kill()
        worker.wait()


# -- a cancel racing the start ------------------------------------------------------------------


async def test_a_cancel_during_the_acknowledgement_of_a_start_stops_the_run_once(
    vhost: VHost, events: EventLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mq_worker import Publisher
    from mq_worker.consumer import Delivery

    terms, ready = tmp_path / "terms", tmp_path / "ready"
    script = (f"import signal, time\n"
              f"def on_term(*_):\n"
              f"    with open({str(terms)!r}, 'a') as f: f.write('TERM\\n')\n"
              f"signal.signal(signal.SIGTERM, on_term)\n"
              f"open({str(ready)!r}, 'w').close()\n"
              f"time.sleep(3)\n")
    body = run_body(shlex.join([PYTHON, "-c", script]))
    run_id = uuid.UUID(body["id"])
    acknowledged = Delivery.ack_started

    async def ack_while_the_cancel_arrives(delivery: Delivery) -> None:
        await acknowledged(delivery)
        # The broker is slow to take the acknowledgement; meanwhile the cancel comes.
        await wait_until(lambda: worker._registry.get(run_id) is not None)

    monkeypatch.setattr(Delivery, "ack_started", ack_while_the_cancel_arrives)
    async with running_worker(vhost.url) as worker, Publisher(vhost.url) as publisher:
        await publish_raw(vhost.url, body)
        await wait_until(ready.exists)  # running, its SIGTERM handler installed
        await publisher.cancel(body["id"], pool="default")
        await events.wait_terminal([body["id"]])
    assert [e.type for e in events.terminal(body["id"])] == ["mq_worker.run.cancelled"]
    assert terms.read_text() == "TERM\n"  # one stop, one SIGTERM
