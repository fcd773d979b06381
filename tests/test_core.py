"""The push worker core on a real broker: runs in, processes started, events out."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import aio_pika
import anyio
import pytest
from cloudevents.core.bindings import rabbitmq as ce_rabbitmq

from mq_worker.topology import DEAD_QUEUE
from tests.helpers import (
    EventLog,
    VHost,
    ended_runs,
    probe,
    publish_raw,
    run_body,
    running_worker,
    started_runs,
    until_ready,
    wait_until,
)

pytestmark = pytest.mark.anyio


async def test_run_starts_a_process_and_reports_pending_submitted_completed(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    body = run_body(probe(tmp_path), name="first-run",
                    flow={"id": "f-1", "name": "etl"},
                    deployment={"id": "d-1", "name": "nightly", "job_variables": {}},
                    tags=["a", "b"])
    async with running_worker(vhost.url, pool="default", queue=["default"]) as worker:
        await publish_raw(vhost.url, body)
        await events.wait_terminal([body["id"]])

    assert events.types(body["id"]) == ["run.pending", "run.submitted", "run.completed"]
    started = started_runs(tmp_path)[body["id"]]
    assert started["env"]["MQ_WORKER_RUN_ID"] == body["id"]
    assert started["env"]["MQ_WORKER_RUN_NAME"] == "first-run"
    assert started["env"]["MQ_WORKER_POOL"] == "default"
    assert started["env"]["MQ_WORKER_QUEUE"] == "default"

    pending, submitted, completed = events.of(body["id"])
    assert submitted.data["infrastructure_pid"].endswith(f":{started['pid']}")
    assert completed.data["status_code"] == 0
    assert completed.data["follows"] == submitted.id
    assert submitted.data["follows"] == pending.id
    for event in (pending, submitted, completed):
        assert worker.name in event.source
        assert event.data["worker"] == worker.name
        assert event.data["run_name"] == "first-run"
        assert event.data["pool"] == "default" and event.data["queue"] == "default"
        roles = {r["role"]: r for r in event.data["related"]}
        assert roles["flow"]["name"] == "etl" and roles["deployment"]["id"] == "d-1"
        assert roles["work-pool"]["name"] == "default"
        assert {r["name"] for r in event.data["related"] if r["role"] == "tag"} == {"a", "b"}


async def test_with_run_events_outcomes_a_run_publishes_only_its_outcome(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    completes, fails = run_body(probe(tmp_path)), run_body(probe(tmp_path, exit_code=3))
    async with running_worker(vhost.url, run_events="outcomes") as worker:
        await publish_raw(vhost.url, completes)
        await publish_raw(vhost.url, fails)
        await events.wait_terminal([completes["id"], fails["id"]])

    assert events.types(completes["id"]) == ["run.completed"]
    assert events.types(fails["id"]) == ["run.crashed"]
    (completed,), (crashed,) = events.of(completes["id"]), events.of(fails["id"])
    assert completed.data["follows"] is None and crashed.data["follows"] is None
    assert crashed.data["status_code"] == 3
    started = started_runs(tmp_path)[completes["id"]]
    assert completed.data["infrastructure_pid"].endswith(f":{started['pid']}")
    assert worker.name in completed.source
    (started,) = [e for e in events.events if e.type == "mq_worker.worker.started"
                  and e.subject == worker.name]
    assert started.data["run_events"] == "outcomes"


async def test_events_parse_with_the_cloudevents_sdk_rabbitmq_binding(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    body = run_body(probe(tmp_path))
    async with running_worker(vhost.url):
        await publish_raw(vhost.url, body)
        await events.wait_terminal([body["id"]])

    messages = [m for m, e in zip(events.raw, events.events, strict=True)
                if e.subject == body["id"]]
    assert len(messages) == 3
    for message in messages:
        assert message.content_type == "application/cloudevents+json"
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        parsed = ce_rabbitmq.from_rabbitmq_event(ce_rabbitmq.RabbitMQMessage(
            headers={}, content_type=message.content_type, body=message.body))
        assert parsed.get_specversion() == "1.0"
        assert parsed.get_type() == message.routing_key
        assert parsed.get_subject() == body["id"]
        assert parsed.get_time() is not None
        assert parsed.get_data()["run_id"] == body["id"]


async def test_exit_code_three_is_crashed_with_status_code(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    body = run_body(probe(tmp_path, exit_code=3))
    async with running_worker(vhost.url):
        await publish_raw(vhost.url, body)
        await events.wait_terminal([body["id"]])
    assert events.types(body["id"]) == ["run.pending", "run.submitted", "run.crashed"]
    crashed = events.terminal(body["id"])[0]
    assert crashed.data["status_code"] == 3
    assert "3" in crashed.data["message"]


async def test_missing_executable_crashes_the_run_not_the_worker(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    missing = run_body("/no/such/executable --flag")
    bad_dir = run_body(probe(tmp_path), job_variables={
        "command": probe(tmp_path), "working_dir": str(tmp_path / "nowhere")})
    after = run_body(probe(tmp_path))
    async with running_worker(vhost.url):
        for body in (missing, bad_dir, after):
            await publish_raw(vhost.url, body)
        await events.wait_terminal([b["id"] for b in (missing, bad_dir, after)])

    for body, needle in ((missing, "/no/such/executable"), (bad_dir, "nowhere")):
        assert events.types(body["id"]) == ["run.pending", "run.crashed"]
        crashed = events.terminal(body["id"])[0]
        assert needle in crashed.data["message"]
        assert crashed.data["status_code"] is None
    assert events.types(after["id"])[-1] == "run.completed"
    assert set(started_runs(tmp_path)) == {after["id"]}


async def test_limit_two_never_runs_more_than_two_at_once(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    # The first runs go on until two have started (a third, had it started, with them):
    # the limit is reached however slowly a loaded machine starts them.
    gate = tmp_path / "two-started"
    bodies = [run_body(probe(tmp_path, sleep=0.5, extra=f"--gate {gate}")) for _ in range(6)]
    async with running_worker(vhost.url, limit=2):
        for body in bodies:
            await publish_raw(vhost.url, body)
        await wait_until(lambda: len(started_runs(tmp_path)) >= 2)
        gate.touch()
        await events.wait_terminal([b["id"] for b in bodies], timeout=30)

    assert len(started_runs(tmp_path)) == len(ended_runs(tmp_path)) == 6
    assert _most_at_once(tmp_path) == 2


def _most_at_once(directory: Path) -> int:
    """The most runs that ran at once, by the start and end times their processes wrote."""
    starts, ends = started_runs(directory), ended_runs(directory)
    moments = sorted([(s["t"], 1) for s in starts.values()] + [(e["t"], -1) for e in ends.values()])
    running = peak = 0
    for _, step in moments:
        running += step
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize(
    ("raw", "reason_part", "run_id_readable"),
    [
        (b"{not json", "not valid JSON", False),
        (json.dumps({"name": "no id"}).encode(), "id", False),
        (json.dumps({"id": "not-a-uuid"}).encode(), "id", False),
        (json.dumps({"id": "11111111-2222-4333-8444-555555555555", "tags": "x"}).encode(),
         "tags", True),
        (json.dumps({"id": "11111111-2222-4333-8444-555555555556",
                     "job_variables": {"command": "true", "undeclared_var": 1}}).encode(),
         "undeclared job variable(s): undeclared_var", True),
        (json.dumps({"id": "11111111-2222-4333-8444-555555555557",
                     "job_variables": {"command": "true", "stream_output": "yes"}}).encode(),
         "stream_output", True),
        (json.dumps({"id": "11111111-2222-4333-8444-555555555558",
                     "job_variables": {"command": "true", "env": {"BAD NAME": "x"}}}).encode(),
         "BAD NAME", True),
        (json.dumps({"id": "11111111-2222-4333-8444-555555555559"}).encode(),
         "no command", True),
    ],
)
async def test_bad_messages_are_rejected_and_dead_lettered(
    vhost: VHost, events: EventLog, tmp_path: Path, raw: bytes, reason_part: str,
    run_id_readable: bool,
) -> None:
    good = run_body(probe(tmp_path))
    async with running_worker(vhost.url):
        await publish_raw(vhost.url, raw)
        await publish_raw(vhost.url, good)
        rejected = await events.wait_for(
            lambda evs: [e for e in evs if e.type == "mq_worker.run.rejected"])
        await events.wait_terminal([good["id"]])

    assert len(rejected) == 1
    assert reason_part in rejected[0].data["reason"]
    if run_id_readable:
        assert rejected[0].subject == json.loads(raw)["id"]
    else:
        assert rejected[0].subject is None
    assert events.types(good["id"])[-1] == "run.completed"

    connection = await aio_pika.connect(vhost.url)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(DEAD_QUEUE, passive=True)
        message = await dead.get(timeout=5)
        assert message.body == raw
        assert reason_part in message.headers["x-mq-worker-reason"]
        await message.ack()
        assert await dead.get(fail=False) is None


async def test_oversized_message_is_rejected(vhost: VHost, events: EventLog) -> None:
    body = run_body("true", parameters={"blob": "x" * 5000})
    async with running_worker(vhost.url, max_message_bytes=4096):
        await publish_raw(vhost.url, body)
        rejected = await events.wait_for(
            lambda evs: [e for e in evs if e.type == "mq_worker.run.rejected"])
    assert "exceeds the cap of 4096 bytes" in rejected[0].data["reason"]


async def test_unknown_fields_are_ignored(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    body = run_body(probe(tmp_path), future_field={"x": 1}, schema_version=2,
                    flow={"id": "f", "name": "n", "owner": "someone"})
    async with running_worker(vhost.url):
        await publish_raw(vhost.url, body)
        await events.wait_terminal([body["id"]])
    assert events.types(body["id"])[-1] == "run.completed"


async def test_deployment_job_variables_merge_under_the_runs(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    body = run_body(
        deployment={"id": "d", "name": "dep", "job_variables": {
            "command": probe(tmp_path), "env": {"FROM_DEPLOYMENT": "1", "SHARED": "dep"}}},
        job_variables={"env": {"SHARED": "run", "FROM_RUN": "1"}, "working_dir": str(tmp_path)},
    )
    async with running_worker(vhost.url):
        await publish_raw(vhost.url, body)
        await events.wait_terminal([body["id"]])
    env = started_runs(tmp_path)[body["id"]]["env"]
    # Shallow merge: the run's env replaces the deployment's env as a whole.
    assert env["SHARED"] == "run" and env["FROM_RUN"] == "1"
    assert "FROM_DEPLOYMENT" not in env
    assert started_runs(tmp_path)[body["id"]]["cwd"] == str(tmp_path)


async def test_worker_settings_do_not_leak_into_runs(
    vhost: VHost, events: EventLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MQ_WORKER_SIGNING_SECRET_HINT", "do-not-leak")
    monkeypatch.setenv("UNRELATED_VARIABLE", "kept")
    body = run_body(job_variables={"command": probe(tmp_path),
                                   "env": {"UNRELATED_VARIABLE": None, "ADDED": "yes"}})
    async with running_worker(vhost.url):
        await publish_raw(vhost.url, body)
        await events.wait_terminal([body["id"]])
    env = started_runs(tmp_path)[body["id"]]["env"]
    assert "MQ_WORKER_SIGNING_SECRET_HINT" not in env
    assert "UNRELATED_VARIABLE" not in env  # null removes a variable
    assert env["ADDED"] == "yes"


async def test_two_workers_share_a_queue(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    bodies = [run_body(probe(tmp_path, sleep=2.0)) for _ in range(8)]
    async with running_worker(vhost.url, limit=2, name="w-one"), \
            running_worker(vhost.url, limit=2, name="w-two"):
        for body in bodies:
            await publish_raw(vhost.url, body)
        await events.wait_terminal([b["id"] for b in bodies], timeout=30)

    # Eight 2-second runs on 2 x 2 slots run on both workers at once: more at a time than
    # one worker's 2 (counted from the processes, not timed: a loaded machine is slow).
    assert _most_at_once(tmp_path) > 2
    per_worker: dict[str, int] = {}
    for body in bodies:
        submitted = [e for e in events.of(body["id"]) if e.type == "mq_worker.run.submitted"]
        assert len(submitted) == 1
        per_worker[submitted[0].data["worker"]] = per_worker.get(submitted[0].data["worker"], 0) + 1
    assert per_worker.get("w-one", 0) >= 3 and per_worker.get("w-two", 0) >= 3


async def test_a_busy_worker_does_not_sit_on_runs_an_idle_peer_could_start(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    long_run = run_body(probe(tmp_path, sleep=30))
    waiting = run_body(probe(tmp_path))
    async with running_worker(vhost.url, limit=1, name="busy") as busy:
        await publish_raw(vhost.url, long_run)
        await events.wait_for(lambda _: "run.submitted" in events.types(long_run["id"]))
        await publish_raw(vhost.url, waiting)
        # The busy worker has no free slot, so the broker keeps the run for someone else.
        await until_ready(vhost.url, {"mq_worker.default.default": 1})
        assert busy.free_slots == 0 and busy.in_flight == [uuid.UUID(long_run["id"])]
        async with running_worker(vhost.url, limit=1, name="idle"):
            await events.wait_terminal([waiting["id"]])
        assert events.terminal(waiting["id"])[0].data["worker"] == "idle"


async def test_run_published_with_the_amqp_publish_tool_runs(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    body = run_body(probe(tmp_path))
    async with running_worker(vhost.url):
        await anyio.run_process(
            ["amqp-publish", "--url", vhost.url, "-e", "mq_worker.runs",
             "-r", "run.scheduled.default.default", "-C", "application/json",
             "-p", "-b", json.dumps(body)],
        )
        await events.wait_terminal([body["id"]])
    assert events.types(body["id"]) == ["run.pending", "run.submitted", "run.completed"]
    assert body["id"] in started_runs(tmp_path)


async def test_connections_are_named_after_the_worker(vhost: VHost) -> None:
    async with running_worker(vhost.url, name="named-worker-7"):
        properties = [props for _, props in vhost.connections()]
    assert any('"connection_name","mq_worker named-worker-7"' in p for p in properties)


async def test_worker_started_and_stopped_events(vhost: VHost, events: EventLog) -> None:
    async with running_worker(vhost.url, name="lifecycle", limit=3, queue=["a", "b"]):
        started = await events.wait_for(
            lambda evs: [e for e in evs if e.type == "mq_worker.worker.started"])
    stopped = await events.wait_for(
        lambda evs: [e for e in evs if e.type == "mq_worker.worker.stopped"])
    assert started[0].subject == stopped[0].subject == "lifecycle"
    assert started[0].data["queues"] == ["a", "b"] and started[0].data["limit"] == 3
    assert stopped[0].data["follows"] == started[0].id


async def test_a_run_id_in_flight_is_not_started_twice_by_a_worker(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    # The run goes on until its copy has been turned away.
    gate = tmp_path / "copy-dead-lettered"
    body = run_body(probe(tmp_path, extra=f"--gate {gate}"))
    async with running_worker(vhost.url, limit=4):
        await publish_raw(vhost.url, body)
        await events.wait_for(lambda _: "run.submitted" in events.types(body["id"]))
        await publish_raw(vhost.url, body)
        await until_ready(vhost.url, {DEAD_QUEUE: 1})
        gate.touch()
        await events.wait_terminal([body["id"]])
    assert events.types(body["id"]) == ["run.pending", "run.submitted", "run.completed"]
    assert len(started_runs(tmp_path)) == 1
    connection = await aio_pika.connect(vhost.url)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(DEAD_QUEUE, passive=True)
        message = await dead.get(timeout=5)
        assert "already in flight" in message.headers["x-mq-worker-reason"]


async def test_run_output_is_streamed_into_the_worker_log(
    vhost: VHost, events: EventLog, worker_processes, tmp_path: Path
) -> None:
    marker = f"hello-{uuid.uuid4().hex[:8]}"
    body = run_body(f"sh -c 'echo {marker}; echo err-{marker} >&2'")
    quiet = run_body(f"echo quiet-{marker}", job_variables={
        "command": f"echo quiet-{marker}", "stream_output": False})
    worker = worker_processes(vhost.url)
    await events.wait_for(lambda evs: any(e.type == "mq_worker.worker.started" for e in evs),
                          timeout=60)
    await publish_raw(vhost.url, body)
    await publish_raw(vhost.url, quiet)
    await events.wait_terminal([body["id"], quiet["id"]])
    lines = worker.log_lines()
    output = [line for line in lines if line.get("event") == "run output"]
    out = [line for line in output if line.get("line") == marker]
    err = [line for line in output if line.get("line") == f"err-{marker}"]
    assert out and out[0]["run_id"] == body["id"] and out[0]["stream"] == "stdout"
    assert err and err[0]["stream"] == "stderr"
    assert not [line for line in output if line.get("line") == f"quiet-{marker}"]
    assert all("guest:guest" not in json.dumps(line) for line in lines)


async def test_the_worker_keeps_serving_after_many_bad_messages(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    good = run_body(probe(tmp_path))
    async with running_worker(vhost.url, limit=2) as worker:
        for i in range(50):
            await publish_raw(vhost.url, f"garbage {i}".encode())
        await publish_raw(vhost.url, good)
        await events.wait_terminal([good["id"]])
        await events.wait_for(
            lambda evs: len([e for e in evs if e.type == "mq_worker.run.rejected"]) == 50)
        assert worker.free_slots == 2
