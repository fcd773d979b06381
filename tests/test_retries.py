"""Run policies on a real broker: timeouts, retries parked in the delay ladder, cancels
during the wait, a worker lost during the wait."""

from __future__ import annotations

import json
import secrets
import shlex
import signal
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any
from uuid import UUID

import psutil
import pytest

from mq_worker.events import Event
from mq_worker.signing import Signer
from mq_worker.topology import DELAY_LEVELS, delay_name
from mq_worker.workers.runs import Stopping
from tests.helpers import (
    PYTHON,
    EventLog,
    VHost,
    publish_raw,
    ready_counts,
    run_body,
    running_worker,
    until_no_run_left,
    wait_until,
)

pytestmark = pytest.mark.anyio

ATTEMPTS = str(Path(__file__).parent / "helpers" / "attempts.py")


def attempts_command(directory: Path, *, exit_code: int = 3, succeed_on: int = 0,
                     sleep: float = 0.0) -> str:
    return shlex.join([PYTHON, ATTEMPTS, str(directory), "--exit", str(exit_code),
                       "--succeed-on", str(succeed_on), "--sleep", str(sleep)])


def attempts(directory: Path, run_id: str) -> list[dict[str, Any]]:
    path = directory / f"{run_id}.attempts"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def of_type(events: list[Event], kind: str) -> list[Event]:
    return [e for e in events if e.type == f"mq_worker.{kind}"]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


RUN_QUEUES = ["mq_worker.default.default", *(delay_name(level) for level in range(DELAY_LEVELS))]


async def _none_given_back(url: str) -> None:
    """Once the worker has stopped: a message it had not acknowledged would be back."""
    assert sum((await ready_counts(url, RUN_QUEUES, missing_ok=True)).values()) == 0


def _described(terminal: list[Event], types: list[str]) -> str:
    """A run's terminal events with what says why it ended, and all its event types, as
    text (a message that is not text is cut short by pytest)."""
    fields = ("reason", "attempt", "status_code", "message")
    return json.dumps({"terminal": [{"type": e.type, **{f: e.data.get(f) for f in fields}}
                                    for e in terminal], "types": types})


