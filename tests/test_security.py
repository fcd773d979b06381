"""Security on a real broker: secrets, TLS, size caps, no shell, signing, allow-list, permissions.

Every test runs against real RabbitMQ: the default node with a vhost of its own,
or (for TLS) a throw-away node with a mutual-TLS listener booted once per session.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import secrets
import shlex
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import anyio
import pytest
import structlog

from mq_worker import (
    EventSubscriber,
    EventType,
    Publisher,
    broker,
    logs,
    new_run,
    socket_writes,
    topology,
)
from mq_worker.broker import TlsOptions, mask_secrets, mask_url
from mq_worker.errors import BrokerError, ConfigurationError, InvalidMessage
from mq_worker.events import build_event
from mq_worker.job_configuration import BaseJobTemplate
from mq_worker.outbox import Outbox
from mq_worker.signing import SIGNATURE_HEADER, SIGNATURE_V2_HEADER, Signer
from mq_worker.topology import DEAD_QUEUE
from mq_worker.workers.process import ProcessJobConfiguration, ProcessWorker
from tests.helpers import (
    PROBE,
    PYTHON,
    EventLog,
    VHost,
    management,
    probe,
    publish_raw,
    queue_exists,
    ready_counts,
    run_body,
    running_worker,
    started_runs,
    wait_until,
)
from tests.tls_node import TlsNode, rabbitmq_tls  # noqa: F401  (a fixture)

pytestmark = pytest.mark.anyio

DOCS = Path(__file__).parent.parent / "docs" / "security.md"
RUN_VARIABLES = {"MQ_WORKER_RUN_ID", "MQ_WORKER_RUN_NAME", "MQ_WORKER_RUN_ATTEMPT",
                 "MQ_WORKER_POOL", "MQ_WORKER_QUEUE", "MQ_WORKER_WORKER"}


# -- helpers ---------------------------------------------------------------------


@contextmanager
def broker_user(vhost: VHost, *, password: str, configure: str = ".*", write: str = ".*",
                read: str = ".*") -> Iterator[str]:
    """A RabbitMQ user with these permissions in `vhost` (and nowhere else), deleted afterwards."""
    user = f"u-{uuid.uuid4().hex[:10]}"
    management("PUT", f"/users/{user}", {"password": password, "tags": ""})
    try:
        management("PUT", f"/permissions/{vhost.name}/{user}",
                   {"configure": configure, "write": write, "read": read})
        yield user
    finally:
        management("DELETE", f"/users/{user}")


async def cli(*args: str, env: dict[str, str] | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`mq-worker ARGS` to completion, without blocking the event loop."""
    return await anyio.to_thread.run_sync(lambda: subprocess.run(
        [PYTHON, "-m", "mq_worker", *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}))


