"""A new user's first hour with the installed `mq-worker`: what they type, what they see."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from mq_worker.cli.common import duration_seconds
from mq_worker.settings import WorkerSettings
from mq_worker.topology import EVENTS_EXCHANGE
from tests.helpers import (
    PYTHON,
    EventLog,
    VHost,
    management,
    probe,
    queue_stats,
    running_worker,
    started_runs,
    until_ready,
    wait_until,
)

pytestmark = pytest.mark.anyio

_SCRIPT = Path(PYTHON).parent / "mq-worker"
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [PYTHON, "-m", "mq_worker"]
NOISE = ("Traceback", "never retrieved", "Future exception", "aiormq")


def _environment(env: dict[str, str] | None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if not (k.startswith("MQ_WORKER_") and not k.startswith("MQ_WORKER_TEST_"))}
    base.pop("NO_COLOR", None)
    return {**base, **(env or {})}


async def mq_worker(*args: str, env: dict[str, str] | None = None,
                    timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed `mq-worker ARGS` to completion, off the test's event loop."""
    return await anyio.to_thread.run_sync(
        lambda: subprocess.run([*CLI, *args], capture_output=True, text=True,
                               timeout=timeout, env=_environment(env)))


def work_queues(vhost: VHost) -> list[str]:
    """mq_worker's queues that exist in `vhost` now (the management API lists them at once)."""
    return [name for name in queue_stats(vhost) if name.startswith("mq_worker.")]


# -- submit's command line ------------------------------------------------------------


async def test_a_mistyped_submit_option_is_a_usage_error_that_publishes_nothing(
    vhost: VHost, events: EventLog
) -> None:
    for typo in (["--wiat"], ["--pol", "etl"], ["-x"]):
        result = await mq_worker("submit", "--url", vhost.url, *typo, "--", "echo", "hi")
        assert result.returncode == 2, (typo, result.stdout, result.stderr)
        assert "No such option" in result.stderr and typo[0] in result.stderr
        assert result.stdout == ""
    assert work_queues(vhost) == []
    assert events.events == []


