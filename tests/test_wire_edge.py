"""The AMQP edge under hostile or broken input, on a real broker.

Messages whose properties cannot be decoded, publishes the broker returns,
consumers the broker cancels, headers near the frame size, replayed signatures.
One bad message must cost at most that message: no connection loop, no lost run.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiormq
import anyio
import pytest
from pamqp import commands as spec

from mq_worker.topology import (
    CANCELS_STREAM,
    DEAD_QUEUE,
    DELAY_LEVELS,
    RUNS_EXCHANGE,
    delay_name,
)
from mq_worker.workers.process import ProcessWorker
from tests.helpers import (
    EventLog,
    VHost,
    management,
    probe,
    publish_raw,
    queue_deleted,
    queue_exists,
    ready_counts,
    run_body,
    running_worker,
    started_runs,
    until_no_run_left,
    until_ready,
    wait_until,
)

pytestmark = pytest.mark.anyio


class _FarFuture(datetime):
    """A timestamp a client stamped in microseconds: about 10**15 "seconds" on the wire."""

    def timestamp(self) -> float:
        return 10.0**15


WORK_QUEUE = "mq_worker.default.default"
POISON_TIME = _FarFuture(2000, 1, 1, tzinfo=UTC)


async def publish_amqp(
    url: str,
    body: bytes,
    *,
    exchange: str = RUNS_EXCHANGE,
    routing_key: str = "run.scheduled.default.default",
    properties: spec.Basic.Properties | None = None,
) -> None:
    """Publish with a raw AMQP client, any properties allowed (confirmed)."""
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        await channel.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                    properties=properties or spec.Basic.Properties())
    finally:
        await connection.close()


def reconnects(worker: ProcessWorker) -> float:
    return worker.metrics.reconnects._value.get()  # type: ignore[attr-defined,no-any-return]


def cancel_body(run_id: Any, reason: str = "test") -> bytes:
    return f'{{"id": "{run_id}", "reason": "{reason}"}}'.encode()


# -- 1. undecodable properties ---------------------------------------------------------


async def test_a_run_with_an_undecodable_timestamp_runs_without_breaking_the_connection(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    body = run_body(probe(tmp_path))
    header_body = run_body(probe(tmp_path))
    async with running_worker(vhost.url) as worker:
        await publish_amqp(vhost.url, orjson_dumps(body),
                           properties=spec.Basic.Properties(timestamp=POISON_TIME))
        await publish_amqp(vhost.url, orjson_dumps(header_body),
                           properties=spec.Basic.Properties(headers={"sent-at": POISON_TIME}))
        await events.wait_terminal([body["id"], header_body["id"]], timeout=30)
        assert reconnects(worker) == 0
    assert events.types(body["id"])[-1] == "run.completed"
    assert events.types(header_body["id"])[-1] == "run.completed"
    assert len(started_runs(tmp_path)) == 2


async def test_an_undecodable_cancel_costs_only_itself_for_running_and_new_workers(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    long_run = run_body(probe(tmp_path, sleep=60))
    async with running_worker(vhost.url) as worker:
        # The poison comes first in the stream: every worker replays it at start.
        poisoned_id = uuid.uuid4()
        await publish_amqp(vhost.url, cancel_body(poisoned_id), routing_key="run.cancel.default",
                           properties=spec.Basic.Properties(timestamp=POISON_TIME))
        await publish_amqp(vhost.url, orjson_dumps(long_run))
        await wait_until(lambda: long_run["id"] in started_runs(tmp_path), timeout=30)
        await publish_amqp(vhost.url, cancel_body(long_run["id"]),
                           routing_key="run.cancel.default")
        await events.wait_for(lambda _: events.types(long_run["id"])[-1:] == ["run.cancelled"],
                              timeout=30)
        assert reconnects(worker) == 0
        # A worker started after the poison replays it, and still starts.
        async with running_worker(vhost.url) as late:
            assert late._registry.get(uuid.UUID(long_run["id"])) is not None
            assert late._registry.get(poisoned_id) is not None
            assert reconnects(late) == 0


def orjson_dumps(value: Any) -> bytes:
    import json

    return json.dumps(value).encode()


@pytest.fixture
def strict_decoding() -> Any:
    """pamqp's own timestamp decoder, which raises: a frame no decoder could read."""
    from pamqp import decode

    saved = decode.METHODS["timestamp"], decode.TABLE_MAPPING[b"T"]
    decode.METHODS["timestamp"] = decode.TABLE_MAPPING[b"T"] = decode.timestamp
    try:
        yield
    finally:
        decode.METHODS["timestamp"], decode.TABLE_MAPPING[b"T"] = saved


