"""The mq-worker command line, run as users run it."""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from pathlib import Path

import anyio
import pytest

from tests.helpers import PYTHON, EventLog, VHost, probe, run_body, started_runs, wait_until

pytestmark = pytest.mark.anyio


async def mq_worker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `mq-worker ARGS` to completion without blocking the test's event loop."""
    return await anyio.to_thread.run_sync(
        lambda: subprocess.run([PYTHON, "-m", "mq_worker", *args], capture_output=True,
                               text=True, timeout=timeout))


async def test_start_from_environment_then_submit_wait_and_sigterm(
    vhost: VHost, events: EventLog, worker_processes, tmp_path: Path
) -> None:
    worker = worker_processes(vhost.url, env={"MQ_WORKER_POOL": "envpool",
                                              "MQ_WORKER_QUEUE": "q1,q2",
                                              "MQ_WORKER_LIMIT": "3"})
    started = await events.wait_for(
        lambda evs: [e for e in evs if e.type == "mq_worker.worker.started"], timeout=60)
    assert started[0].data["pool"] == "envpool"
    assert started[0].data["queues"] == ["q1", "q2"] and started[0].data["limit"] == 3

    ok = await mq_worker("submit", "--url", vhost.url, "--pool", "envpool", "--queue", "q2",
                         "--wait", "--", "echo", "hello from submit")
    assert ok.returncode == 0, ok.stderr
    run_id = ok.stdout.strip()
    assert uuid.UUID(run_id)
    assert "run.completed" in ok.stderr
    assert any(line.get("event") == "run output" and line.get("line") == "hello from submit"
               and line.get("run_id") == run_id
               for line in worker.log_lines())

    failing = await mq_worker("submit", "--url", vhost.url, "--pool", "envpool", "--queue", "q1",
                              "--wait", "--", "sh", "-c", "exit 7")
    assert failing.returncode == 7
    assert "run.crashed" in failing.stderr

    worker.signal(signal.SIGTERM)
    assert await anyio.to_thread.run_sync(worker.wait) == 0
    await events.wait_for(lambda evs: any(e.type == "mq_worker.worker.stopped" for e in evs))


async def test_submit_without_a_worker_waits_in_the_queue(
    vhost: VHost, events: EventLog, worker_processes, tmp_path: Path
) -> None:
    result = await mq_worker("submit", "--url", vhost.url, "--name", "early", "--env", "A=1",
                             "--", *probe(tmp_path).split())
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    worker_processes(vhost.url)
    await events.wait_terminal([run_id], timeout=30)
    assert events.types(run_id) == ["run.pending", "run.submitted", "run.completed"]
    assert started_runs(tmp_path)[run_id]["env"]["A"] == "1"


async def test_cancel_command_waits_for_the_cancelled_event(
    vhost: VHost, events: EventLog, worker_processes, tmp_path: Path
) -> None:
    worker_processes(vhost.url)
    body = run_body(probe(tmp_path, sleep=300))
    submitted = await mq_worker("submit", "--url", vhost.url, "--id", body["id"], "--",
                                *probe(tmp_path, sleep=300).split())
    assert submitted.returncode == 0, submitted.stderr
    await wait_until(lambda: body["id"] in started_runs(tmp_path), timeout=30)
    result = await mq_worker("cancel", body["id"], "--url", vhost.url, "--reason", "from cli",
                             "--wait", "--timeout", "30")
    assert result.returncode == 0, result.stderr
    assert "run.cancelled" in result.stdout and "from cli" in result.stdout


async def test_events_command_prints_json_lines(
    vhost: VHost, worker_processes, tmp_path: Path
) -> None:
    async with await anyio.open_process(
        [PYTHON, "-m", "mq_worker", "events", "--url", vhost.url, "--json"]
    ) as tail:
        # Subscribed once its queue has a consumer; only then start the worker.
        await wait_until(lambda: vhost.consumers(), timeout=30)
        worker_processes(vhost.url)
        assert tail.stdout is not None
        with anyio.fail_after(30):
            line = (await tail.stdout.receive()).decode().splitlines()[0]
        tail.terminate()
    event = json.loads(line)
    assert event["type"] == "mq_worker.worker.started"
    assert event["specversion"] == "1.0"


async def test_bad_options_fail_clearly(vhost: VHost) -> None:
    result = await mq_worker("start", "--url", vhost.url, "--pool", "bad.pool")
    assert result.returncode == 2
    assert "invalid pool name 'bad.pool'" in result.stderr
    result = await mq_worker("start", "--url", "http://nope", "--limit", "1")
    assert result.returncode == 2 and "not an AMQP URL" in result.stderr
    result = await mq_worker("submit", "--url", vhost.url, "--in", "soon", "--", "true")
    assert result.returncode == 2 and "not a duration" in result.stderr


async def test_unreachable_broker_password_is_never_printed() -> None:
    result = await mq_worker("submit", "--url", "amqp://user:s3cret@127.0.0.1:1/", "--", "true",
                             timeout=60)
    assert result.returncode == 1
    assert "s3cret" not in result.stderr + result.stdout
    assert "cannot connect" in result.stderr and "****" in result.stderr

