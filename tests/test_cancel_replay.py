"""A worker starting with no snapshot replays the whole cancel window: it must know every cancel.

The replay reads the stream on connections of its own (mq_worker.stream_replay), a long
window in several ranges at once (mq_worker.cancel_replay); a replay that stops short
hands over to the usual consumer, which reads on.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import aiormq
import aiormq.exceptions
import anyio
import pytest
from pamqp import commands as spec

from mq_worker import cancel_replay, cancel_snapshots, stream_frames
from mq_worker.cancel_registry import CancelRecord, CancelRegistry
from mq_worker.topology import (
    CANCELS_STREAM,
    RUNS_EXCHANGE,
    QueueOptions,
    cancel_snapshot_stream_name,
    declare_cancel_snapshot_stream,
    declare_cancel_stream,
    declare_exchanges,
)
from mq_worker.workers.process import ProcessWorker
from tests.helpers import (
    VHost,
    management,
    queue_deleted,
    queue_exists,
    running_worker,
    wait_until,
    worker_settings,
)

pytestmark = pytest.mark.anyio

WINDOW = 3_000
SNAPSHOTS = cancel_snapshot_stream_name("default")
# Snapshots of windows this long, checked for this often: what they do does not depend on
# the length of the window, and a reporter checking every CHECK_SECONDS (5 s) would make
# each test wait for nothing (100,000 cancels: test_scale, marked slow).
SNAPSHOT_EVERY = 1_000


@pytest.fixture
def snapshots_often(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cancel_snapshots, "SNAPSHOT_EVERY", SNAPSHOT_EVERY)
    monkeypatch.setattr(cancel_snapshots, "CHECK_SECONDS", 0.1)


async def _publish(url: str, bodies: list[tuple[bytes, str]]) -> None:
    """Publish (body, routing key) pairs; return once the broker confirmed the last."""
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        await declare_exchanges(channel)
        await declare_cancel_stream(channel, QueueOptions())
        for index, (body, key) in enumerate(bodies):
            await channel.basic_publish(body, exchange=RUNS_EXCHANGE, routing_key=key,
                                        properties=spec.Basic.Properties(),
                                        wait=index == len(bodies) - 1)
    finally:
        await connection.close()


async def _window(url: str) -> dict[uuid.UUID, str | None]:
    """Publish a window: cancels of this pool (every tenth with a reason), cancels of
    another pool and a body that is not a cancel; return this pool's, with their reasons."""
    ours = {uuid.uuid4(): (f"reason {n}" if n % 10 == 0 else None) for n in range(WINDOW)}
    bodies = [(json.dumps({"id": str(run_id), **({"reason": reason} if reason else {})})
               .encode(), "run.cancel.default") for run_id, reason in ours.items()]
    bodies[100:100] = [(json.dumps({"id": str(uuid.uuid4())}).encode(), "run.cancel.other")
                       for _ in range(50)]
    bodies.insert(200, (b"not a cancel", "run.cancel.default"))
    await _publish(url, bodies)
    return ours


def _held(worker: Any) -> dict[uuid.UUID, str | None]:
    return {record.run_id: record.reason for record in worker._registry.records()}


async def test_a_worker_starting_with_no_snapshot_knows_every_cancel_of_the_window(
    vhost: VHost,
) -> None:
    published = await _window(vhost.url)
    async with running_worker(vhost.url) as worker:
        assert _held(worker) == published
        assert worker._cancels.replayed == WINDOW
        assert worker._cancels.fast_replays_stopped == 0
        # The replay's connection is closed once it has read the window.
        assert not [props for _, props in vhost.connections() if "cancel replay" in props]
        # A cancel published now is followed by the usual consumer.
        late = uuid.uuid4()
        await _publish(vhost.url, [(json.dumps({"id": str(late)}).encode(),
                                    "run.cancel.default")])
        await wait_until(lambda: worker._registry.get(late) is not None, timeout=30)


