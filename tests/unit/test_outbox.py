"""The outbox without a broker: order, confirmations, back-pressure, the spool behind it, and
handing a run's unconfirmed ending over to the worker-lost report.

A channel here is a stand-in that confirms (or refuses) each publish as RabbitMQ's would.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from mq_worker import confirmed_batch, socket_writes
from mq_worker.events import EventType, OutgoingEvent, build_event
from mq_worker.fencing import worker_lost_event_id
from mq_worker.outbox import Outbox
from mq_worker.spool import Spool
from mq_worker.topology import EVENTS_EXCHANGE
from tests.helpers.batch_channel import BatchChannel

RUN = "0b7a1c52-9a8e-4a59-8c0e-3d1c8f0f7a11"
OTHER = "5d6c2e14-1f0b-4b0e-9a55-7e2a9c3b8d22"


def _run_event(event_type: str, run_id: str, **data: object) -> OutgoingEvent:
    return build_event(event_type, source="test", subject=run_id,
                       data={"run_id": run_id, **data})


def _worker_lost(run_id: str) -> OutgoingEvent:
    return build_event(EventType.RUN_CRASHED, source="test", subject=run_id,
                       event_id=worker_lost_event_id("w1", run_id, "host:42"),
                       data={"run_id": run_id, "reason": "worker-lost"})


def _queued(tmp_path: Path) -> tuple[Outbox, list[OutgoingEvent]]:
    outbox = Outbox(spool=Spool(tmp_path / "w1.outbox.jsonl"))
    events = [
        _run_event(EventType.RUN_SUBMITTED, RUN),
        _run_event(EventType.RUN_COMPLETED, RUN, status_code=0),
        _run_event(EventType.RUN_COMPLETED, OTHER, status_code=0),
    ]
    for event in events:
        outbox.put(event)
    return outbox, events


def test_an_unconfirmed_ending_is_replaced_in_place_in_memory_and_spool(tmp_path: Path) -> None:
    outbox, (submitted, completed, other) = _queued(tmp_path)
    lost = _worker_lost(RUN)

    assert outbox.pending_terminal(RUN) == completed
    assert outbox.replace_unconfirmed(RUN, lost)

    assert outbox.pending_terminal(RUN) == lost
    restored = Spool(tmp_path / "w1.outbox.jsonl").load()
    assert [(e.id, e.type) for e in restored] == [
        (submitted.id, EventType.RUN_SUBMITTED),
        (lost.id, EventType.RUN_CRASHED),
        (other.id, EventType.RUN_COMPLETED),
    ]
    assert len(outbox) == 3
    outbox.close()


def test_an_unconfirmed_ending_is_dropped_when_a_peer_reported_the_run(tmp_path: Path) -> None:
    outbox, (submitted, _completed, other) = _queued(tmp_path)

    assert outbox.replace_unconfirmed(RUN, _worker_lost(RUN), drop=True)

    assert outbox.pending_terminal(RUN) is None
    restored = Spool(tmp_path / "w1.outbox.jsonl").load()
    assert [e.id for e in restored] == [submitted.id, other.id]
    assert len(outbox) == 2
    outbox.close()


def test_a_run_without_an_unconfirmed_ending_is_left_alone(tmp_path: Path) -> None:
    outbox = Outbox(spool=Spool(tmp_path / "w1.outbox.jsonl"))
    submitted = _run_event(EventType.RUN_SUBMITTED, RUN)
    rejected_cancel = _run_event(EventType.RUN_REJECTED, RUN, message_kind="cancel")
    outbox.put(submitted)
    outbox.put(rejected_cancel)

    assert not outbox.replace_unconfirmed(RUN, _worker_lost(RUN))
    assert not outbox.replace_unconfirmed(RUN, _worker_lost(RUN), drop=True)

    assert [e.id for e in Spool(tmp_path / "w1.outbox.jsonl").load()] == [
        submitted.id, rejected_cancel.id]
    outbox.close()


@dataclass
class ConfirmingChannel:
    """Confirms every publish, except the `refuse_at`-th (1-based) and those after it."""

    refuse_at: int | None = None
    published: list[tuple[str, str, str]] = field(default_factory=list)  # exchange, key, id

    async def basic_publish(self, body: bytes, *, exchange: str, routing_key: str,
                            properties: Any, **_: Any) -> None:
        await anyio.lowlevel.checkpoint()
        if self.refuse_at is not None and len(self.published) + 1 >= self.refuse_at:
            raise ConnectionError("connection lost before the confirm")
        self.published.append((exchange, routing_key, properties.message_id))


async def _publish_until_empty(outbox: Outbox, channel: ConfirmingChannel) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(outbox.publish_forever, channel)
        with anyio.fail_after(5):
            await outbox.wait_empty()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_events_go_out_in_order_and_leave_the_spool_once_confirmed(tmp_path: Path) -> None:
    outbox, events = _queued(tmp_path)
    channel = ConfirmingChannel()

    await _publish_until_empty(outbox, channel)

    assert channel.published == [(EVENTS_EXCHANGE, e.type, e.id) for e in events]
    assert outbox.published == 3 and len(outbox) == 0
    assert Spool(tmp_path / "w1.outbox.jsonl").load() == []
    outbox.close()


@pytest.mark.anyio
async def test_an_unconfirmed_event_and_those_after_it_wait_for_the_next_connection(
        tmp_path: Path) -> None:
    outbox, (_submitted, completed, other) = _queued(tmp_path)

    with pytest.raises(ConnectionError):
        await outbox.publish_forever(ConfirmingChannel(refuse_at=2))

    assert outbox.published == 1
    # The spool is append-only until it empties: confirmed events may be in it still
    # (published again after a restart, at least once), the unconfirmed ones must be.
    assert [e.id for e in Spool(tmp_path / "w1.outbox.jsonl").load()][-2:] == [
        completed.id, other.id]
    next_connection = ConfirmingChannel()
    await _publish_until_empty(outbox, next_connection)
    assert [message_id for _, _, message_id in next_connection.published] == [
        completed.id, other.id]
    assert outbox.published == 3
    outbox.close()


@pytest.mark.anyio
async def test_a_full_outbox_stops_new_runs_until_it_drains_below_four_fifths() -> None:
    pressure: list[bool] = []
    outbox = Outbox(capacity=5, on_pressure=pressure.append)
    for _ in range(4):
        outbox.put(_run_event(EventType.RUN_SUBMITTED, RUN))
    assert not outbox.under_pressure and pressure == []

    outbox.put(_run_event(EventType.RUN_SUBMITTED, RUN))
    outbox.put(_run_event(EventType.RUN_SUBMITTED, RUN))  # accepted all the same: never dropped

    assert outbox.under_pressure and pressure == [True] and len(outbox) == 6
    await _publish_until_empty(outbox, ConfirmingChannel())
    assert not outbox.under_pressure and pressure == [True, False]


@pytest.mark.anyio
async def test_events_left_in_the_spool_are_published_first_by_the_next_outbox(
        tmp_path: Path) -> None:
    spool_path = tmp_path / "w1.outbox.jsonl"
    first, (submitted, completed, other) = _queued(tmp_path)
    first.close()  # the worker stops before the broker confirmed anything

    second = Outbox(spool_path=spool_path)
    later = _run_event(EventType.RUN_SUBMITTED, OTHER)
    second.put(later)
    channel = ConfirmingChannel()
    await _publish_until_empty(second, channel)

    assert [message_id for _, _, message_id in channel.published] == [
        submitted.id, completed.id, other.id, later.id]
    second.close()


# -- handed to the connection in the caller's loop turn (`Outbox.send_now`) ------------


async def _idle(outbox: Outbox, channel: BatchChannel, tg: anyio.abc.TaskGroup) -> None:
    """Start the outbox's task on `channel` and let it reach its wait for events."""
    tg.start_soon(outbox.publish_forever, channel)
    await anyio.wait_all_tasks_blocked()


