"""`mq-worker start --processes N`: N real worker processes under one supervisor."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import psutil
import pytest

from mq_worker.supervisor import split_limit
from tests.helpers import (
    PYTHON,
    EventLog,
    VHost,
    probe,
    publish_raw,
    run_body,
    started_runs,
    wait_until,
)

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def worker_children(supervisor: subprocess.Popen[bytes]) -> dict[str, psutil.Process]:
    """The supervisor's worker processes by worker name."""
    found = {}
    for child in psutil.Process(supervisor.pid).children():
        argv = child.cmdline()
        if "--name" in argv:
            found[argv[argv.index("--name") + 1]] = child
    return found


def started(events: EventLog, name: str) -> int:
    return sum(1 for e in events.events
               if e.type == "mq_worker.worker.started" and e.subject == name)


def test_the_limit_is_split_evenly_the_first_processes_taking_the_rest() -> None:
    assert split_limit(8, 2) == [4, 4]
    assert split_limit(10, 4) == [3, 3, 2, 2]
    assert split_limit(3, 3) == [1, 1, 1]
    with pytest.raises(ValueError):
        split_limit(2, 3)


def test_a_limit_below_the_processes_is_refused_before_anything_starts() -> None:
    result = subprocess.run(
        [PYTHON, "-m", "mq_worker", "start", "--processes", "4", "--limit", "2",
         "--url", "amqp://guest:guest@127.0.0.1:1/"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot give each of 4 processes a run slot" in result.stderr


@pytest.fixture
def supervised(vhost: VHost, tmp_path: Path):  # type: ignore[no-untyped-def]
    started_processes: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        log = (tmp_path / "supervisor.log").open("w")
        process = subprocess.Popen(
            [PYTHON, "-m", "mq_worker", "start", "--url", vhost.url, "--log-format", "json",
             *args], stdout=log, stderr=subprocess.STDOUT)
        started_processes.append(process)
        return process

    yield start
    for process in started_processes:
        children = psutil.Process(process.pid).children() if process.poll() is None else []
        process.kill()
        process.wait(30)
        for child in children:
            child.kill()


async def test_n_processes_consume_and_share_the_runs(
    vhost: VHost, events: EventLog, supervised, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    port = free_port()
    supervisor = supervised("--processes", "2", "--limit", "4", "--name", "sup",
                            "--health-port", str(port))
    await events.wait_for(lambda _: started(events, "sup-0") and started(events, "sup-1"), 60)
    status = await anyio.to_thread.run_sync(lambda: subprocess.run(
        [PYTHON, "-m", "mq_worker", "status", "--url", vhost.url, "--json"],
        capture_output=True, text=True, timeout=60))
    rows = json.loads(status.stdout)["workers"]
    assert sorted(r["name"] for r in rows if r["state"] == "live") == ["sup-0", "sup-1"]
    assert {r["limit"] for r in rows} == {2}

    # Runs that each take a while: with 2 slots per process, 8 runs need both processes.
    bodies = [run_body(probe(tmp_path, sleep=1)) for _ in range(8)]
    for body in bodies:
        await publish_raw(vhost.url, body)
    await events.wait_terminal([b["id"] for b in bodies], timeout=60)
    assert all([e.type for e in events.terminal(b["id"])] == ["mq_worker.run.completed"]
               for b in bodies)
    ran_on = {r["env"]["MQ_WORKER_WORKER"] for r in started_runs(tmp_path).values()}
    assert ran_on == {"sup-0", "sup-1"}

    ready = await wait_until(lambda: get(port, "/readyz")[0] == 200, 30)
    assert ready
    code, metrics = await anyio.to_thread.run_sync(get, port, "/metrics")
    assert code == 200
    completed = [line for line in metrics.splitlines()
                 if line.startswith("mq_worker_runs_completed_total{")]
    by_worker = {w: sum(float(line.rsplit(" ", 1)[1]) for line in completed
                        if f'worker="{w}"' in line) for w in ("sup-0", "sup-1")}
    assert sum(by_worker.values()) == 8 and all(by_worker.values())
    assert supervisor.poll() is None


async def test_a_killed_process_is_restarted_and_its_run_redelivered(
    vhost: VHost, events: EventLog, supervised, tmp_path: Path,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # At full capacity a started run's acknowledgement waits (ack_grace) until a slot
    # frees: here until the run ends, not 1 s, which the run's own start can take on a
    # loaded machine (the process would then die with the run acknowledged).
    monkeypatch.setenv("MQ_WORKER_ACK_GRACE", "60")
    supervisor = supervised("--processes", "2", "--limit", "2", "--name", "sup")
    await events.wait_for(lambda _: started(events, "sup-0") and started(events, "sup-1"), 60)
    # Killed while its acknowledgement waits, the process leaves the run to be
    # redelivered; the run lasts well beyond the kill.
    body = run_body(probe(tmp_path, sleep=5))
    await publish_raw(vhost.url, body)
    await wait_until(lambda: body["id"] in started_runs(tmp_path), 30)
    holder = started_runs(tmp_path)[body["id"]]["env"]["MQ_WORKER_WORKER"]
    worker_children(supervisor)[holder].kill()

    await events.wait_for(lambda _: started(events, holder) == 2, 60)
    await events.wait_terminal([body["id"]], timeout=60)
    pending = [e for e in events.of(body["id"]) if e.type == "mq_worker.run.pending"]
    assert len(pending) == 2 and pending[1].data["redelivered"] is True
    assert [e.type for e in events.terminal(body["id"])] == ["mq_worker.run.completed"]
    assert supervisor.poll() is None
    assert sorted(worker_children(supervisor)) == ["sup-0", "sup-1"]


async def test_sigterm_stops_every_process_and_exits_0(
    vhost: VHost, events: EventLog, supervised, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    supervisor = supervised("--processes", "2", "--limit", "2", "--name", "sup")
    await events.wait_for(lambda _: started(events, "sup-0") and started(events, "sup-1"), 60)
    children = list(worker_children(supervisor).values())
    # Still running, a moment after it started, when the processes are told to stop.
    body = run_body(probe(tmp_path, sleep=1))
    await publish_raw(vhost.url, body)
    await wait_until(lambda: body["id"] in started_runs(tmp_path), 30)

    supervisor.send_signal(signal.SIGTERM)
    assert await anyio.to_thread.run_sync(lambda: supervisor.wait(60)) == 0
    await events.wait_for(lambda evs: {e.subject for e in evs
                                       if e.type == "mq_worker.worker.stopped"}
                          >= {"sup-0", "sup-1"}, 30)
    # The run was drained, not cut short, and no worker process is left behind.
    assert [e.type for e in events.terminal(body["id"])] == ["mq_worker.run.completed"]
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


async def test_a_second_signal_is_forwarded_and_stops_the_processes_at_once(
    vhost: VHost, events: EventLog, supervised, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    supervisor = supervised("--processes", "2", "--limit", "2", "--name", "sup",
                            "--drain-timeout", "1")
    await events.wait_for(lambda _: started(events, "sup-0") and started(events, "sup-1"), 60)
    body = run_body(job_variables={"command": probe(tmp_path, sleep=600, extra="--ignore-term"),
                                   "grace_seconds": 3600})
    await publish_raw(vhost.url, body)
    await wait_until(lambda: body["id"] in started_runs(tmp_path), 30)
    pid = started_runs(tmp_path)[body["id"]]["pid"]

    supervisor.send_signal(signal.SIGTERM)
    # The drain timeout passes and the run ignores its SIGTERM: without a second signal
    # its worker would wait out the hour of grace.
    await events.wait_for(lambda evs: any(e.type == "mq_worker.worker.stopped" for e in evs),
                          30)
    assert supervisor.poll() is None and psutil.pid_exists(pid)
    supervisor.send_signal(signal.SIGTERM)
    assert await anyio.to_thread.run_sync(lambda: supervisor.wait(30)) == 0
    await wait_until(lambda: not psutil.pid_exists(pid)
                     or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 15)
    terminal = await events.wait_for(lambda _: events.terminal(body["id"]), 30)
    assert [e.type for e in terminal] == ["mq_worker.run.cancelled"]