async def test_the_cancel_follower_steps_past_an_offset_it_cannot_decode(
    vhost: VHost, strict_decoding: None
) -> None:
    async with running_worker(vhost.url) as worker:
        await publish_amqp(vhost.url, cancel_body(uuid.uuid4()), routing_key="run.cancel.default")
        await publish_amqp(vhost.url, cancel_body(uuid.uuid4()), routing_key="run.cancel.default",
                           properties=spec.Basic.Properties(timestamp=POISON_TIME))
        after = uuid.uuid4()
        await publish_amqp(vhost.url, cancel_body(after), routing_key="run.cancel.default")
        await wait_until(lambda: worker._registry.get(after) is not None, timeout=30)
        assert worker._cancels.skipped_offsets == 1


# -- 2. returned hand-offs ---------------------------------------------------------------


def _due_in(seconds: float) -> str:
    return datetime.fromtimestamp(time.time() + seconds, UTC).isoformat()


async def test_a_run_parked_while_the_ladder_is_deleted_is_not_lost(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    first = run_body(probe(tmp_path), scheduled_start_time=_due_in(4))
    second = run_body(probe(tmp_path), scheduled_start_time=_due_in(5))
    async with running_worker(vhost.url, prefetch_seconds=2) as worker:
        await publish_raw(vhost.url, first)
        await events.wait_terminal([first["id"]], timeout=30)
        # An operator deletes the ladder (as for a TopologyMismatch): the next park is returned.
        for level in range(DELAY_LEVELS):
            management("DELETE", f"/queues/{vhost.name}/{delay_name(level)}")
        await wait_until(lambda: queue_deleted(vhost.url, delay_name(DELAY_LEVELS - 1)))
        second["scheduled_start_time"] = _due_in(5)
        await publish_raw(vhost.url, second)
        await events.wait_terminal([second["id"]], timeout=30)
        assert reconnects(worker) == 0
    assert events.types(second["id"]) == ["run.pending", "run.submitted", "run.completed"]
    assert second["id"] in started_runs(tmp_path)


async def test_a_message_rejected_while_the_dead_queue_is_deleted_still_reaches_it(
    vhost: VHost, events: EventLog
) -> None:
    bad = {"id": str(uuid.uuid4()), "job_variables": {"undeclared": 1}}
    async with running_worker(vhost.url) as worker:
        management("DELETE", f"/queues/{vhost.name}/{DEAD_QUEUE}")
        await wait_until(lambda: queue_deleted(vhost.url, DEAD_QUEUE))
        await publish_raw(vhost.url, bad)
        await events.wait_for(lambda _: events.types(bad["id"]) == ["run.rejected"], timeout=30)
        await until_ready(vhost.url, {DEAD_QUEUE: 1})
        await until_no_run_left(vhost.url, [WORK_QUEUE], worker)
    assert await ready_counts(vhost.url, [WORK_QUEUE, DEAD_QUEUE]) == {WORK_QUEUE: 0,
                                                                       DEAD_QUEUE: 1}


# -- 12. headers near frame_max ----------------------------------------------------------


async def dead_letters(url: str) -> list[Any]:
    """Everything in mq_worker.dead right now (taken out of it)."""
    import aio_pika

    messages = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(DEAD_QUEUE, passive=True)
        while (message := await dead.get(no_ack=True, fail=False)) is not None:
            messages.append(message)
    return messages


def huge_headers(frame_max: int = 131_072, spare: int = 200) -> dict[str, Any]:
    """Headers whose content header frame is `spare` bytes short of `frame_max`."""
    from mq_worker.handoff import header_frame_size

    headers = {"note": "", "trace": "t" * 1000}
    size = header_frame_size(spec.Basic.Properties(headers=headers), 100)
    assert size is not None
    headers["note"] = "n" * (frame_max - spare - size)
    return headers


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned-worker", "signing-worker"])
async def test_a_message_with_headers_near_the_frame_size_is_rejected_cleanly(
    vhost: VHost, events: EventLog, tmp_path: Path, signed: bool
) -> None:
    settings: dict[str, Any] = {}
    if signed:
        key = tmp_path / "key"
        key.write_text("0123456789abcdef0123456789abcdef\n")
        settings["signing_key_file"] = key
    bad = {"id": str(uuid.uuid4()), "job_variables": {"undeclared": 1}}
    async with running_worker(vhost.url, **settings) as worker:
        await publish_amqp(vhost.url, orjson_dumps(bad),
                           properties=spec.Basic.Properties(headers=huge_headers()))
        # (a signing worker rejects it before reading its id)
        await events.wait_for(
            lambda evs: [e for e in evs if e.type == "mq_worker.run.rejected"], timeout=30)
        await until_no_run_left(vhost.url, [WORK_QUEUE], worker)
        assert reconnects(worker) == 0
    assert await ready_counts(vhost.url, [WORK_QUEUE]) == {WORK_QUEUE: 0}
    [letter] = await dead_letters(vhost.url)
    assert letter.body == orjson_dumps(bad)
    assert letter.headers["x-mq-worker-reason"]
    assert letter.headers["x-mq-worker-dropped-headers"] == 1
    assert letter.headers["trace"] == "t" * 1000
    assert "note" not in letter.headers


# -- 10. signatures bound to kind, pool and time -----------------------------------------

KEY = "0123456789abcdef0123456789abcdef"


async def stream_messages(url: str, count: int) -> list[Any]:
    """The first `count` messages of the cancel stream, as a client reads them."""
    import aio_pika

    taken: list[Any] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=100)
        stream = await channel.declare_queue(CANCELS_STREAM, passive=True)
        done = anyio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            if len(taken) < count:
                taken.append(message)
            if len(taken) == count:
                done.set()

        await stream.consume(on_message, arguments={"x-stream-offset": "first"})
        with anyio.fail_after(15):
            await done.wait()
    return taken