@pytest.mark.anyio
async def test_an_idle_outbox_hands_its_events_to_the_connection_in_the_callers_turn(
        tmp_path: Path) -> None:
    outbox = Outbox(spool=Spool(tmp_path / "w1.outbox.jsonl"))
    channel = BatchChannel()
    async with anyio.create_task_group() as tg:
        await _idle(outbox, channel, tg)
        outbox.put(_run_event(EventType.RUN_PENDING, RUN))
        outbox.put(_run_event(EventType.RUN_SUBMITTED, RUN))

        assert outbox.send_now()
        # No turn of the outbox's task in between: both are queued for the socket, once.
        assert channel.queued_event_types() == ["pending", "submitted"]
        await anyio.wait_all_tasks_blocked()
        assert channel.queued_event_types() == ["pending", "submitted"]
        assert outbox.published == 0 and len(outbox) == 2  # not confirmed yet

        channel.confirm_all()
        with anyio.fail_after(5):
            await outbox.wait_empty()
        assert outbox.published == 2 and channel.delivery_tag == 2
        assert Spool(tmp_path / "w1.outbox.jsonl").load() == []
        tg.cancel_scope.cancel()
    outbox.close()


@pytest.mark.anyio
async def test_events_sent_at_once_wait_for_the_batch_already_on_the_wire() -> None:
    """One batch on the wire at a time, as the outbox's task sends them."""
    outbox = Outbox()
    channel = BatchChannel()
    async with anyio.create_task_group() as tg:
        await _idle(outbox, channel, tg)
        outbox.put(_run_event(EventType.RUN_COMPLETED, OTHER, status_code=0))
        await anyio.wait_all_tasks_blocked()  # the outbox's task sends it
        channel.write_queue.get_nowait()
        outbox.put(_run_event(EventType.RUN_PENDING, RUN))

        assert not outbox.send_now()
        assert channel.queued_event_types() == []

        channel.confirm_all()
        await anyio.wait_all_tasks_blocked()
        assert channel.queued_event_types() == ["pending"]
        channel.confirm_all()
        with anyio.fail_after(5):
            await outbox.wait_empty()
        assert outbox.published == 2
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_events_sent_at_once_are_sent_again_on_the_next_connection_if_unconfirmed() -> None:
    outbox = Outbox()
    lost = BatchChannel()
    async with anyio.create_task_group() as tg:
        await _idle(outbox, lost, tg)
        outbox.put(_run_event(EventType.RUN_SUBMITTED, RUN))
        assert outbox.send_now()
        tg.cancel_scope.cancel()  # the session ends before the broker confirmed it
    assert len(outbox) == 1 and outbox.published == 0

    next_connection = BatchChannel()
    async with anyio.create_task_group() as tg:
        await _idle(outbox, next_connection, tg)
        assert next_connection.queued_event_types() == ["submitted"]
        next_connection.confirm_all()
        with anyio.fail_after(5):
            await outbox.wait_empty()
        tg.cancel_scope.cancel()
    assert outbox.published == 1 and next_connection.delivery_tag == 1


