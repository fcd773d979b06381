"""The machine-readable contract: docs/asyncapi.yaml is valid AsyncAPI 3.0, generated from the
models, and describes the messages workers and publishers really exchange on a real broker."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import jsonschema
import pytest
import yaml
from click.testing import CliRunner, Result

from mq_worker import schema
from mq_worker.cli import main
from mq_worker.events import EventType
from mq_worker.messages import RunMessage, parse_run
from mq_worker.publisher import Publisher, new_run
from mq_worker.status import send_ping
from mq_worker.topology import EVENTS_EXCHANGE, PING, PING_EXCHANGE, RUNS_EXCHANGE
from tests.contract import (
    ASYNCAPI_FILE,
    ASYNCAPI_SCHEMA_FILE,
    assert_events_conform,
    committed_document,
    message_for_routing_key,
    payload_validator,
)
from tests.helpers import (
    EventLog,
    VHost,
    probe,
    publish_raw,
    running_worker,
    started_runs,
    wait_until,
)


def asyncapi_validator() -> jsonschema.Validator:
    """The official AsyncAPI 3.0.0 JSON Schema (vendored from the @asyncapi/specs package)."""
    spec = json.loads(ASYNCAPI_SCHEMA_FILE.read_text())
    return jsonschema.Draft7Validator(spec)


def test_committed_document_is_what_the_models_generate() -> None:
    assert ASYNCAPI_FILE.read_text() == schema.asyncapi_yaml(), (
        "docs/asyncapi.yaml is stale: run `mq-worker schema --asyncapi > docs/asyncapi.yaml`")


def test_document_is_valid_asyncapi_3() -> None:
    document = committed_document()
    assert document["asyncapi"] == "3.0.0"
    validator = asyncapi_validator()
    errors = list(validator.iter_errors(document))
    assert not errors, errors[0].message

    # Examples are valid messages, for the document's schemas and for the worker's parser.
    for name in ("run", "cancel"):
        message = document["components"]["messages"][name]
        for example in message["examples"]:
            assert payload_validator(document, message).is_valid(example["payload"])
    assert parse_run(json.dumps(
        document["components"]["messages"]["run"]["examples"][0]["payload"]).encode())

    # The validator does look inside: a bad binding and a bad payload schema are caught.
    broken = copy.deepcopy(document)
    broken["channels"]["runs"]["bindings"]["amqp"]["exchange"]["type"] = "round-robin"
    assert not validator.is_valid(broken)
    broken = copy.deepcopy(document)
    broken["components"]["schemas"]["RunMessage"]["required"] = "id"
    assert not validator.is_valid(broken)


def test_yaml_output_round_trips() -> None:
    assert yaml.safe_load(schema.asyncapi_yaml()) == schema.asyncapi()
    tricky = {"a": ["yes", "no", "1.5", "", " x", "#c", "k: v", "line\nbreak", None, True, 3],
              "$ref": {}, "empty": [], "nested": [{"x": [1, {"y": "z"}]}, []]}
    assert yaml.safe_load(schema.to_yaml(tricky)) == tricky


def test_document_covers_every_routing_key_and_message() -> None:
    document = committed_document()
    addresses = {c["address"]: c["bindings"]["amqp"]["exchange"]["name"]
                 for c in document["channels"].values()}
    assert addresses["run.scheduled.{pool}.{queue}"] == RUNS_EXCHANGE
    assert addresses["run.cancel.{pool}"] == RUNS_EXCHANGE
    assert addresses["ping.{pool}"] == PING_EXCHANGE
    assert addresses["workers.{pool}"] == EVENTS_EXCHANGE
    assert addresses["control.{kind}"] == RUNS_EXCHANGE
    for event_type in [*EventType, PING]:
        assert addresses[str(event_type)] == EVENTS_EXCHANGE
    for operation in document["operations"].values():
        expected = "receive" if operation["channel"]["$ref"].split("/")[-1] in (
            "runs", "cancels", "control", "workerPing", "pings") else "send"
        assert operation["action"] == expected
    schemas = document["components"]["schemas"]
    assert set(schemas["RunMessage"]["properties"]) == set(RunMessage.model_fields)
    assert schemas["RunCompletedEvent"]["properties"]["data"] == {
        "$ref": "#/components/schemas/CompletedData"}
    assert "$defs" not in json.dumps(document)


def test_schema_command_prints_the_schemas() -> None:
    def run(*args: str) -> Result:
        return CliRunner().invoke(main, ["schema", *args])

    everything = json.loads(run().stdout)
    assert set(everything) == set(schema.schema_names())
    assert {"run", "cancel", "event", "mq_worker.run.completed"} <= set(everything)
    one = json.loads(run("run").stdout)
    assert one == everything["run"]
    assert one["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert json.loads(run("run.completed").stdout) == everything["mq_worker.run.completed"]
    assert run("--asyncapi").stdout == ASYNCAPI_FILE.read_text()
    missing = run("nothing")
    assert missing.exit_code == 2 and "no schema named 'nothing'" in missing.stderr

    # The standalone schemas accept real messages and refuse malformed ones.
    run_schema = jsonschema.Draft202012Validator(one)
    assert run_schema.is_valid(json.loads(new_run("true").model_dump_json()))
    assert not run_schema.is_valid({"id": "x", "tags": "a"})


@pytest.mark.anyio
async def test_messages_really_sent_follow_the_contract(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    """Run a worker through every outcome; every message on the wire validates."""
    connection = await aio_pika.connect(vhost.url)
    async with connection:
        channel = await connection.channel()
        runs_exchange = await channel.declare_exchange(RUNS_EXCHANGE, "topic", durable=True)
        wire = await channel.declare_queue(exclusive=True)
        await wire.bind(runs_exchange, "run.#")

        ok = new_run(probe(tmp_path), name="ok", tags=["t"], flow={"id": "f", "name": "flow"},
                     deployment={"id": "d", "name": "dep", "job_variables": {}})
        crash = new_run(probe(tmp_path, exit_code=3))
        unstartable = new_run("/no/such/executable")
        running = new_run(probe(tmp_path, sleep=300))
        held = new_run(probe(tmp_path),
                       scheduled_start_time=datetime.now(UTC) + timedelta(seconds=8))
        dropped = new_run(probe(tmp_path))
        retried = new_run(probe(tmp_path, exit_code=4), job_variables={"retries": 1})
        async with running_worker(vhost.url, heartbeat_seconds=1, limit=8), \
                Publisher(vhost.url) as publisher:
            for run in (ok, crash, unstartable, running, held, retried):
                await publisher.submit(run)
            await wait_until(lambda: str(running.id) in started_runs(tmp_path))
            await publisher.cancel(running.id, reason="contract test")
            await publisher.cancel(held.id)
            await publisher.cancel(dropped.id)
            await publisher.submit(dropped)
            await publish_raw(vhost.url, b"{not json")
            await publish_raw(vhost.url, {"id": "not-a-uuid"}, routing_key="run.cancel.default")
            await send_ping([vhost.url])
            runs = (ok, crash, unstartable, running, held, dropped, retried)
            await events.wait_terminal([r.id for r in runs], timeout=30)
            await events.wait_for(lambda evs: len(
                [e for e in evs if e.type == EventType.RUN_REJECTED]) == 2)
            await events.wait_for(lambda evs: len(
                [e for e in evs if e.type == EventType.WORKER_HEARTBEAT]) >= 2)
        await events.wait_for(lambda evs: any(e.type == EventType.WORKER_STOPPED for e in evs))

        # What publishers send: runs and cancels as the document describes them.
        document = committed_document()
        ours = {str(r.id) for r in runs}
        sent = 0
        while (message := await wire.get(fail=False, no_ack=True)) is not None:
            assert message.routing_key is not None
            try:
                body = json.loads(message.body)
            except json.JSONDecodeError:
                continue
            if body.get("id") not in ours:
                continue
            address = ("run.cancel.{pool}" if message.routing_key.startswith("run.cancel.")
                       else "run.scheduled.{pool}.{queue}")
            declared = message_for_routing_key(document, RUNS_EXCHANGE, address)
            assert message.content_type == declared["contentType"]
            payload = payload_validator(document, declared)
            assert payload.is_valid(body), (message.routing_key, body)
            sent += 1
        assert sent == 10  # 7 runs and 3 cancels (a retry goes through the delay ladder)

    outcomes = {str(r.id): events.terminal(r.id)[0].type for r in runs}
    assert list(outcomes.values()) == [
        EventType.RUN_COMPLETED, EventType.RUN_CRASHED, EventType.RUN_CRASHED,
        EventType.RUN_CANCELLED, EventType.RUN_CANCELLED, EventType.RUN_CANCELLED,
        EventType.RUN_CRASHED]
    seen = assert_events_conform(events.raw)
    completed = next(m for m in events.raw if m.routing_key == EventType.RUN_COMPLETED)
    tampered = json.loads(completed.body)
    tampered["data"]["run_id"] = "not-a-uuid"
    declared = message_for_routing_key(committed_document(), EVENTS_EXCHANGE,
                                       EventType.RUN_COMPLETED)
    assert not payload_validator(committed_document(), declared).is_valid(tampered)
    # worker.lost is checked where a worker is really lost (test_operations).
    # The ping went to its own exchange: subscribers of events never see it.
    assert seen == {str(t) for t in EventType} - {EventType.WORKER_LOST}