async def dead_letters(url: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Everything in mq_worker.dead right now (taken out of it)."""
    messages = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(DEAD_QUEUE, passive=True)
        while (message := await dead.get(no_ack=True, fail=False)) is not None:
            messages.append(message)
    return messages


def rejected(events: EventLog, kind: str = "run") -> list[Any]:
    return [e for e in events.events
            if e.type == EventType.RUN_REJECTED and e.data["message_kind"] == kind]


def started(events: list[Any]) -> bool:
    return any(e.type == EventType.WORKER_STARTED for e in events)


def write_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return path


def key_file(path: Path, *keys: str) -> Path:
    path.write_text("".join(k + "\n" for k in keys))
    path.chmod(0o600)
    return path


# -- credentials never leak --------------------------------------------------------


@pytest.mark.parametrize(("text", "secret"), [
    ("amqp://user:s3cret@host:5672/vhost", "s3cret"),
    ("AMQPS://user:s3cret@host/", "s3cret"),
    ("amqp://user:p@ss@word@host/v", "ss@word"),  # an unescaped '@' the URL parser accepts
    ("amqp://user:p%40ss@host/v", "p%40ss"),
    ("amqp://user:a:b:c@host/", "a:b:c"),
    ("['amqp://a:one@h1','amqp://b:two@h2']", "one"),
    ("['amqp://a:one@h1','amqp://b:two@h2']", "two"),
    ("cannot connect: amqp://u:s3cret@h/: refused; amqps://u:s3cret@h2/: refused", "s3cret"),
    ("http://guest:s3cret@localhost:15672/api", "s3cret"),
])
def test_masking_hides_every_form_of_password(text: str, secret: str) -> None:
    masked = mask_secrets(text)
    assert secret not in masked
    assert "****" in masked
    assert mask_url(text) == masked


def test_log_lines_mask_passwords_in_tracebacks_nested_values_and_any_case(
    capsys: pytest.CaptureFixture[str],
) -> None:
    saved, handlers = structlog.get_config(), logging.getLogger().handlers[:]
    try:
        logs.configure("json")
        log = structlog.get_logger("mask-test")
        try:
            raise ConnectionError("cannot reach amqp://worker:tr4ceback@h/v")
        except ConnectionError:
            log.exception("failed", urls=["AMQP://worker:upp3r@h/"],
                          nested={"u": "amqps://w:n3sted@h/"})
        log.info("plain", url="amqp://worker:t0plevel@h/", kind=_Kind.URL, count=3)
        logging.getLogger("aio_pika").warning("lost amqp://worker:f0reign@h/")
    finally:
        structlog.configure(**saved)
        logging.getLogger().handlers[:] = handlers
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConnectionError" in err
    for secret in ("tr4ceback", "upp3r", "n3sted", "f0reign", "t0plevel", "3num"):
        assert secret not in err
    assert err.count("****") >= 6
    assert '"count":3' in err


class _Kind(enum.StrEnum):
    URL = "amqp://worker:3num@h/"


async def test_password_never_appears_in_worker_logs_events_or_runs(
    vhost: VHost, events: EventLog, worker_processes: Any, tmp_path: Path
) -> None:
    password = "pw-" + secrets.token_hex(12)
    with broker_user(vhost, password=password) as user:
        url = vhost.url_for(user, password)
        # The password is given both ways operators give it: flag and environment.
        worker = worker_processes(url, "--log-level", "DEBUG", env={"MQ_WORKER_URL": url})
        await events.wait_for(started, timeout=30)
        good, crashing = run_body(probe(tmp_path)), run_body("/no/such/executable")
        for body in (good, crashing):
            await publish_raw(vhost.url, body)
        await publish_raw(vhost.url, b"{not json")
        await events.wait_terminal([good["id"], crashing["id"]])
        await events.wait_for(lambda _: rejected(events))

        # A connection lost is logged, then re-established (and logged again).
        assert vhost.close_connections(worker.name) >= 1
        await wait_until(lambda: len([line for line in worker.log_lines()
                                      if line.get("event") == "connected"]) >= 2, timeout=30)
        after = run_body(probe(tmp_path))
        await publish_raw(vhost.url, after)
        await events.wait_terminal([after["id"]], timeout=30)
        worker.signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(worker.wait) == 0

    log = worker.log_path.read_text()
    lines = worker.log_lines()
    assert any(line.get("level") == "debug" for line in lines)
    assert any(line.get("event") == "connection lost; reconnecting" for line in lines)
    assert f"{user}:" in log  # who connects is shown, the password is not
    assert password not in log
    for message in events.raw:
        assert password not in message.body.decode()
        assert password not in json.dumps(message.headers, default=str)
    for message in await dead_letters(vhost.url):
        assert password not in json.dumps(message.headers, default=str)
    # Runs inherit the worker's environment without its MQ_WORKER_* settings.
    env = started_runs(tmp_path)[good["id"]]["env"]
    assert {k for k in env if k.startswith("MQ_WORKER_")} == RUN_VARIABLES
    assert password not in json.dumps(env)
    assert env["PATH"] == os.environ["PATH"]


async def test_wrong_password_errors_never_show_the_password(
    vhost: VHost, worker_processes: Any
) -> None:
    with broker_user(vhost, password="right-" + secrets.token_hex(8)) as user:
        wrong = "wrong-" + secrets.token_hex(8)
        url = vhost.url_for(user, wrong)
        commands: list[tuple[list[str], dict[str, str]]] = [
            (["submit", "--url", url, "--", "true"], {}),
            (["submit", "--", "true"], {"MQ_WORKER_URL": url}),
            (["cancel", str(uuid.uuid4()), "--url", url], {}),
            (["events", "--url", url], {}),
            (["start", "--url", url.replace("amqp://", "http://")], {}),
        ]
        results: list[subprocess.CompletedProcess[str]] = []

        async def run(args: list[str], env: dict[str, str]) -> None:
            results.append(await cli(*args, env=env))

        worker = worker_processes(url, "--log-level", "DEBUG")
        async with anyio.create_task_group() as tg:
            for args, env in commands:
                tg.start_soon(run, args, env)
        mistyped = next(r for r in results if "start" in r.args)
        assert mistyped.returncode == 2 and "not an AMQP URL" in mistyped.stderr
        assert wrong not in mistyped.stdout + mistyped.stderr
        for result in results:
            if result is mistyped:
                continue
            output = result.stdout + result.stderr
            assert result.returncode == 1, output
            assert "ACCESS_REFUSED" in output and f"{user}:****@" in output
            assert wrong not in output

        await wait_until(lambda: len([line for line in worker.log_lines()
                                      if line.get("event") == "broker unreachable; retrying"]) >= 2,
                         timeout=30)
        worker.signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(worker.wait) == 0
        log = worker.log_path.read_text()
        assert "ACCESS_REFUSED" in log and wrong not in log


# -- TLS ---------------------------------------------------------------------------------


def tls_files(node: TlsNode) -> dict[str, Path]:
    return {"tls_ca_file": node.pki.ca, "tls_cert_file": node.pki.client_cert,
            "tls_key_file": node.pki.client_key}


async def test_worker_publisher_and_subscriber_work_over_mutual_tls(
    rabbitmq_tls: TlsNode, tmp_path: Path  # noqa: F811
) -> None:
    node, pool = rabbitmq_tls, f"tls-{uuid.uuid4().hex[:8]}"
    tls = TlsOptions(node.pki.ca, node.pki.client_cert, node.pki.client_key)
    url = node.amqps_url()
    async with EventSubscriber(url, tls=tls) as subscription, \
            Publisher(url, tls=tls) as publisher, \
            running_worker(url, pool=pool, name=f"tls-worker-{pool}", **tls_files(node)) as w:
        # It read the cancel stream over TLS on a connection of its own, to the end.
        assert w._cancels.fast_replays_stopped == 0
        run = await publisher.submit(new_run(probe(tmp_path), name="over-tls"), pool=pool)
        outcome = await subscription.wait_for(run.id, timeout=30)
        connections = json.loads(node.ctl("list_connections", "--formatter", "json", "name",
                                          "ssl", "peer_cert_subject", "client_properties"))
    assert outcome.type == EventType.RUN_COMPLETED
    assert str(run.id) in started_runs(tmp_path)
    ours = [c for c in connections if any(p[0] == "connection_name" for p in c[
        "client_properties"])]
    names = {dict((p[0], p[2]) for p in c["client_properties"])["connection_name"]: c
             for c in ours}
    worker = names[f"mq_worker tls-worker-{pool}"]
    assert worker["ssl"] is True and "CN=client" in worker["peer_cert_subject"]
    assert len(ours) >= 3 and all(c["ssl"] is True for c in ours)



async def test_events_sent_at_once_are_written_to_the_tls_socket_in_order(
    rabbitmq_tls: TlsNode  # noqa: F811
) -> None:
    """`Outbox.send_now` writes to a TLS connection's stream itself, as to a plain one:
    nothing left in aiormq's write queue, every event confirmed and routed in order."""
    node, seen = rabbitmq_tls, f"seen-{uuid.uuid4().hex[:8]}"
    tls = TlsOptions(node.pki.ca, node.pki.client_cert, node.pki.client_key)
    connection, _ = await broker.connect([node.amqps_url()], name="test", tls=tls)
    try:
        channel = await (await connection.channel()).get_underlay_channel()
        writer = socket_writes.writer_of(channel)
        assert writer is not None and writer.get_extra_info("sslcontext") is not None
        await topology.declare_exchanges(channel)
        await channel.queue_declare(seen, exclusive=True)
        await channel.queue_bind(seen, topology.EVENTS_EXCHANGE, routing_key="mq_worker.run.#")
        outbox = Outbox()
        async with anyio.create_task_group() as tg:
            tg.start_soon(outbox.publish_forever, channel)
            for run in range(5):
                await anyio.wait_all_tasks_blocked()
                for event_type in (EventType.RUN_PENDING, EventType.RUN_SUBMITTED):
                    outbox.put(build_event(event_type, source="/test", subject=str(run), data={}))
                assert outbox.send_now()
                assert channel.write_queue.empty()
                with anyio.fail_after(10):
                    await outbox.wait_empty()
            tg.cancel_scope.cancel()
        assert outbox.published == 10
        routed: list[str] = []
        while len(routed) < 10:
            message = await channel.basic_get(seen, no_ack=True)
            if message.body:
                routed.append(json.loads(message.body)["type"])
        assert routed == [EventType.RUN_PENDING, EventType.RUN_SUBMITTED] * 5
    finally:
        await connection.close()

async def test_cli_start_and_submit_over_tls(
    rabbitmq_tls: TlsNode, worker_processes: Any, tmp_path: Path  # noqa: F811
) -> None:
    node, pool = rabbitmq_tls, f"tls-{uuid.uuid4().hex[:8]}"
    files = tls_files(node)
    worker_processes(node.amqps_url(), "--pool", pool,
                     *[arg for k, v in files.items() for arg in (f"--{k.replace('_', '-')}",
                                                                 str(v))])
    # Clients read the same settings from the environment.
    env = {f"MQ_WORKER_{k.upper()}": str(v) for k, v in files.items()}
    result = await cli("submit", "--url", node.amqps_url(), "--pool", pool, "--wait",
                       "--timeout", "60", "--", *shlex.split(probe(tmp_path)), env=env)
    assert result.returncode == 0, result.stderr
    assert "run.completed" in result.stderr
    assert result.stdout.strip() in started_runs(tmp_path)


async def test_tls_without_the_ca_or_a_trusted_client_certificate_fails_clearly(
    rabbitmq_tls: TlsNode, worker_processes: Any  # noqa: F811
) -> None:
    node, pki = rabbitmq_tls, rabbitmq_tls.pki
    password = "pw-" + secrets.token_hex(8)
    url = node.amqps_url(password=password)
    # The broker refuses a client certificate after the handshake (TLS 1.3): the client
    # reads its alert, or only the reset that follows when the alert is not read in time.
    cases = [
        (TlsOptions(None, pki.client_cert, pki.client_key), "CERTIFICATE_VERIFY_FAILED"),
        (TlsOptions(pki.rogue_ca, pki.client_cert, pki.client_key), "CERTIFICATE_VERIFY_FAILED"),
        (TlsOptions(pki.ca), "CERTIFICATE_REQUIRED|Connection reset by peer"),
        (TlsOptions(pki.ca, pki.rogue_client_cert, pki.rogue_client_key),
         "UNKNOWN_CA|Connection reset by peer"),
    ]
    for tls, reason in cases:
        with anyio.fail_after(15), pytest.raises(BrokerError, match=reason) as failure:
            async with Publisher(url, tls=tls):
                pass
        assert "cannot connect to RabbitMQ" in str(failure.value)
        assert "****" in str(failure.value) and password not in str(failure.value)
    with pytest.raises(ConfigurationError, match="cannot load TLS files"):
        TlsOptions(pki.ca, pki.client_cert, pki.rogue_client_key).context()

    submitted = await cli("submit", "--url", url, "--", "true",
                          env={"MQ_WORKER_TLS_CERT_FILE": str(pki.client_cert),
                               "MQ_WORKER_TLS_KEY_FILE": str(pki.client_key)})
    assert submitted.returncode == 1
    assert "certificate verify failed" in submitted.stderr and password not in submitted.stderr

    worker = worker_processes(url, "--tls-cert-file", str(pki.client_cert),
                              "--tls-key-file", str(pki.client_key))
    await wait_until(lambda: [line for line in worker.log_lines()
                              if line.get("event") == "broker unreachable; retrying"
                              and "CERTIFICATE_VERIFY_FAILED" in line.get("error", "")],
                     timeout=30)
    assert not [line for line in worker.log_lines() if line.get("event") == "connected"]
    assert password not in worker.log_path.read_text()


async def test_unusable_tls_files_are_named_in_the_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.pem"
    with pytest.raises(ConfigurationError, match=f"CA file {missing}: .*No such file"):
        TlsOptions(missing).context()
    with pytest.raises(ConfigurationError, match="a key file needs a certificate file"):
        TlsOptions(None, None, tmp_path / "client.key").context()
    result = await cli("submit", "--url", "amqps://u:pw@127.0.0.1:5671/", "--", "true",
                       env={"MQ_WORKER_TLS_CA_FILE": str(missing)})
    assert result.returncode == 1
    assert f"cannot load TLS files: CA file {missing}" in result.stderr


# -- message size, no shell, validated fields ----------------------------------------------


def _body_of_size(size: int, command: str) -> bytes:
    body = run_body(command, parameters={"pad": ""})
    padding = size - len(json.dumps(body).encode())
    body["parameters"]["pad"] = "x" * padding
    raw = json.dumps(body).encode()
    assert len(raw) == size
    return raw


async def test_default_cap_is_one_mebibyte(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    at_cap = _body_of_size(1024 * 1024, probe(tmp_path))
    over_cap = _body_of_size(1024 * 1024 + 1, probe(tmp_path))
    async with running_worker(vhost.url):
        await publish_raw(vhost.url, over_cap)
        await publish_raw(vhost.url, at_cap)
        await events.wait_terminal([json.loads(at_cap)["id"]], timeout=30)
        await events.wait_for(lambda _: rejected(events))
    assert events.types(json.loads(at_cap)["id"])[-1] == "run.completed"
    [refused] = rejected(events)
    assert refused.data["reason"] == (
        "message of 1048577 bytes exceeds the cap of 1048576 bytes")
    assert set(started_runs(tmp_path)) == {json.loads(at_cap)["id"]}
    [dead] = await dead_letters(vhost.url)
    assert dead.body == over_cap


async def test_oversized_cancel_is_ignored_and_reported(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    body = run_body(probe(tmp_path, sleep=60))
    async with running_worker(vhost.url, max_message_bytes=1024):
        await publish_raw(vhost.url, body)
        await events.wait_for(lambda _: "run.submitted" in events.types(body["id"]))
        await publish_raw(vhost.url, {"id": body["id"], "reason": "x" * 2000},
                          routing_key="run.cancel.default")
        await events.wait_for(lambda _: rejected(events, "cancel"))
        assert not events.terminal(body["id"])
        await publish_raw(vhost.url, {"id": body["id"], "reason": "small"},
                          routing_key="run.cancel.default")
        await events.wait_terminal([body["id"]])
    [refused] = rejected(events, "cancel")
    assert "exceeds the cap of 1024 bytes" in refused.data["reason"]
    [cancelled] = events.terminal(body["id"])
    assert cancelled.type == EventType.RUN_CANCELLED and cancelled.data["reason"] == "small"


async def test_shell_metacharacters_are_literal_arguments(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    marker = tmp_path / "x"
    dumper = tmp_path / "argv.py"
    dumper.write_text("import json, sys\nopen(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))\n")
    tricks = (f"$HOME; touch {marker}1 && touch {marker}2 | touch {marker}3 "
              f"`touch {marker}4` $(touch {marker}5) > {marker}6 & * ~ 'quoted; arg'")
    echo = run_body(f"echo $HOME; touch {marker}")
    dump = run_body(f"{PYTHON} {dumper} {tmp_path / 'argv.json'} {tricks}")
    async with running_worker(vhost.url):
        for body in (echo, dump):
            await publish_raw(vhost.url, body)
        await events.wait_terminal([echo["id"], dump["id"]])
    assert events.types(echo["id"])[-1] == "run.completed"
    assert events.types(dump["id"])[-1] == "run.completed"
    assert json.loads((tmp_path / "argv.json").read_text()) == shlex.split(tricks)
    # No shell ran: nothing was touched or redirected.
    assert not [name for name in os.listdir(tmp_path) if name.startswith("x")]


@pytest.mark.parametrize("name", ["", "1ABC", "A-B", "A=B", "A B", "PATH\n", "A\x00",
                                  "BASH_FUNC_x%%", "É"])
def test_invalid_environment_variable_names_are_rejected(name: str) -> None:
    template = BaseJobTemplate.from_dict(ProcessWorker.get_default_base_job_template())
    with pytest.raises(InvalidMessage, match="invalid environment variable name"):
        ProcessJobConfiguration.from_template_and_values(
            template, {"command": "true", "env": {name: "x"}})


async def test_invalid_fields_are_dead_lettered_and_never_run(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    bad = {
        "env name with a newline": run_body(job_variables={
            "command": probe(tmp_path), "env": {"PATH\n": "/tmp"}}),
        "NUL in an env value": run_body(job_variables={
            "command": probe(tmp_path), "env": {"A": "a\x00b"}}),
        "NUL in working_dir": run_body(job_variables={
            "command": probe(tmp_path), "working_dir": "/tmp\x00/x"}),
        "start time past year 9999 in UTC": run_body(
            probe(tmp_path), scheduled_start_time="9999-12-31T23:59:59-01:00"),
        "tag too long": run_body(probe(tmp_path), tags=["x" * 1025]),
        "id too long": run_body(probe(tmp_path), flow={"id": "f" * 257}),
        "too many tags": run_body(probe(tmp_path), tags=["t"] * 257),
        "unclosed quote": run_body("echo 'unclosed"),
    }
    async with running_worker(vhost.url):
        for body in bad.values():
            await publish_raw(vhost.url, body)
        await events.wait_for(lambda _: len(rejected(events)) == len(bad))
    assert {e.subject for e in rejected(events)} == {b["id"] for b in bad.values()}
    assert not started_runs(tmp_path)
    assert len(await dead_letters(vhost.url)) == len(bad)
    for event in rejected(events):
        assert "\n" not in event.data["reason"]


# -- signing ---------------------------------------------------------------------------


NEW_KEY = "new-key-" + secrets.token_hex(16)
OLD_KEY = "old-key-" + secrets.token_hex(16)


async def test_signed_runs_and_cancels_from_the_publisher_are_accepted(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    worker_keys = key_file(tmp_path / "worker.keys", NEW_KEY, OLD_KEY)
    # Rotation: the worker knows both keys; one publisher still signs with the old one.
    new_only, old_only = key_file(tmp_path / "new.key", NEW_KEY), key_file(tmp_path / "old.key",
                                                                           OLD_KEY)
    soon = datetime.now(UTC) + timedelta(seconds=3)
    async with running_worker(vhost.url, signing_key_file=worker_keys, prefetch_seconds=1), \
            Publisher(vhost.url, signing_key_file=new_only, park_after_seconds=None) as new, \
            Publisher(vhost.url, signing_key_file=old_only, park_after_seconds=0.5) as old:
        long = await new.submit(new_run(probe(tmp_path, sleep=60)))
        quick = await old.submit(new_run(probe(tmp_path)))
        parked_by_worker = await new.submit(new_run(probe(tmp_path), scheduled_start_time=soon))
        parked_by_publisher = await old.submit(new_run(probe(tmp_path),
                                                       scheduled_start_time=soon))
        await events.wait_for(lambda _: "run.submitted" in events.types(long.id))
        await old.cancel(long.id, reason="signed cancel")
        result = await cli("submit", "--url", vhost.url, "--signing-key-file", str(new_only),
                           "--", *shlex.split(probe(tmp_path)))
        assert result.returncode == 0, result.stderr
        from_cli = result.stdout.strip()
        runs = [long.id, quick.id, parked_by_worker.id, parked_by_publisher.id, from_cli]
        await events.wait_terminal(runs, timeout=30)
    assert events.terminal(long.id)[0].type == EventType.RUN_CANCELLED
    assert events.terminal(long.id)[0].data["reason"] == "signed cancel"
    for run_id in runs[1:]:
        assert events.types(run_id)[-1] == "run.completed", events.types(run_id)
    assert not rejected(events) and not rejected(events, "cancel")


async def test_unsigned_and_forged_runs_are_dead_lettered(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    signer, stranger = Signer([NEW_KEY.encode()]), Signer([b"not-the-key-" + b"x" * 16])
    keys = key_file(tmp_path / "keys", NEW_KEY)
    cases: list[tuple[dict[str, Any], dict[str, Any] | None, str]] = []
    for headers, reason in (
        (None, "unsigned message"),
        ({SIGNATURE_V2_HEADER: "md5=abc"}, "unsigned message"),
        ({SIGNATURE_V2_HEADER: 42}, "unsigned message"),
        ({SIGNATURE_V2_HEADER: "t=1,sha256=é"}, "forged message"),
        ({SIGNATURE_V2_HEADER: "t=1,sha256="}, "forged message"),
        ({SIGNATURE_V2_HEADER: bytearray(b"t=1,sha256=\xff")}, "forged message"),
        ("stranger", "forged message"),
        ("other body", "forged message"),
    ):
        body = run_body(probe(tmp_path))
        raw = json.dumps(body).encode()
        if headers == "stranger":
            headers = stranger.headers(raw, kind="run", pool="default")
        elif headers == "other body":
            headers = signer.headers(raw + b" ", kind="run", pool="default")
        cases.append((body, headers, reason))
    good, as_bytes = run_body(probe(tmp_path)), run_body(probe(tmp_path))
    async with running_worker(vhost.url, signing_key_file=keys):
        for body, headers, _ in cases:
            await publish_raw(vhost.url, json.dumps(body).encode(), headers=headers)
        raw_good, raw_as_bytes = json.dumps(good).encode(), json.dumps(as_bytes).encode()
        await publish_raw(vhost.url, raw_good,
                          headers=signer.headers(raw_good, kind="run", pool="default"))
        await publish_raw(vhost.url, raw_as_bytes, headers={  # an AMQP byte array header
            SIGNATURE_V2_HEADER: bytearray(signer.headers(
                raw_as_bytes, kind="run", pool="default")[SIGNATURE_V2_HEADER].encode())})
        await events.wait_terminal([good["id"], as_bytes["id"]])
        await events.wait_for(lambda _: len(rejected(events)) == len(cases))
    assert set(started_runs(tmp_path)) == {good["id"], as_bytes["id"]}
    dead = {json.loads(m.body)["id"]: m for m in await dead_letters(vhost.url)}
    assert set(dead) == {body["id"] for body, _, _ in cases}
    reasons = sorted(e.data["reason"] for e in rejected(events))
    assert reasons == sorted(
        dead[b["id"]].headers["x-mq-worker-reason"] for b, _, _ in cases)
    assert sorted(r.split(":")[0] for r in reasons) == sorted(r for _, _, r in cases)


async def test_forged_or_unsigned_cancels_are_ignored_and_reported(
    vhost: VHost, events: EventLog, worker_processes: Any, tmp_path: Path
) -> None:
    keys = key_file(tmp_path / "keys", NEW_KEY)
    stranger = Signer([b"not-the-key-" + b"x" * 16])
    async with Publisher(vhost.url, signing_key_file=keys) as publisher:
        # One invalid cancel is already in the stream when the worker starts: replayed, logged.
        await publisher.cancel(uuid.uuid4(), reason="declares the stream")
        await publish_raw(vhost.url, {"id": str(uuid.uuid4())}, routing_key="run.cancel.default")
        worker = worker_processes(vhost.url, "--signing-key-file", str(keys))
        await events.wait_for(started, timeout=30)
        run = await publisher.submit(new_run(probe(tmp_path, sleep=60)))
        await events.wait_for(lambda _: "run.submitted" in events.types(run.id))
        unsigned = json.dumps({"id": str(run.id), "reason": "unsigned"}).encode()
        forged = json.dumps({"id": str(run.id), "reason": "forged"}).encode()
        await publish_raw(vhost.url, unsigned, routing_key="run.cancel.default")
        await publish_raw(vhost.url, forged, routing_key="run.cancel.default",
                          headers=stranger.headers(forged, kind="cancel", pool="default"))
        await events.wait_for(lambda _: len(rejected(events, "cancel")) == 2)
        assert not events.terminal(run.id)
        # The stream keeps order: the signed cancel comes after the forged ones.
        await publisher.cancel(run.id, reason="signed")
        await events.wait_terminal([run.id])
    [outcome] = events.terminal(run.id)
    assert outcome.type == EventType.RUN_CANCELLED and outcome.data["reason"] == "signed"
    reasons = sorted(e.data["reason"] for e in rejected(events, "cancel"))
    assert reasons[0].startswith("invalid cancel: forged message")
    assert reasons[1].startswith("invalid cancel: unsigned message")
    ignored = [line for line in worker.log_lines()
               if line.get("event") == "invalid cancel message ignored"]
    assert [line["live"] for line in ignored] == [False, True, True]
    assert ignored[0]["reason"].startswith("unsigned message")


async def test_without_a_key_signatures_are_not_checked(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    unsigned = run_body(probe(tmp_path))
    odd = run_body(probe(tmp_path, sleep=60))
    async with running_worker(vhost.url):
        await publish_raw(vhost.url, unsigned)
        await publish_raw(vhost.url, odd, headers={SIGNATURE_HEADER: "sha256=nonsense"})
        await events.wait_for(lambda _: "run.submitted" in events.types(odd["id"]))
        await publish_raw(vhost.url, {"id": odd["id"]}, routing_key="run.cancel.default",
                          headers={SIGNATURE_HEADER: "sha256=nonsense"})
        await events.wait_terminal([unsigned["id"], odd["id"]])
    assert events.types(unsigned["id"])[-1] == "run.completed"
    assert events.types(odd["id"])[-1] == "run.cancelled"


async def test_signing_keys_shorter_than_16_bytes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        Signer([b"short"])
    short = key_file(tmp_path / "short.key", "fifteen-bytes!!")
    result = await cli("start", "--url", "amqp://guest:guest@127.0.0.1:1/",
                       "--signing-key-file", str(short))
    assert result.returncode == 2 and "at least 16 bytes" in result.stderr
    missing = await cli("start", "--signing-key-file", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "cannot read signing key file" in missing.stderr


# -- the allow-list ---------------------------------------------------------------------------


async def test_allow_list_runs_only_commands_under_the_prefix(
    vhost: VHost, events: EventLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = tmp_path / "ran"
    ran.mkdir()
    flows, more = tmp_path / "flows", tmp_path / "more-flows"
    write_script(flows / "etl", f'exec {PYTHON} {PROBE} {ran} "$@"')
    write_script(more / "report", f'exec {PYTHON} {PROBE} {ran} "$@"')
    venv = write_script(tmp_path / "venv" / "bin" / "etl", f'exec {PYTHON} {PROBE} {ran} "$@"')
    (flows / "linked").symlink_to(venv)  # the program itself may be a link
    monkeypatch.setenv("MQ_WORKER_ALLOW_COMMAND_PREFIX", f"{flows},{more}")
    marker = tmp_path / "escaped"
    escape = f"touch {marker}"
    write_script(tmp_path / "flows-evil" / "etl", escape)  # shares the prefix's first letters
    write_script(tmp_path / "elsewhere" / "etl", escape)
    (tmp_path / "elsewhere" / "deep").mkdir()
    (flows / "sub").symlink_to(tmp_path / "elsewhere" / "deep")  # an operator's symlink
    up_to_root = "../" * (len(flows.parts) - 1)

    allowed = [
        run_body(f"{flows}/etl"),
        run_body(job_variables={"command": "etl", "env": {"PATH": str(flows)}}),
        run_body(job_variables={"command": "./etl --flag", "working_dir": str(flows)}),
        run_body(f"{more}/report"),
        run_body(f"{flows}/linked"),
    ]
    refused = [
        run_body(f"/bin/sh -c '{escape}'"),
        run_body(f"{flows}/{up_to_root}bin/sh -c '{escape}'"),
        run_body(job_variables={"command": "../flows-evil/etl", "working_dir": str(flows)}),
        run_body(job_variables={"command": "flows-evil/etl", "working_dir": str(tmp_path)}),
        run_body(f"sh -c '{escape}'"),  # a bare name found on the worker's PATH
        run_body(job_variables={"command": "etl",
                                "env": {"PATH": f"{tmp_path}/flows-evil:{flows}"}}),
        run_body(job_variables={"command": "etl", "env": {"PATH": None}}),  # default path
        run_body(f"{tmp_path}/flows-evil/etl"),
        run_body(f"{flows}/sub/../etl"),  # '..' after a symlink leaves the prefix
    ]
    async with running_worker(vhost.url):
        for body in refused + allowed:
            await publish_raw(vhost.url, body)
        await events.wait_terminal([b["id"] for b in allowed + refused])
    for body in allowed:
        assert events.types(body["id"])[-1] == "run.completed", events.terminal(body["id"])
    assert set(started_runs(ran)) == {b["id"] for b in allowed}
    for body in refused:
        assert events.types(body["id"]) == ["run.rejected"]
        assert "is not allowed" in events.terminal(body["id"])[0].data["reason"]
    assert not marker.exists()
    dead = await dead_letters(vhost.url)
    assert {json.loads(m.body)["id"] for m in dead} == {b["id"] for b in refused}


async def test_a_base_job_template_can_forbid_environment_and_odd_commands(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    ran, flows = tmp_path / "ran", tmp_path / "flows"
    ran.mkdir()
    write_script(flows / "etl", f'exec {PYTHON} {PROBE} {ran} "$@"')
    template = tmp_path / "template.json"
    template.write_text(json.dumps({
        "job_configuration": {"command": "{{ command }}", "env": {"TIER": "prod"}},
        "variables": {"type": "object", "required": ["command"], "properties": {"command": {
            "type": "string",
            "pattern": f"^{re.escape(str(flows))}/[a-z-]+( --[a-z-]+=[A-Za-z0-9._:-]+)*$"}}},
    }))
    good = run_body(f"{flows}/etl --day=2026-11-28")
    refused = [
        run_body(job_variables={"command": f"{flows}/etl", "env": {"LD_PRELOAD": "/tmp/x.so"}}),
        run_body(job_variables={"command": f"{flows}/etl", "working_dir": "/tmp"}),
        run_body(f"{flows}/etl --day=$(id)"),
        run_body(f"{flows}/etl; id"),
    ]
    async with running_worker(vhost.url, job_template=template,
                              allow_command_prefix=[str(flows)]):
        for body in [*refused, good]:
            await publish_raw(vhost.url, body)
        await events.wait_terminal([b["id"] for b in [*refused, good]])
    assert events.types(good["id"])[-1] == "run.completed"
    assert started_runs(ran)[good["id"]]["env"]["TIER"] == "prod"
    reasons = [events.terminal(b["id"])[0].data["reason"] for b in refused]
    assert reasons[0] == "undeclared job variable(s): env"
    assert reasons[1] == "undeclared job variable(s): working_dir"
    assert all(r.startswith("job variable command: ") for r in reasons[2:])
    assert set(started_runs(ran)) == {good["id"]}


# -- least privilege -------------------------------------------------------------------


POOL = "etl"
WORKER_PERMISSIONS = {
    "configure": r"^(mq_worker\.(runs|events|output|dead|cancels|control|due|delay-[0-9]{2}"
                 r"|monitor-etl|ping|heartbeats-etl|cancel-snapshots-etl|etl\.[A-Za-z0-9_-]+)|amq\.gen-.*)$",
    "write": r"^(amq\.default|amq\.gen-.*|mq_worker\.(events|output|cancels|control|due"
             r"|delay-[0-9]{2}|monitor-etl|heartbeats-etl|cancel-snapshots-etl|waiting-[0-9a-f]{32}"
             r"|etl\.[A-Za-z0-9_-]+))$",
    "read": r"^(amq\.gen-.*|mq_worker\.(runs|events|cancels|control|due|delay-[0-9]{2}"
            r"|monitor-etl|ping|heartbeats-etl|cancel-snapshots-etl|(limit|waiting)-[0-9a-f]{32}"
            r"|etl\.[A-Za-z0-9_-]+))$",
}
PUBLISHER_PERMISSIONS = {
    "configure": r"^mq_worker\.(runs|events|dead|cancels|due|delay-[0-9]{2}"
                 r"|[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)$",
    "write": r"^(amq\.default|mq_worker\.(runs|cancels|due|delay-[0-9]{2}"
             r"|[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+))$",
    "read": r"^mq_worker\.(runs|due|delay-[0-9]{2}|[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+)$",
}
NON_DECLARING_PUBLISHER_PERMISSIONS = {
    "configure": "^$", "write": r"^mq_worker\.(runs|delay-24)$", "read": "^$",
}
SUBSCRIBER_PERMISSIONS = {
    "configure": r"^(mq_worker\.events|amq\.gen-.*)$",
    "write": r"^amq\.gen-.*$",
    "read": r"^(mq_worker\.events|amq\.gen-.*)$",
}


def test_the_documented_permissions_are_the_tested_ones() -> None:
    words = " ".join(DOCS.read_text().replace("\\\n", " ").split())
    for permissions in (WORKER_PERMISSIONS, PUBLISHER_PERMISSIONS,
                        NON_DECLARING_PUBLISHER_PERMISSIONS, SUBSCRIBER_PERMISSIONS):
        quoted = " ".join(f"'{permissions[k]}'" for k in ("configure", "write", "read"))
        assert quoted in words, quoted
        for pattern in permissions.values():
            re.compile(pattern)


async def test_each_role_works_with_exactly_the_documented_permissions(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    password = secrets.token_hex(8)
    with broker_user(vhost, password=password, **WORKER_PERMISSIONS) as worker_user, \
            broker_user(vhost, password=password, **PUBLISHER_PERMISSIONS) as publisher_user, \
            broker_user(vhost, password=password,
                        **NON_DECLARING_PUBLISHER_PERMISSIONS) as plain_user, \
            broker_user(vhost, password=password, **SUBSCRIBER_PERMISSIONS) as subscriber_user:
        async with EventSubscriber(vhost.url_for(subscriber_user, password)) as subscription, \
                Publisher(vhost.url_for(publisher_user, password),
                          park_after_seconds=None) as publisher:
            # Published before any worker exists: the publisher declares the work queue.
            early = await publisher.submit(new_run(probe(tmp_path)), pool=POOL, queue="high")
            async with running_worker(vhost.url_for(worker_user, password), pool=POOL,
                                      queue=["high", "low"], prefetch_seconds=1), \
                    Publisher(vhost.url_for(plain_user, password), declare=False,
                              park_after_seconds=0.5) as plain:
                soon = datetime.now(UTC) + timedelta(seconds=3)
                parked_by_worker = await publisher.submit(
                    new_run(probe(tmp_path), scheduled_start_time=soon), pool=POOL, queue="low")
                parked_by_publisher = await plain.submit(
                    new_run(probe(tmp_path), scheduled_start_time=soon), pool=POOL, queue="low")
                invalid = await publisher.submit(
                    new_run("true", job_variables={"undeclared": 1}), pool=POOL, queue="high")
                long = await plain.submit(new_run(probe(tmp_path, sleep=60)), pool=POOL,
                                          queue="high")
                await events.wait_for(lambda _: "run.submitted" in events.types(long.id))
                await publisher.cancel(long.id, pool=POOL, reason="by the publisher")
                other = await plain.submit(new_run(probe(tmp_path, sleep=60)), pool=POOL,
                                           queue="low")
                await plain.cancel(other.id, pool=POOL, reason="by the plain publisher")
                wanted = {early.id, parked_by_worker.id, parked_by_publisher.id, invalid.id,
                          long.id, other.id}
                outcomes: dict[str, str] = {}
                with anyio.fail_after(30):
                    async for event in subscription:
                        if event.is_terminal and event.subject in {str(w) for w in wanted}:
                            outcomes[str(event.subject)] = event.type
                            if len(outcomes) == len(wanted):
                                break
                declared = [await queue_exists(vhost.url, name)
                            for name in ("mq_worker.monitor-etl", "mq_worker.delay-24")]
    assert outcomes == {
        str(early.id): EventType.RUN_COMPLETED,
        str(parked_by_worker.id): EventType.RUN_COMPLETED,
        str(parked_by_publisher.id): EventType.RUN_COMPLETED,
        str(invalid.id): EventType.RUN_REJECTED,
        str(long.id): EventType.RUN_CANCELLED,
        str(other.id): EventType.RUN_CANCELLED,
    }
    assert declared == [True, True]
    [dead] = await dead_letters(vhost.url)
    assert json.loads(dead.body)["id"] == str(invalid.id)


async def test_only_a_publisher_that_declares_work_queues_needs_read_on_them(
    vhost: VHost, tmp_path: Path
) -> None:
    # RabbitMQ checks read on a queue declared with a dead-letter exchange, which every
    # work queue has: a publisher that creates work queues can also consume them.
    password = secrets.token_hex(8)
    without_read = {**PUBLISHER_PERMISSIONS, "read": r"^mq_worker\.(runs|due|delay-[0-9]{2})$"}
    with broker_user(vhost, password=password, **without_read) as declaring, \
            broker_user(vhost, password=password,
                        **NON_DECLARING_PUBLISHER_PERMISSIONS) as plain_user:
        async with Publisher(vhost.url_for(declaring, password)) as publisher:
            with pytest.raises(BrokerError, match="ACCESS_REFUSED - access to queue "
                                                  f"'mq_worker.{POOL}.high'"):
                await publisher.submit(new_run("true"), pool=POOL, queue="high")
        async with running_worker(vhost.url, pool=POOL, queue=["high"], limit=1):
            pass  # the workers declare the queue
        async with Publisher(vhost.url_for(plain_user, password), declare=False,
                             park_after_seconds=None) as plain:
            await plain.submit(new_run("true"), pool=POOL, queue="high")
        connection = await aio_pika.connect(vhost.url_for(plain_user, password))
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(f"mq_worker.{POOL}.high", ensure=False)
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused, match="ACCESS_REFUSED"):
                await queue.get(no_ack=True, fail=False)
    # No worker is left to hold it unacknowledged.
    high = f"mq_worker.{POOL}.high"
    assert await ready_counts(vhost.url, [high]) == {high: 1}


@pytest.mark.parametrize("role", ["publisher", "non-declaring publisher", "subscriber"])
async def test_a_client_without_a_needed_permission_fails_at_once_with_a_clear_error(
    vhost: VHost, role: str
) -> None:
    password = secrets.token_hex(8)
    if role == "subscriber":
        permissions = {**SUBSCRIBER_PERMISSIONS, "read": r"^amq\.gen-.*$"}
        resource = "exchange 'mq_worker.events'"
    elif role == "publisher":
        permissions = {**PUBLISHER_PERMISSIONS,
                       "write": PUBLISHER_PERMISSIONS["write"].replace("runs|", "")}
        resource = "exchange 'mq_worker.runs'"
    else:
        permissions = {**NON_DECLARING_PUBLISHER_PERMISSIONS, "write": r"^mq_worker\.runs$"}
        resource = "exchange 'mq_worker.delay-24'"
    # The topology exists, the delay ladder included.
    async with running_worker(vhost.url), Publisher(vhost.url) as admin:
        await admin.submit(new_run("true", scheduled_start_time=datetime.now(UTC)
                                   + timedelta(hours=1)))
    with broker_user(vhost, password=password, **permissions) as user:
        url = vhost.url_for(user, password)
        with anyio.fail_after(15), pytest.raises(BrokerError) as failure:
            if role == "subscriber":
                async with EventSubscriber(url):
                    pass
            else:
                async with Publisher(url, declare=role == "publisher") as publisher:
                    # A run due in an hour is parked: published to the delay ladder.
                    due = datetime.now(UTC) + timedelta(hours=1) if role != "publisher" else None
                    await publisher.submit(new_run("true", scheduled_start_time=due))
    message = str(failure.value)
    assert "ACCESS_REFUSED" in message and resource in message and user in message
    assert password not in message


async def test_a_worker_without_a_needed_permission_says_so_and_starts_once_granted(
    vhost: VHost, events: EventLog, worker_processes: Any, tmp_path: Path
) -> None:
    password = secrets.token_hex(8)
    missing = WORKER_PERMISSIONS["read"].replace("cancels|", "")
    with broker_user(vhost, password=password, **{**WORKER_PERMISSIONS, "read": missing}) as user:
        worker = worker_processes(vhost.url_for(user, password), "--pool", POOL)
        refusal = await wait_until(lambda: [
            line for line in worker.log_lines()
            if "ACCESS_REFUSED - access to queue 'mq_worker.cancels'" in line.get("error", "")],
            timeout=30)
        assert refusal[0]["level"] == "warning" and user in refusal[0]["error"]
        assert not started(events.events)
        management("PUT", f"/permissions/{vhost.name}/{user}", WORKER_PERMISSIONS)
        await events.wait_for(started, timeout=30)
        body = run_body(probe(tmp_path))
        await publish_raw(vhost.url, body, routing_key=f"run.scheduled.{POOL}.default")
        await events.wait_terminal([body["id"]])
    assert events.types(body["id"])[-1] == "run.completed"


async def test_a_worker_refused_access_backs_off_between_attempts(
    vhost: VHost, worker_processes: Any
) -> None:
    password = secrets.token_hex(8)
    missing = WORKER_PERMISSIONS["read"].replace("cancels|", "")
    with broker_user(vhost, password=password, **{**WORKER_PERMISSIONS, "read": missing}) as user:
        worker = worker_processes(vhost.url_for(user, password), "--pool", POOL)
        await wait_until(lambda: any("ACCESS_REFUSED" in line.get("error", "")
                                     for line in worker.log_lines()), timeout=30)
        with pytest.raises(TimeoutError):  # at most a few attempts in 3 s
            await wait_until(lambda: len([line for line in worker.log_lines()
                                          if "ACCESS_REFUSED" in line.get("error", "")]) > 10,
                             timeout=3)