async def test_a_signed_cancel_replayed_as_a_run_and_a_run_as_a_cancel_are_refused(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    from mq_worker.publisher import Publisher, new_run

    key = tmp_path / "key"
    key.write_text(KEY + "\n")
    async with running_worker(vhost.url, signing_key_file=key), \
            Publisher(vhost.url, signing_key_file=key) as publisher:
        victim = await publisher.submit(new_run(probe(tmp_path, sleep=60)))
        await wait_until(lambda: str(victim.id) in started_runs(tmp_path), timeout=30)
        await publisher.cancel(uuid.uuid4(), reason="a cancel someone will replay")
        # Before it, the worker's two markers (the stream's end, then its replay's).
        [cancel] = [m for m in await stream_messages(vhost.url, 3) if m.body]
        # The signed cancel, body and headers untouched, published as a run.
        await publish_raw(vhost.url, cancel.body, headers=dict(cancel.headers))
        await events.wait_for(lambda evs: [e for e in evs if e.type == "mq_worker.run.rejected"],
                              timeout=30)
        # A signed run's body and headers published as a cancel of that very run.
        run_body_bytes = victim.model_dump_json(exclude_none=True).encode()
        from mq_worker.signing import Signer

        as_run = Signer([KEY.encode()]).headers(run_body_bytes, kind="run", pool="default")
        await publish_raw(vhost.url, run_body_bytes, routing_key="run.cancel.default",
                          headers=as_run)
        await events.wait_for(
            lambda evs: [e for e in evs if e.type == "mq_worker.run.rejected"
                         and e.data["message_kind"] == "cancel"], timeout=30)
        assert not events.terminal(victim.id)
        await publisher.cancel(victim.id, reason="the real one")
        await events.wait_terminal([victim.id], timeout=30)
    [replayed] = [e for e in events.events if e.type == "mq_worker.run.rejected"
                  and e.data["message_kind"] == "run"]
    assert replayed.data["reason"].startswith("forged message")
    assert set(started_runs(tmp_path)) == {str(victim.id)}
    assert events.terminal(victim.id)[0].data["reason"] == "the real one"
    assert len(await dead_letters(vhost.url)) == 1


async def test_signatures_for_another_pool_too_old_or_v1_only_are_refused(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    from mq_worker.signing import Signer

    key = tmp_path / "key"
    key.write_text(KEY + "\n")
    signer = Signer([KEY.encode()])
    cases: dict[str, tuple[bytes, dict[str, Any], str]] = {}
    for case, reason in (("other pool", "forged message"), ("old", "expired signature"),
                         ("future", "expired signature"), ("v1 only", "unsigned message"),
                         ("good", ""), ("due later", "")):
        body = run_body(probe(tmp_path))
        if case == "due later":  # issued long ago, but due soon: its age counts from then
            body["scheduled_start_time"] = _due_in(1)
        raw = orjson_dumps(body)
        now = int(time.time())
        headers: dict[str, Any] = {
            "other pool": signer.headers(raw, kind="run", pool="another"),
            "old": signer.headers(raw, kind="run", pool="default", issued_at=now - 8 * 86400),
            "future": signer.headers(raw, kind="run", pool="default", issued_at=now + 3600),
            "v1 only": {"x-mq-worker-signature": signer.signature(raw)},
            "good": signer.headers(raw, kind="run", pool="default"),
            "due later": signer.headers(raw, kind="run", pool="default",
                                        issued_at=now - 30 * 86400),
        }[case]
        cases[case] = (raw, headers, reason)
    ids = {case: orjson_loads(raw)["id"] for case, (raw, _, _) in cases.items()}
    async with running_worker(vhost.url, signing_key_file=key, prefetch_seconds=5):
        for raw, headers, _ in cases.values():
            await publish_raw(vhost.url, raw, headers=headers)
        await events.wait_terminal([ids["good"], ids["due later"]], timeout=30)
        await events.wait_for(lambda evs: len(
            [e for e in evs if e.type == "mq_worker.run.rejected"]) == 4, timeout=30)
    reasons = sorted(e.data["reason"] for e in events.events
                     if e.type == "mq_worker.run.rejected")
    expected = sorted(reason for _, _, reason in cases.values() if reason)
    assert [r.split(":")[0] for r in reasons] == expected, reasons
    assert "v1" in next(r for r in reasons if r.startswith("unsigned"))
    assert set(started_runs(tmp_path)) == {ids["good"], ids["due later"]}
    assert len(await dead_letters(vhost.url)) == 4


def orjson_loads(raw: bytes) -> Any:
    import json

    return json.loads(raw)


# -- 5. the cancel stream's consumer -------------------------------------------------------


async def test_a_deleted_cancel_stream_is_declared_and_followed_again(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    from mq_worker.publisher import Publisher, new_run

    async with running_worker(vhost.url) as worker, Publisher(vhost.url) as publisher:
        run = await publisher.submit(new_run(probe(tmp_path, sleep=60)))
        await wait_until(lambda: str(run.id) in started_runs(tmp_path), timeout=30)
        management("DELETE", f"/queues/{vhost.name}/{CANCELS_STREAM}")
        await wait_until(lambda: queue_deleted(vhost.url, CANCELS_STREAM))
        # The worker notices that the broker cancelled its consumer, declares the stream
        # again and follows it.
        await wait_until(lambda: queue_exists(vhost.url, CANCELS_STREAM), timeout=30)
        await wait_until(lambda: worker.connected, timeout=30)
        await publisher.cancel(run.id, reason="after the stream came back")
        await events.wait_terminal([run.id], timeout=30)
    [outcome] = events.terminal(run.id)
    assert outcome.type == "mq_worker.run.cancelled"


async def test_a_stream_recreated_while_disconnected_does_not_stall_the_worker(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    from mq_worker.publisher import Publisher, new_run
    from tests.helpers import HOST, PORT
    from tests.proxy import link_proxy

    async with link_proxy(HOST, PORT) as proxy, Publisher(vhost.url) as publisher:
        url = vhost.url_for("guest", "guest", port=proxy.port)
        async with running_worker(url) as worker:
            run = await publisher.submit(new_run(probe(tmp_path, sleep=60)))
            await wait_until(lambda: str(run.id) in started_runs(tmp_path), timeout=30)
            for _ in range(5):  # the worker's position in the stream moves past offset 5
                await publisher.cancel(uuid.uuid4())
            await wait_until(lambda: len(worker._registry) == 5)
            proxy.cut()
            management("DELETE", f"/queues/{vhost.name}/{CANCELS_STREAM}")
            async with Publisher(vhost.url) as fresh:  # declares the stream again: one message
                await fresh.cancel(uuid.uuid4())
            await proxy.restore()
            await publisher.cancel(run.id, reason="in the new stream")
            await events.wait_terminal([run.id], timeout=60)
    [outcome] = events.terminal(run.id)
    assert outcome.type == "mq_worker.run.cancelled"



# -- 9. a cancel whose acknowledgement fails -------------------------------------------------


async def test_a_cancel_whose_ack_fails_is_still_recorded(vhost: VHost) -> None:
    from mq_worker.cancellation import CancelFollower, CancelRecord, CancelRegistry
    from mq_worker.publisher import Publisher

    run_id = uuid.uuid4()
    async with Publisher(vhost.url) as publisher:
        await publisher.cancel(run_id, reason="acked on a closing channel")
    connection = await aiormq.connect(vhost.url)
    try:
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=10)
        received: list[aiormq.abc.DeliveredMessage] = []
        got = anyio.Event()

        async def keep(message: aiormq.abc.DeliveredMessage) -> None:
            received.append(message)
            got.set()

        await channel.basic_consume(CANCELS_STREAM, keep,
                                    arguments={"x-stream-offset": "first"})
        with anyio.fail_after(15):
            await got.wait()
        await channel.close()  # the delivery's channel closes before it is handled
        reported: list[CancelRecord] = []
        follower = CancelFollower(pool="default", registry=CancelRegistry(),
                                  on_cancel=reported.append, on_invalid=lambda *_: None,
                                  max_bytes=1 << 20)
        follower._caught_up.set()
        await follower._on_message(received[0])
    finally:
        await connection.close()
    assert [r.run_id for r in reported] == [run_id]
    assert follower._next_offset == 1


# -- 17. confirms that never come -----------------------------------------------------------


async def test_events_whose_confirms_are_lost_are_published_again_on_a_new_connection(
    vhost: VHost, events: EventLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.helpers import HOST, PORT
    from tests.proxy import link_proxy

    # The 15 s it waits for a confirm in production, shortened so the test waits less.
    monkeypatch.setattr("mq_worker.outbox.CONFIRM_TIMEOUT", 3.0)

    gate = tmp_path / "frozen"  # the run ends once the link is frozen, never before
    body = run_body(probe(tmp_path, extra=f"--gate {gate}"))
    async with link_proxy(HOST, PORT) as proxy:
        # AMQP heartbeats far apart: only a confirm timeout can notice the silence.
        url = vhost.url_for("guest", "guest", port=proxy.port) + "?heartbeat=600"
        async with running_worker(url) as worker:
            await publish_raw(vhost.url, body)
            await wait_until(lambda: body["id"] in started_runs(tmp_path), timeout=30)
            proxy.freeze()  # the broker still receives, the worker hears nothing back
            gate.touch()
            await events.wait_terminal([body["id"]], timeout=30)
            await wait_until(lambda: len(worker._outbox) == 0, timeout=60)
            assert reconnects(worker) >= 1


# -- 18. numeric start times ------------------------------------------------------------------


async def test_a_numeric_start_time_is_unix_seconds_and_anything_ambiguous_is_rejected(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    far = run_body(probe(tmp_path), scheduled_start_time=253402300799)  # 9999-12-31, not 1978
    soon_at = time.time() + 3
    soon = run_body(probe(tmp_path), scheduled_start_time=soon_at)
    as_text = run_body(probe(tmp_path), scheduled_start_time="253402300799")
    as_bool = run_body(probe(tmp_path), scheduled_start_time=True)
    async with running_worker(vhost.url, prefetch_seconds=10) as worker:
        for body in (far, soon, as_text, as_bool):
            await publish_raw(vhost.url, body)
        await events.wait_terminal([soon["id"], as_text["id"], as_bool["id"]], timeout=30)
        await wait_until(lambda: worker.metrics.parked.labels("default", "default")._value.get()
                         == 1, timeout=15)
    assert far["id"] not in started_runs(tmp_path)
    assert not events.of(far["id"])  # parked until year 9999
    assert events.types(soon["id"]) == ["run.pending", "run.submitted", "run.completed"]
    assert started_runs(tmp_path)[soon["id"]]["t"] >= soon_at
    for body in (as_text, as_bool):
        [rejected] = events.terminal(body["id"])
        assert rejected.type == "mq_worker.run.rejected"
        assert rejected.data["reason"].startswith("scheduled_start_time"), rejected.data


async def test_a_legacy_signing_publisher_signs_for_old_and_new_workers(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    import hashlib
    import hmac

    from mq_worker.publisher import Publisher, new_run

    key = tmp_path / "key"
    key.write_text(KEY + "\n")
    async with Publisher(vhost.url, signing_key_file=key, legacy_signature=True) as publisher:
        run = await publisher.submit(new_run(probe(tmp_path)))
    import aio_pika

    connection = await aio_pika.connect(vhost.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue("mq_worker.default.default", passive=True)
        message = await queue.get(no_ack=True)
    # What a worker of an earlier version checks: the HMAC of the body alone.
    legacy = "sha256=" + hmac.new(KEY.encode(), message.body, hashlib.sha256).hexdigest()
    assert message.headers["x-mq-worker-signature"] == legacy
    async with running_worker(vhost.url, signing_key_file=key):
        await publish_raw(vhost.url, message.body, headers=dict(message.headers))
        await events.wait_terminal([run.id], timeout=30)
    assert events.types(run.id)[-1] == "run.completed"


async def test_a_publisher_parking_into_a_deleted_ladder_hands_the_run_to_its_pool(
    vhost: VHost, events: EventLog, tmp_path: Path
) -> None:
    from datetime import timedelta

    from mq_worker.publisher import Publisher, new_run

    async with running_worker(vhost.url, prefetch_seconds=2), \
            Publisher(vhost.url, park_after_seconds=1) as publisher:
        # Parked by the publisher, which declares the ladder for it.
        first = await publisher.submit(new_run(
            probe(tmp_path), scheduled_start_time=datetime.now(UTC) + timedelta(seconds=3)))
        await events.wait_terminal([first.id], timeout=30)
        for level in range(DELAY_LEVELS):
            management("DELETE", f"/queues/{vhost.name}/{delay_name(level)}")
        await wait_until(lambda: queue_deleted(vhost.url, delay_name(DELAY_LEVELS - 1)))
        due = datetime.now(UTC) + timedelta(seconds=6)
        run = await publisher.submit(new_run(probe(tmp_path), scheduled_start_time=due))
        await events.wait_terminal([run.id], timeout=30)
    assert events.types(run.id) == ["run.pending", "run.submitted", "run.completed"]
    assert started_runs(tmp_path)[str(run.id)]["t"] >= due.timestamp()