async def test_a_replay_stopped_midway_hands_over_and_loses_no_cancel(
    vhost: VHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = await _window(vhost.url)
    feed = stream_frames.FrameReader.feed
    delivered = [0]

    def breaking_feed(self: stream_frames.FrameReader, data: bytes) -> list[Any]:
        items = feed(self, data)
        delivered[0] += len(items)
        if delivered[0] > WINDOW // 3:
            raise stream_frames.FrameError("cut short by the test")
        return items

    monkeypatch.setattr(stream_frames.FrameReader, "feed", breaking_feed)
    async with running_worker(vhost.url) as worker:
        assert worker._cancels.fast_replays_stopped == 1
        assert _held(worker) == published


async def test_a_snapshot_of_a_deleted_cancel_stream_is_not_trusted_on_its_successor(
    vhost: VHost, snapshots_often: None,
) -> None:
    old = [uuid.uuid4() for _ in range(SNAPSHOT_EVERY)]
    await _publish(vhost.url, [(json.dumps({"id": str(r)}).encode(), "run.cancel.default")
                               for r in old])
    async with running_worker(vhost.url):
        # Its pool's reporter, it snapshots the window it replayed.
        await _snapshot_published(vhost.url)
    # An operator deletes the cancel stream; it is declared again and fills up again,
    # past the offset the snapshot covers up to.
    management("DELETE", f"/queues/{vhost.name}/{CANCELS_STREAM}")
    await wait_until(lambda: queue_deleted(vhost.url, CANCELS_STREAM))
    new = [uuid.uuid4() for _ in range(SNAPSHOT_EVERY + 100)]
    await _publish(vhost.url, [(json.dumps({"id": str(r)}).encode(), "run.cancel.default")
                               for r in new])
    async with running_worker(vhost.url) as joining:
        held = _held(joining)
        assert not [r for r in new if r not in held], "cancels of the new stream missed"


async def test_a_window_snapshotted_in_parts_is_restored_whole_by_a_joining_worker(
    vhost: VHost, monkeypatch: pytest.MonkeyPatch, snapshots_often: None,
) -> None:
    # Parts of 300 cancels: a window of SNAPSHOT_EVERY is snapshotted in four.
    monkeypatch.setattr(cancel_snapshots, "PART_CANCELS", 300)
    early = [uuid.uuid4() for _ in range(SNAPSHOT_EVERY)]
    await _publish(vhost.url, [(json.dumps({"id": str(r)}).encode(), "run.cancel.default")
                               for r in early])
    async with running_worker(vhost.url):
        await _snapshot_published(vhost.url, messages=4)
    late = uuid.uuid4()
    await _publish(vhost.url, [(json.dumps({"id": str(late)}).encode(), "run.cancel.default")])
    async with running_worker(vhost.url) as joining:
        assert set(_held(joining)) == {*early, late}
        # From the snapshot: it read only the stream's tail.
        assert joining._cancels.replayed < 10


def _interrupting_feed(monkeypatch: pytest.MonkeyPatch, interrupt: Any) -> list[int]:
    """Make the replay call `interrupt()` once, after its first deliveries."""
    feed = stream_frames.FrameReader.feed
    calls: list[int] = []

    def feed_then_interrupt(self: stream_frames.FrameReader, data: bytes) -> list[Any]:
        items = feed(self, data)
        if not calls and any(isinstance(i, stream_frames.Delivery) for i in items):
            calls.append(len(items))
            interrupt()
        return items

    monkeypatch.setattr(stream_frames.FrameReader, "feed", feed_then_interrupt)
    return calls


async def test_a_replay_whose_connection_is_closed_hands_over_and_loses_no_cancel(
    vhost: VHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = await _window(vhost.url)
    calls = _interrupting_feed(monkeypatch, lambda: vhost.close_connections("cancel replay"))
    async with running_worker(vhost.url) as worker:
        assert calls, "the replay never read a delivery"
        assert worker._cancels.fast_replays_stopped == 1
        assert _held(worker) == published


async def test_a_cancel_stream_deleted_during_the_replay_is_declared_and_read_again(
    vhost: VHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _window(vhost.url)
    calls = _interrupting_feed(
        monkeypatch, lambda: management("DELETE", f"/queues/{vhost.name}/{CANCELS_STREAM}"))
    async with running_worker(vhost.url) as worker:
        assert calls, "the replay never read a delivery"
        # The session that lost its stream ended; the next one declared it again.
        assert worker.metrics.reconnects._value.get() >= 1  # type: ignore[attr-defined]
        await wait_until(lambda: queue_exists(vhost.url, CANCELS_STREAM), timeout=30)
        late = uuid.uuid4()
        await _publish(vhost.url, [(json.dumps({"id": str(late)}).encode(),
                                    "run.cancel.default")])
        await wait_until(lambda: worker._registry.get(late) is not None, timeout=60)


async def _snapshot_published(url: str, messages: int = 1) -> None:
    """Return once the pool's snapshot stream has delivered `messages` messages (not the
    management API's count, which lags by seconds)."""
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        arrived: list[bytes] = []

        async def on_message(message: Any) -> None:
            arrived.append(message.body)

        async def subscribed() -> bool:
            try:
                await channel.basic_qos(prefetch_count=messages)
                await channel.basic_consume(SNAPSHOTS, on_message,
                                            arguments={"x-stream-offset": "first"})
                return True
            except aiormq.exceptions.ChannelNotFoundEntity:
                return False

        while not await subscribed():  # not declared yet: try on a new channel
            channel = await connection.channel()
            await anyio.sleep(0.2)
        await wait_until(lambda: len(arrived) >= messages, timeout=120)
    finally:
        await connection.close()


async def test_a_worker_joining_just_after_a_snapshot_starts_from_it(
    vhost: VHost, snapshots_often: None,
) -> None:
    early = [uuid.uuid4() for _ in range(SNAPSHOT_EVERY)]
    await _publish(vhost.url, [(json.dumps({"id": str(r)}).encode(), "run.cancel.default")
                               for r in early])
    async with running_worker(vhost.url):
        await _snapshot_published(vhost.url)
        # At once: the broker's count of the snapshot stream still says 0.
        async with running_worker(vhost.url) as joining:
            assert set(_held(joining)) == set(early)
            assert joining._cancels.replayed < 10, "replayed the window, not the snapshot"



async def test_a_cold_worker_of_a_pool_that_never_had_a_snapshot_does_not_wait_for_one(
    vhost: VHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A window long enough for snapshots and none ever taken: the wait for a snapshot the
    # broker does not count yet, made longer than a worker may take to start, is not paid.
    monkeypatch.setattr(cancel_snapshots, "SNAPSHOT_EVERY", WINDOW // 2)
    monkeypatch.setattr(cancel_snapshots, "EMPTY_READ_TIMEOUT", 120.0)
    published = await _window(vhost.url)
    async with running_worker(vhost.url) as worker:
        assert _held(worker) == published
        assert worker._cancels.replayed == WINDOW



async def test_a_snapshot_published_while_a_worker_waits_for_one_is_read(
    vhost: VHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pool's snapshot stream exists but the broker counts it empty: the reader waits.
    monkeypatch.setattr(cancel_snapshots, "EMPTY_READ_TIMEOUT", 60.0)
    registry = CancelRegistry()
    cancelled = uuid.uuid4()
    registry.add(CancelRecord(cancelled, "by the test", time.time()))
    connection = await aiormq.connect(vhost.url)
    try:
        await declare_cancel_snapshot_stream(await connection.channel(), "default")
        read: list[cancel_snapshots.Snapshot | None] = []

        async def reader() -> None:
            read.append(await cancel_snapshots.read_newest(
                connection, "default", registry.window_seconds))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                await cancel_snapshots.publish(connection, registry, pool="default",
                                               next_offset=7, last_message="")
    finally:
        await connection.close()
    assert read[0] is not None and read[0].next_offset == 7
    assert [key for key, _, _, _ in read[0].rows()] == [cancelled.int]


async def test_a_snapshot_published_just_now_is_read_though_no_worker_of_the_pool_is_left(
    vhost: VHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reporter published it and stopped: the broker does not count it for seconds yet.
    monkeypatch.setattr(cancel_snapshots, "EMPTY_READ_TIMEOUT", 60.0)
    registry = CancelRegistry()
    cancelled = uuid.uuid4()
    registry.add(CancelRecord(cancelled, None, time.time()))
    connection = await aiormq.connect(vhost.url)
    try:
        await cancel_snapshots.publish(connection, registry, pool="default", next_offset=7,
                                       last_message="")
        with anyio.fail_after(30):
            read = await cancel_snapshots.read_newest(connection, "default",
                                                      registry.window_seconds)
    finally:
        await connection.close()
    assert read is not None and [key for key, _, _, _ in read.rows()] == [cancelled.int]


async def test_workers_of_a_pool_starting_together_each_know_every_cancel(
    vhost: VHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Long enough for snapshots: whichever is elected first may take one while the other
    # still catches up.
    monkeypatch.setattr(cancel_snapshots, "SNAPSHOT_EVERY", WINDOW // 2)
    published = await _window(vhost.url)
    workers = [ProcessWorker(worker_settings(vhost.url)) for _ in range(2)]
    late = uuid.uuid4()
    async with anyio.create_task_group() as tg:
        for worker in workers:
            tg.start_soon(worker.serve)
        # A cancel published while they start.
        await _publish(vhost.url, [(json.dumps({"id": str(late)}).encode(),
                                    "run.cancel.default")])
        try:
            with anyio.fail_after(60):
                for worker in workers:
                    await worker.ready.wait()
            await wait_until(lambda: all(w._registry.get(late) for w in workers), timeout=30)
            for worker in workers:
                assert {run_id: reason for run_id, reason in _held(worker).items()
                        if run_id != late} == published
        finally:
            for worker in workers:
                worker.stop(force=True)


# The window above read in ranges: 3,051 messages and a marker, in four ranges.
RANGES = 4


@pytest.fixture
def in_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cancel_replay, "READERS", RANGES)
    monkeypatch.setattr(cancel_replay, "MIN_PER_READER", 500)


def _breaking_one_reader(monkeypatch: pytest.MonkeyPatch, after: int,
                         then: Any = None) -> list[int]:
    """Make one of the replay's connections (the first to pass `after` deliveries) fail:
    `then()` is called then if given, else its frames are refused as malformed."""
    feed = stream_frames.FrameReader.feed
    seen: dict[int, int] = {}
    broken: list[int] = []

    def feed_and_break(self: stream_frames.FrameReader, data: bytes) -> list[Any]:
        items = feed(self, data)
        count = seen[id(self)] = seen.get(id(self), 0) + len(items)
        if not broken and count > after:
            broken.append(id(self))
            if then is None:
                raise stream_frames.FrameError("cut short by the test")
            then()
        return items

    monkeypatch.setattr(stream_frames.FrameReader, "feed", feed_and_break)
    return broken


@pytest.mark.usefixtures("in_ranges")
async def test_a_window_read_in_ranges_gives_every_cancel_once(vhost: VHost) -> None:
    published = await _window(vhost.url)
    async with running_worker(vhost.url) as worker:
        assert worker._cancels.replay_readers == RANGES
        assert worker._cancels.fast_replays_stopped == 0
        assert _held(worker) == published
        assert worker._cancels.replayed == WINDOW  # none read twice across a boundary
        assert not [props for _, props in vhost.connections() if "cancel replay" in props]
        late = uuid.uuid4()
        await _publish(vhost.url, [(json.dumps({"id": str(late)}).encode(),
                                    "run.cancel.default")])
        await wait_until(lambda: worker._registry.get(late) is not None, timeout=30)


@pytest.mark.usefixtures("in_ranges")
async def test_a_range_cut_short_hands_over_and_loses_no_cancel(
    vhost: VHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = await _window(vhost.url)
    broken = _breaking_one_reader(monkeypatch, after=300)
    async with running_worker(vhost.url) as worker:
        assert broken, "no range reader was cut short"
        assert worker._cancels.replay_readers == RANGES
        assert worker._cancels.fast_replays_stopped == 1
        assert _held(worker) == published
        # The usual consumer stepped over what the other ranges had read.
        assert worker._cancels.replayed == WINDOW


@pytest.mark.usefixtures("in_ranges")
async def test_ranges_whose_connections_the_broker_closes_lose_no_cancel(
    vhost: VHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = await _window(vhost.url)
    # Little credit: the broker's close comes before a range has all been sent.
    monkeypatch.setattr(cancel_replay, "PREFETCH", 50)
    closed: list[int] = []
    # The broker closes every range's connection still open (the reader's own at least).
    broken = _breaking_one_reader(
        monkeypatch, after=300,
        then=lambda: closed.append(vhost.close_connections("cancel replay")))
    async with running_worker(vhost.url) as worker:
        assert broken and closed and closed[0] >= 1, "no range's connection was closed"
        assert worker._cancels.fast_replays_stopped == 1
        assert _held(worker) == published
        assert worker._cancels.replayed == WINDOW


@pytest.mark.usefixtures("in_ranges")
async def test_a_cancel_stream_deleted_while_read_in_ranges_is_declared_and_read_again(
    vhost: VHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _window(vhost.url)
    monkeypatch.setattr(cancel_replay, "PREFETCH", 50)  # deleted before all was sent
    broken = _breaking_one_reader(
        monkeypatch, after=300,
        then=lambda: management("DELETE", f"/queues/{vhost.name}/{CANCELS_STREAM}"))
    async with running_worker(vhost.url) as worker:
        assert broken, "the stream was not deleted during the replay"
        assert worker.metrics.reconnects._value.get() >= 1  # type: ignore[attr-defined]
        await wait_until(lambda: queue_exists(vhost.url, CANCELS_STREAM), timeout=30)
        late = uuid.uuid4()
        await _publish(vhost.url, [(json.dumps({"id": str(late)}).encode(),
                                    "run.cancel.default")])
        await wait_until(lambda: worker._registry.get(late) is not None, timeout=60)