async def test_options_after_the_command_belong_to_the_command(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    async with running_worker(vhost.url):
        result = await mq_worker("submit", "--url", vhost.url, "--wait", "--",
                                 "sh", "-c", "test \"$1\" = --wait", "sh", "--wait")
        assert result.returncode == 0, result.stderr


# -- noise, hints and bounded waits ------------------------------------------------------


async def test_client_commands_exit_without_traceback_noise(vhost: VHost) -> None:
    status = await mq_worker("status", "--url", vhost.url, "--listen", "0.5")
    assert status.returncode == 1 and "no workers answered" in status.stderr
    timed_out = await mq_worker("submit", "--url", vhost.url, "--wait", "--timeout", "1",
                                "--", "true")
    assert timed_out.returncode == 124
    for result in (status, timed_out):
        assert not any(word in result.stderr for word in NOISE), result.stderr


async def test_submit_says_when_no_worker_serves_the_pool_and_keeps_waiting(
    vhost: VHost
) -> None:
    result = await mq_worker("submit", "--url", vhost.url, "--pool", "nosuch", "--",
                             "echo", "hi")
    assert result.returncode == 0, result.stderr
    assert uuid.UUID(result.stdout.strip())
    assert "no worker" in result.stderr and "'nosuch'" in result.stderr

    waiting = await mq_worker("submit", "--url", vhost.url, "--pool", "nosuch", "--wait",
                              "--timeout", "2", "--", "echo", "hi")
    assert waiting.returncode == 124
    assert "no worker" in waiting.stderr and "'nosuch'" in waiting.stderr
    await until_ready(vhost.url, {"mq_worker.nosuch.default": 2})

    async with running_worker(vhost.url):
        served = await mq_worker("submit", "--url", vhost.url, "--", "echo", "hi")
        assert served.returncode == 0 and "no worker" not in served.stderr


async def test_cancel_wait_returns_when_no_worker_holds_the_run(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    async with running_worker(vhost.url, heartbeat_seconds=30.0):
        ended = await mq_worker("submit", "--url", vhost.url, "--wait", "--", "true")
        assert ended.returncode == 0, ended.stderr
        for run_id in (ended.stdout.strip(), str(uuid.uuid4())):
            began = time.monotonic()
            result = await mq_worker("cancel", run_id, "--url", vhost.url, "--wait",
                                     "--listen", "2", timeout=60)
            assert result.returncode == 3, result.stderr
            assert "no worker of pool 'default' reports run" in result.stderr
            assert time.monotonic() - began < 30

        held = await mq_worker("submit", "--url", vhost.url, "--",
                               *probe(tmp_path, sleep=300).split())
        run_id = held.stdout.strip()
        await events.wait_for(lambda evs: "run.submitted" in events.types(run_id), timeout=30)
        cancelled = await mq_worker("cancel", run_id, "--url", vhost.url, "--wait",
                                    "--listen", "2")
        assert cancelled.returncode == 0, cancelled.stderr
        assert "run.cancelled" in cancelled.stdout


# -- the environment ----------------------------------------------------------------------


async def test_client_commands_read_pool_and_queue_and_ignore_worker_settings(
    vhost: VHost, events: EventLog
) -> None:
    async with running_worker(vhost.url, pool="envpool", queue=["q2"]):
        env = {"MQ_WORKER_URL": vhost.url, "MQ_WORKER_POOL": "envpool",
               "MQ_WORKER_QUEUE": "q2,q1", "MQ_WORKER_LIMIT": "abc",
               "MQ_WORKER_DRAIN_TIMEOUT": "soon"}
        result = await mq_worker("submit", "--wait", "--", "true", env=env)
        assert result.returncode == 0, result.stderr
        assert "run.completed" in result.stderr
        status = await mq_worker("status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        assert {w["pool"] for w in json.loads(status.stdout)["workers"]} == {"envpool"}


async def test_unknown_environment_variables_are_warned_about(vhost: VHost) -> None:
    result = await mq_worker("submit", "--url", vhost.url, "--pool", "p", "--", "true",
                             env={"MQ_WORKER_LIMT": "3"})
    assert result.returncode == 0, result.stderr
    assert "MQ_WORKER_LIMT" in result.stderr and "MQ_WORKER_LIMIT" in result.stderr
    quiet = await mq_worker("submit", "--url", vhost.url, "--pool", "p", "--", "true",
                            env={"MQ_WORKER_RUN_ID": "x"})
    assert "MQ_WORKER_RUN_ID" not in quiet.stderr and "environment" not in quiet.stderr


# -- colour and event names -----------------------------------------------------------------


def _on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run `args` with stdout and stderr on a pseudo-terminal; (exit code, output)."""
    import pty

    leader, follower = pty.openpty()
    with subprocess.Popen(args, stdout=follower, stderr=follower, env=env) as process:
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        code = process.wait(timeout=60)
    os.close(leader)
    return code, b"".join(chunks).decode(errors="replace")


async def test_no_color_is_honoured_on_a_terminal(vhost: VHost) -> None:
    async with running_worker(vhost.url):
        args = [*CLI, "submit", "--url", vhost.url, "--wait", "--", "true"]
        code, colored = await anyio.to_thread.run_sync(_on_a_terminal, args, _environment({}))
        assert code == 0 and "\x1b[" in colored
        code, plain = await anyio.to_thread.run_sync(
            _on_a_terminal, args, _environment({"NO_COLOR": "1"}))
        assert code == 0 and "run.completed" in plain and "\x1b[" not in plain
        code, forced_off = await anyio.to_thread.run_sync(
            _on_a_terminal, [*args[:2], "--no-color", *args[2:]], _environment({}))
        assert code == 0 and "\x1b[" not in forced_off


def events_bindings(vhost: VHost) -> list[str]:
    """The routing keys bound to the events exchange now (the management API reads its
    bindings at once, not from statistics)."""
    quoted = urllib.parse.quote(vhost.name, safe="")
    return [b["routing_key"] for b in
            management("GET", f"/exchanges/{quoted}/{EVENTS_EXCHANGE}/bindings/source")]


async def test_events_accepts_short_event_types_and_hides_status_pings(vhost: VHost) -> None:
    async with running_worker(vhost.url), await anyio.open_process(
        [*CLI, "events", "--url", vhost.url, "--json", "--type", "run.completed",
         "--type", "worker.*"], env=_environment({})
    ) as tail:
        # Subscribed once its queue has the binding of its last --type (the worker alone
        # has four consumers already): what is published from now on reaches it.
        await wait_until(lambda: "mq_worker.worker.*" in events_bindings(vhost), timeout=30)
        status = await mq_worker("status", "--url", vhost.url)
        assert status.returncode == 0, status.stderr
        submitted = await mq_worker("submit", "--url", vhost.url, "--wait", "--", "true")
        run_id = submitted.stdout.strip()
        assert tail.stdout is not None
        seen: list[dict[str, str]] = []
        with anyio.fail_after(30):
            async for chunk in tail.stdout:
                seen += [json.loads(line) for line in chunk.decode().splitlines()]
                if any(e["subject"] == run_id for e in seen):
                    break
        tail.terminate()
    types = [e["type"] for e in seen]
    assert "mq_worker.run.completed" in types and "mq_worker.worker.heartbeat" in types
    assert "mq_worker.worker.ping" not in types
    unknown = await mq_worker("events", "--url", vhost.url, "--type", "run.finished")
    assert unknown.returncode == 2 and "'--type'" in unknown.stderr


async def test_status_returns_once_the_workers_have_answered(vhost: VHost) -> None:
    async with running_worker(vhost.url):
        began = time.monotonic()
        result = await mq_worker("status", "--url", vhost.url, "--listen", "20")
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - began < 15, "status waited for its whole --listen"


# -- help, durations, messages -------------------------------------------------------------


async def test_start_help_lists_every_setting_with_its_default_and_variable() -> None:
    result = await mq_worker("start", "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for name, field in WorkerSettings.model_fields.items():
        assert field.description, f"setting {name} has no description"
        flag = "--" + name.replace("_", "-")
        assert f"{flag} " in text, flag
        assert f"env: MQ_WORKER_{name.upper()}]" in text, name
        after = text[text.index(f"{flag} "):]
        assert "[default: " in after[:400], flag


async def test_submit_help_explains_pool_queue_and_exit_codes() -> None:
    result = await mq_worker("submit", "--help", env={"COLUMNS": "200"})
    text = " ".join(result.stdout.split())
    assert "--pool TEXT Work pool" in text and "--queue TEXT Work queue" in text
    for code in ("124", "130"):
        assert code in text


async def test_durations_are_strict_and_errors_name_the_option(vhost: VHost) -> None:
    for bad in ("30s30s", "5m1h", "1x", "-5s", "1.5.2s", "s"):
        with pytest.raises(ValueError, match="not a duration"):
            duration_seconds(bad)
    assert duration_seconds("1h30m") == 5400 and duration_seconds(" 90 ") == 90
    assert duration_seconds("2d1.5s") == 172801.5
    for bad in ("30s30s", ""):
        result = await mq_worker("submit", "--url", vhost.url, "--in", bad, "--", "true")
        assert result.returncode == 2, (bad, result.stderr)
        assert "'--in'" in result.stderr and "not a duration" in result.stderr
    assert work_queues(vhost) == []
    at = await mq_worker("submit", "--url", vhost.url, "--at", "tomorrow", "--", "true")
    assert at.returncode == 2 and "'--at'" in at.stderr
    ok = await mq_worker("submit", "--url", vhost.url, "--in", "1h30m", "--", "true")
    assert ok.returncode == 0, ok.stderr


async def test_validation_messages_are_clean_and_exit_codes_agree(vhost: VHost) -> None:
    named = await mq_worker("start", "--url", vhost.url, "--name", "bad name!")
    assert named.returncode == 2 and "invalid name" in named.stderr
    assert "Value error" not in named.stderr
    for command in (["submit", "--url", vhost.url, "--pool", "bad.pool", "--", "true"],
                    ["status", "--url", vhost.url, "--pool", "bad.pool"],
                    ["cancel", str(uuid.uuid4()), "--url", vhost.url, "--pool", "bad.pool"]):
        result = await mq_worker(*command)
        assert result.returncode == 2, (command, result.stderr)
        assert "invalid pool name 'bad.pool'" in result.stderr


async def test_a_connection_error_is_told_once() -> None:
    result = await mq_worker("submit", "--url", "amqp://u:secret@127.0.0.1:1/", "--", "true")
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot connect" in lines[0], result.stderr
    assert "secret" not in result.stderr


# -- the worker's log and systemd ------------------------------------------------------------


async def test_run_output_is_a_field_of_a_run_output_record(
    vhost: VHost, events: EventLog, worker_processes: Any
) -> None:
    worker = worker_processes(vhost.url)
    result = await mq_worker("submit", "--url", vhost.url, "--wait", "--",
                             "sh", "-c", "echo hello; echo oops >&2")
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    lines = await wait_until(lambda: [
        line for line in worker.log_lines()
        if line.get("run_id") == run_id and line.get("event") == "run output"], timeout=30)
    assert {(line["line"], line["stream"]) for line in lines} == {
        ("hello", "stdout"), ("oops", "stderr")}
    assert not any(line.get("event") in ("hello", "oops") for line in worker.log_lines())
    own = [line for line in worker.log_lines() if line.get("level")]
    assert own and all(str(line.get("logger", "")).startswith("mq_worker") for line in own)


async def test_start_tells_systemd_when_it_is_ready_and_stopping(
    vhost: VHost, worker_processes: Any, tmp_path: Path
) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(address)
        notify.settimeout(30)
        worker = worker_processes(vhost.url, env={"NOTIFY_SOCKET": address})
        ready = await anyio.to_thread.run_sync(notify.recv, 4096)
        assert b"READY=1" in ready.split(b"\n")
        assert vhost.consumers(), "READY=1 came before the worker consumed"
        worker.signal(signal.SIGTERM)
        stopping = await anyio.to_thread.run_sync(notify.recv, 4096)
        assert b"STOPPING=1" in stopping.split(b"\n")
        assert await anyio.to_thread.run_sync(worker.wait) == 0


# -- the Python API ---------------------------------------------------------------------------


async def test_new_run_accepts_an_argv_list_end_to_end(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    from mq_worker.publisher import Publisher, new_run

    # Completes only if each argument arrives as given, spaces and quotes included.
    argv = ["sh", "-c", 'test "$1" = "two words" && test "$2" = "it\'s"', "sh", "two words",
            "it's"]
    run = new_run(argv, name="argv")
    async with running_worker(vhost.url), Publisher(vhost.url) as publisher:
        await publisher.submit(run)
        await events.wait_terminal([run.id], timeout=30)
    assert events.types(run.id) == ["run.pending", "run.submitted", "run.completed"]
    with pytest.raises(TypeError, match="command"):
        new_run(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="command"):
        new_run([])


def test_every_option_the_docs_mention_exists() -> None:
    """protocol.md once told users to pass an option `start` did not have."""
    import re

    import click

    from mq_worker.cli import main

    known = {"--help", "--version"}

    def collect(command: click.Command) -> None:
        for param in command.params:
            if isinstance(param, click.Option):
                known.update(param.opts + param.secondary_opts)
        for sub in getattr(command, "commands", {}).values():
            collect(sub)

    collect(main)
    root = Path(__file__).resolve().parent.parent
    mentioned = {(path.name, flag) for path in [root / "README.md", *root.glob("docs/*.md")]
                 for flag in re.findall(r"`(--[a-z][a-z-]*)", path.read_text())}
    assert len(mentioned) > 10
    assert {(name, flag) for name, flag in mentioned if flag not in known} == set()


# Runs `argv` with SIGINT at its default, as at a terminal: a test run started in the
# background without job control inherits SIGINT ignored, and so would the follower.
_INTERRUPTIBLE = [PYTHON, "-c", "import os, signal, sys; "
                  "signal.signal(signal.SIGINT, signal.SIG_DFL); "
                  "os.execv(sys.argv[1], sys.argv[1:])"]


async def test_interrupting_a_follower_exits_quietly(vhost: VHost) -> None:
    for command in (["events", "--url", vhost.url], ["status", "--url", vhost.url, "--watch"]):
        argv = [*_INTERRUPTIBLE, *CLI, *command]
        async with await anyio.open_process(argv, env=_environment({})) as follower:
            await wait_until(lambda: vhost.consumers(), timeout=30)
            follower.send_signal(signal.SIGINT)
            assert follower.stderr is not None
            with anyio.fail_after(30):
                stderr = b"".join([chunk async for chunk in follower.stderr]).decode()
                code = await follower.wait()
        assert code == 0, stderr
        assert not any(word in stderr for word in NOISE), stderr
        await wait_until(lambda: not vhost.consumers(), timeout=30)


def _worker_log_on_a_terminal(url: str, env: dict[str, str]) -> str:
    """The console log of `mq-worker start` on a pseudo-terminal, until it is connected."""
    import pty

    leader, follower = pty.openpty()
    with subprocess.Popen([*CLI, "start", "--url", url, "--log-format", "console"],
                          stdout=follower, stderr=follower, env=env) as worker:
        os.close(follower)
        seen = b""
        deadline = time.monotonic() + 60
        while b"connected" not in seen and time.monotonic() < deadline:
            seen += os.read(leader, 65536)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    os.close(leader)
    return seen.decode(errors="replace")


async def test_the_console_log_honours_no_color(vhost: VHost) -> None:
    colored = await anyio.to_thread.run_sync(_worker_log_on_a_terminal, vhost.url,
                                             _environment({}))
    assert "connected" in colored and "\x1b[" in colored
    plain = await anyio.to_thread.run_sync(_worker_log_on_a_terminal, vhost.url,
                                           _environment({"NO_COLOR": "1"}))
    assert "connected" in plain and "\x1b[" not in plain


async def test_an_unreachable_broker_is_logged_once_per_attempt(worker_processes: Any) -> None:
    worker = worker_processes("amqp://u:secret@127.0.0.1:1/")
    await wait_until(lambda: len([line for line in worker.log_lines()
                                  if line.get("event") == "broker unreachable; retrying"]) >= 2,
                     timeout=30)
    lines = worker.log_lines()
    assert not [line for line in lines if "creating transport" in str(line.get("event"))]
    assert "secret" not in json.dumps(lines)


async def test_a_runs_traceparent_reaches_its_events_and_its_process(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    """W3C Trace Context: an orchestrator's span id follows the run across systems."""
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with running_worker(vhost.url):
        result = await mq_worker("submit", "--url", vhost.url, "--traceparent", traceparent,
                                 "--wait", "--", *probe(tmp_path).split())
        assert result.returncode == 0, result.stderr
        run_id = result.stdout.strip()
        inherited = await mq_worker("submit", "--url", vhost.url, "--wait", "--", "true",
                                    env={"TRACEPARENT": traceparent})
        assert inherited.returncode == 0, inherited.stderr
        bad = await mq_worker("submit", "--url", vhost.url, "--traceparent", "nope", "--",
                              "true")
        assert bad.returncode == 2 and "traceparent" in bad.stderr
    for run in (run_id, inherited.stdout.strip()):
        raw = [json.loads(m.body) for m in events.raw if json.loads(m.body).get("subject") == run]
        assert [e["type"] for e in raw][-1] == "mq_worker.run.completed"
        assert {e.get("traceparent") for e in raw} == {traceparent}
    assert started_runs(tmp_path)[run_id]["env"]["TRACEPARENT"] == traceparent