@pytest.mark.anyio
async def test_nothing_is_sent_at_once_without_a_connection_or_on_a_plain_channel() -> None:
    outbox = Outbox()
    outbox.put(_run_event(EventType.RUN_SUBMITTED, RUN))
    assert not outbox.send_now()  # no session
    async with anyio.create_task_group() as tg:
        tg.start_soon(outbox.publish_forever, ConfirmingChannel())
        await anyio.wait_all_tasks_blocked()
        outbox.put(_run_event(EventType.RUN_COMPLETED, RUN, status_code=0))
        assert not outbox.send_now()  # one publish at a time: left to the outbox's task
        with anyio.fail_after(5):
            await outbox.wait_empty()
        tg.cancel_scope.cancel()
    assert outbox.published == 2


@pytest.mark.anyio
async def test_nothing_is_sent_at_once_while_another_publish_holds_the_channels_lock() -> None:
    """It may have taken a delivery tag and wait to queue its frames: a publish now would
    reach the broker first, under a later tag."""
    outbox = Outbox()
    channel = BatchChannel()
    async with anyio.create_task_group() as tg:
        await _idle(outbox, channel, tg)
        async with channel.lock:
            outbox.put(_run_event(EventType.RUN_SUBMITTED, RUN))
            assert not outbox.send_now()
            assert channel.queued_event_types() == [] and channel.delivery_tag == 0
        await anyio.wait_all_tasks_blocked()  # the outbox's task publishes it
        assert channel.queued_event_types() == ["submitted"] and channel.delivery_tag == 1
        assert not channel.held.locked()
        channel.confirm_all()
        with anyio.fail_after(5):
            await outbox.wait_empty()
        tg.cancel_scope.cancel()


def _failing_write(channel: object, payload: bytes) -> bool:
    raise OSError("the write failed")


@pytest.mark.anyio
async def test_a_failed_write_now_gives_back_its_tags_and_the_lock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As `publish` when its frames are not queued: the broker never sees these tags, so
    the next publish must take them, or the broker's confirms go to the wrong events."""
    channel = BatchChannel()
    monkeypatch.setattr(socket_writes, "write_now", _failing_write)
    message = confirmed_batch.Message(EVENTS_EXCHANGE, "mq_worker.run.submitted", b"{}",
                                      "application/json", "id-1")

    with pytest.raises(OSError):
        confirmed_batch.publish_now(channel, [message])

    assert channel.delivery_tag == 0 and channel.confirmations == {}
    assert not channel.held.locked()


@pytest.mark.anyio
async def test_a_failure_to_send_now_is_left_to_the_outbox_task(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The run whose start called `send_now` is not hurt by it: its events go out as the
    outbox's task publishes them."""
    outbox = Outbox()
    channel = BatchChannel()
    async with anyio.create_task_group() as tg:
        await _idle(outbox, channel, tg)
        monkeypatch.setattr(socket_writes, "write_now", _failing_write)
        outbox.put(_run_event(EventType.RUN_PENDING, RUN))
        outbox.put(_run_event(EventType.RUN_SUBMITTED, RUN))

        assert not outbox.send_now()

        await anyio.wait_all_tasks_blocked()
        assert channel.queued_event_types() == ["pending", "submitted"]
        channel.confirm_all()
        with anyio.fail_after(5):
            await outbox.wait_empty()
        assert outbox.published == 2 and channel.delivery_tag == 2
        tg.cancel_scope.cancel()
