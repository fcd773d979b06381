"""The life of a run's processes: what is executed, what is stopped, and when a worker stops."""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import psutil
import pytest

from tests.conftest import (
    EventLog,
    VHost,
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


# -- stopping the worker ----------------------------------------------------------------------


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