async def test_a_timeout_stops_the_whole_process_tree_and_reports_it(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    pids_file = tmp_path / "pids"
    command = f"sh -c 'sleep 300 & echo $! > {pids_file}; echo $$ >> {pids_file}; sleep 300; wait'"
    body = run_body(job_variables={"command": command, "timeout_seconds": 1.5,
                                   "grace_seconds": 2})
    async with running_worker(vhost.url) as worker:
        await publish_raw(vhost.url, body)
        pids = await wait_until(
            lambda: pids_file.exists() and len(pids_file.read_text().split()) == 2
            and [int(p) for p in pids_file.read_text().split()])
        await events.wait_terminal([body["id"]], timeout=20)
        await wait_until(lambda: not any(_alive(p) for p in pids), timeout=5)
        timeouts = worker.metrics.timeouts.labels("default", "default")._value.get()

    assert events.types(body["id"]) == ["run.pending", "run.submitted", "run.crashed"]
    submitted, crashed = events.of(body["id"])[1:]
    assert crashed.data["reason"] == "timeout"
    assert crashed.data["status_code"] == -15  # SIGTERM reached the shell
    assert "timeout of 1.5 s" in crashed.data["message"]
    assert crashed.data["attempt"] == 1
    assert (crashed.time - submitted.time).total_seconds() >= 1.5
    assert timeouts == 1


async def test_exit_3_with_two_retries_runs_three_attempts_spaced_by_the_delay(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    body = run_body(job_variables={"command": attempts_command(tmp_path, exit_code=3),
                                   "retries": 2, "retry_delay_seconds": 2})
    async with running_worker(vhost.url) as worker:
        await publish_raw(vhost.url, body)
        await events.wait_terminal([body["id"]], timeout=30)
        retries = worker.metrics.retries.labels("default", "default")._value.get()

    run_events = events.of(body["id"])
    assert events.types(body["id"]) == [
        "run.pending", "run.submitted", "run.retrying",
        "run.pending", "run.submitted", "run.retrying",
        "run.pending", "run.submitted", "run.crashed",
    ]
    assert [e.data["attempt"] for e in run_events] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    crashed = events.terminal(body["id"])
    assert len(crashed) == 1 and crashed[0].data["status_code"] == 3
    assert crashed[0].data["reason"] == "exit-code"
    for retrying in of_type(run_events, "run.retrying"):
        assert retrying.data["status_code"] == 3
        assert retrying.data["reason"] == "exit-code"
        assert retrying.data["delay_seconds"] == 2
        assert retrying.data["next_attempt"] == retrying.data["attempt"] + 1

    ran = attempts(tmp_path, body["id"])
    assert [a["attempt"] for a in ran] == [1, 2, 3]
    assert all(later["t"] - earlier["t"] >= 2.0 for earlier, later in pairwise(ran))
    # Each attempt starts at, never before, the start time its retrying event announced.
    for retrying, next_run in zip(of_type(run_events, "run.retrying"), ran[1:], strict=True):
        announced = datetime.fromisoformat(retrying.data["next_start_time"]).timestamp()
        assert next_run["t"] >= announced
    assert retries == 2


async def test_a_retry_that_succeeds_ends_completed(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    body = run_body(job_variables={"command": attempts_command(tmp_path, succeed_on=2),
                                   "retries": 5, "retry_delay_seconds": [0.5, 30]})
    async with running_worker(vhost.url):
        await publish_raw(vhost.url, body)
        await events.wait_terminal([body["id"]], timeout=30)

    assert events.types(body["id"]) == [
        "run.pending", "run.submitted", "run.retrying",
        "run.pending", "run.submitted", "run.completed",
    ]
    completed = events.terminal(body["id"])[0]
    assert completed.data["attempt"] == 2 and completed.data["status_code"] == 0
    assert [a["attempt"] for a in attempts(tmp_path, body["id"])] == [1, 2]


async def test_a_failed_start_is_retried_and_a_timeout_only_when_asked(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    missing = run_body(job_variables={"command": str(tmp_path / "no-such-program"),
                                      "retries": 1})
    timeout_default = run_body(job_variables={
        "command": attempts_command(tmp_path, sleep=60), "timeout_seconds": 0.5,
        "grace_seconds": 1, "retries": 1})
    timeout_retried = run_body(job_variables={
        "command": attempts_command(tmp_path, sleep=60), "timeout_seconds": 0.5,
        "grace_seconds": 1, "retries": 1, "retry_on": ["timeout"]})
    ids = [missing["id"], timeout_default["id"], timeout_retried["id"]]
    async with running_worker(vhost.url):
        for body in (missing, timeout_default, timeout_retried):
            await publish_raw(vhost.url, body)
        await events.wait_terminal(ids, timeout=30)

    assert events.types(missing["id"]) == [
        "run.pending", "run.retrying", "run.pending", "run.crashed"]
    retrying = of_type(events.of(missing["id"]), "run.retrying")[0]
    assert retrying.data["reason"] == "submission-failed"
    assert retrying.data["status_code"] is None
    assert "could not be started" in retrying.data["message"]
    crashed = events.terminal(missing["id"])[0]
    assert crashed.data["reason"] == "submission-failed" and crashed.data["attempt"] == 2

    assert events.types(timeout_default["id"]) == [
        "run.pending", "run.submitted", "run.crashed"]
    assert events.terminal(timeout_default["id"])[0].data["reason"] == "timeout"

    assert events.types(timeout_retried["id"]) == [
        "run.pending", "run.submitted", "run.retrying", "run.pending", "run.submitted",
        "run.crashed"]
    assert of_type(events.of(timeout_retried["id"]), "run.retrying")[0].data["reason"] == "timeout"
    crashed = events.terminal(timeout_retried["id"])[0]
    assert crashed.data["reason"] == "timeout" and crashed.data["attempt"] == 2


async def test_a_cancel_during_the_retry_wait_ends_the_run_at_once_with_no_further_attempt(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    body = run_body(job_variables={"command": attempts_command(tmp_path),
                                   "retries": 3, "retry_delay_seconds": 6})
    # Parked, not held: due later than the worker's window (it comes back 1-2 s early).
    async with running_worker(vhost.url, prefetch_seconds=2) as worker:
        await publish_raw(vhost.url, body)
        await events.wait_for(lambda _: "run.retrying" in events.types(body["id"]))
        assert worker.in_flight == []  # the wait is in the broker, not in the worker
        await publish_raw(vhost.url, {"id": body["id"], "reason": "stop retrying"},
                          routing_key="run.cancel.default")
        await events.wait_terminal([body["id"]], timeout=30)
        # The parked attempt comes back and is dropped: nothing is left anywhere.
        await until_no_run_left(vhost.url, RUN_QUEUES, worker)
    await _none_given_back(vhost.url)
    await events.wait_for(lambda evs: any(e.type == "mq_worker.worker.stopped" for e in evs))

    assert events.types(body["id"]) == [
        "run.pending", "run.submitted", "run.retrying", "run.cancelled"]
    retrying, cancelled = events.of(body["id"])[2:]
    assert cancelled.data["reason"] == "stop retrying"
    assert cancelled.data["attempt"] == 2 and cancelled.data["follows"] == retrying.id
    next_start = datetime.fromisoformat(retrying.data["next_start_time"])
    assert (next_start - cancelled.time).total_seconds() > 3  # at once, not when it is due
    assert [a["attempt"] for a in attempts(tmp_path, body["id"])] == [1]


async def test_a_cancel_shortly_before_the_next_attempt_comes_back_is_reported_by_its_taker(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    """Within the margin the parking worker leaves the cancel to the worker that takes the
    attempt: still exactly one cancelled event, and no attempt."""
    body = run_body(job_variables={"command": attempts_command(tmp_path),
                                   "retries": 3, "retry_delay_seconds": 4})
    async with running_worker(vhost.url) as worker:
        await publish_raw(vhost.url, body)
        await events.wait_for(lambda _: "run.retrying" in events.types(body["id"]))
        await publish_raw(vhost.url, {"id": body["id"], "reason": "late"},
                          routing_key="run.cancel.default")
        await events.wait_terminal([body["id"]], timeout=30)
        await until_no_run_left(vhost.url, RUN_QUEUES, worker)
    await _none_given_back(vhost.url)
    await events.wait_for(lambda evs: any(e.type == "mq_worker.worker.stopped" for e in evs))

    assert events.types(body["id"]) == [
        "run.pending", "run.submitted", "run.retrying", "run.cancelled"]
    retrying, cancelled = events.of(body["id"])[2:]
    assert cancelled.data["attempt"] == 2 and cancelled.data["reason"] == "late"
    # Dropped when it came back from the ladder (parked for seconds), not at once (~0 s).
    # The two times are stamped on either side of the park, so allow for that.
    assert (cancelled.time - retrying.time).total_seconds() > 1.5
    assert [a["attempt"] for a in attempts(tmp_path, body["id"])] == [1]


async def test_cancels_racing_the_next_attempt_give_one_cancelled_event_each(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    """Cancelled at every point: parked, coming back, held by a worker or running again."""
    bodies = [run_body(job_variables={"command": attempts_command(tmp_path, sleep=0.5),
                                      "retries": 20, "retry_delay_seconds": delay / 2})
              for delay in range(10)]
    ids = [b["id"] for b in bodies]
    async with running_worker(vhost.url, limit=10, prefetch_seconds=2) as worker:
        for body in bodies:
            await publish_raw(vhost.url, body)
        for body in bodies:
            await events.wait_for(lambda _, b=body: "run.retrying" in events.types(b["id"]),
                                  timeout=30)
            await publish_raw(vhost.url, {"id": body["id"]}, routing_key="run.cancel.default")
        await events.wait_terminal(ids, timeout=30)
        await until_no_run_left(vhost.url, RUN_QUEUES, worker)
    await _none_given_back(vhost.url)
    await events.wait_for(lambda evs: any(e.type == "mq_worker.worker.stopped" for e in evs))

    for run_id in ids:
        run_events = events.of(run_id)
        terminal = events.terminal(run_id)
        assert [e.type for e in terminal] == ["mq_worker.run.cancelled"], _described(
            terminal, events.types(run_id))
        cancelled = run_events[-1]
        assert cancelled.is_terminal
        started = [e.data["attempt"] for e in run_events if e.type == "mq_worker.run.submitted"]
        # Stopped while running (a status code): its attempt started. Dropped, or ended
        # during the wait: its attempt never started. Either way no attempt follows it.
        ran_last = cancelled.data.get("status_code") is not None
        last = cancelled.data["attempt"] if ran_last else cancelled.data["attempt"] - 1
        assert started == list(range(1, last + 1)), (cancelled.data, started)
        # A process stopped at once may not have recorded itself; none recorded more.
        recorded = [a["attempt"] for a in attempts(tmp_path, run_id)]
        assert recorded == started[:len(recorded)] and len(recorded) >= last - 1


async def test_a_cancel_that_comes_as_the_attempt_fails_on_its_own_ends_the_run_cancelled(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    """The attempt's process has exited 3 but the worker still watches the run (here: it
    waits for a process the run left in its group) when the cancel comes: there is nothing
    left to stop, and the cancel is not retried, so the run ends cancelled, not crashed."""
    main_pid, release = tmp_path / "main.pid", tmp_path / "release"
    leftover = f"trap '' TERM; while [ ! -e {release} ]; do sleep 0.05; done"
    command = shlex.join(["sh", "-c", f"sh -c {shlex.quote(leftover)} >/dev/null 2>&1 & "
                                      f"echo $$ > {main_pid}; exit 3"])
    body = run_body(job_variables={"command": command, "retries": 2, "grace_seconds": 60})
    run_id = UUID(body["id"])
    async with running_worker(vhost.url) as worker:
        await publish_raw(vhost.url, body)
        pid = await wait_until(lambda: main_pid.exists() and main_pid.read_text().strip()
                               and int(main_pid.read_text()))
        await wait_until(lambda: not psutil.pid_exists(pid))  # exited, and reaped by the worker
        await publish_raw(vhost.url, {"id": body["id"], "reason": "no more"},
                          routing_key="run.cancel.default")
        # The cancel reached the run, and found its process gone.
        await wait_until(lambda: (active := worker._book.active.get(run_id)) is not None
                         and active.stopping is Stopping.NOT_STOPPED)
        release.touch()
        await events.wait_terminal([body["id"]], timeout=30)
        await until_no_run_left(vhost.url, RUN_QUEUES, worker)
    await _none_given_back(vhost.url)

    assert events.types(body["id"]) == ["run.pending", "run.submitted", "run.cancelled"], (
        _described(events.terminal(body["id"]), events.types(body["id"])))
    cancelled = events.terminal(body["id"])[0]
    assert cancelled.data["reason"] == "no more" and cancelled.data["status_code"] == 3
    assert cancelled.data["attempt"] == 1


async def test_a_worker_killed_during_the_wait_loses_nothing_and_the_retry_runs_once(
    vhost: VHost, events: EventLog, tmp_path: Path, worker_processes: Any
) -> None:
    body = run_body(job_variables={"command": attempts_command(tmp_path, succeed_on=2),
                                   "retries": 2, "retry_delay_seconds": 4})
    first = worker_processes(vhost.url)
    await events.wait_for(lambda evs: any(e.type == "mq_worker.worker.started" for e in evs),
                          timeout=30)
    await publish_raw(vhost.url, body)
    await events.wait_for(lambda _: "run.retrying" in events.types(body["id"]), timeout=20)
    first.signal(signal.SIGKILL)
    first.wait()
    async with running_worker(vhost.url) as second:
        await events.wait_terminal([body["id"]], timeout=30)
        await until_no_run_left(vhost.url, RUN_QUEUES, second)
    await _none_given_back(vhost.url)

    ran = attempts(tmp_path, body["id"])
    assert [(a["attempt"], a["worker"]) for a in ran] == [(1, first.name), (2, second.name)]
    terminal = events.terminal(body["id"])
    assert len(terminal) == 1
    assert terminal[0].type == "mq_worker.run.completed"
    assert terminal[0].data["worker"] == second.name and terminal[0].data["attempt"] == 2
    assert ran[1]["t"] - ran[0]["t"] >= 4.0


async def test_with_signed_messages_the_next_attempt_and_the_reported_cancel_are_signed(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    key = "retry-key-" + secrets.token_hex(16)
    keys = tmp_path / "keys"
    keys.write_text(key + "\n")
    signer = Signer([key.encode()])
    body = run_body(job_variables={"command": attempts_command(tmp_path),
                                   "retries": 3, "retry_delay_seconds": [0.2, 30]})
    raw = json.dumps(body).encode()
    async with running_worker(vhost.url, signing_key_file=keys):
        await publish_raw(vhost.url, raw, headers=signer.headers(raw, kind="run", pool="default"))
        await events.wait_for(lambda _: events.types(body["id"]).count("run.retrying") == 2)
        cancel = json.dumps({"id": body["id"], "reason": "signed"}).encode()
        await publish_raw(vhost.url, cancel, routing_key="run.cancel.default",
                          headers=signer.headers(cancel, kind="cancel", pool="default"))
        await events.wait_terminal([body["id"]])

    assert not [e for e in events.events if e.type == "mq_worker.run.rejected"]
    assert [e.type for e in events.terminal(body["id"])] == ["mq_worker.run.cancelled"]
    assert events.terminal(body["id"])[0].data["attempt"] == 3
    assert [a["attempt"] for a in attempts(tmp_path, body["id"])] == [1, 2]
