"""The replay's frame parser, fed bytes recorded from RabbitMQ and frames built by pamqp."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from pamqp import commands as spec
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from mq_worker.stream_frames import Delivery, FrameError, FrameReader, Method

# What RabbitMQ 3.10 sent a replay (mq_worker.stream_replay) of a cancel stream holding:
# a cancel with a timestamp, one with a reason and headers, another pool's cancel, a body
# that is not JSON, an empty body, then the marker (published to the stream directly);
# from connection.start to connection.close-ok.
RECORDED = (Path(__file__).parent.parent / "data" / "cancel_stream_replay.bin").read_bytes()


def _summary(items: list[Delivery | Method]) -> list[tuple[object, ...]]:
    return [(type(i.method).__name__,) if isinstance(i, Method)
            else (i.delivery_tag, i.routing_key, i.headers, i.timestamp, i.body) for i in items]


EXPECTED = [
    ("Start",), ("Tune",), ("OpenOk",), ("OpenOk",), ("QosOk",), ("ConsumeOk",),
    (1, "run.cancel.default", {"x-stream-offset": 0},
     datetime(2026, 11, 30, 4, tzinfo=UTC).timestamp(),
     b'{"id": "6f1c5d8e-3b7a-4c1e-9f7d-2a4b6c8d0e1f"}'),
    (2, "run.cancel.default", {"n": 5, "x-mq-worker-signature": "abc", "x-stream-offset": 1},
     None, '{"id": "0b9a8c7d-6e5f-4a3b-8c2d-1e0f9a8b7c6d", "reason": "réason"}'.encode()),
    (3, "run.cancel.other", {"x-stream-offset": 2}, None,
     b'{"id": "11111111-2222-4333-8444-555555555555"}'),
    (4, "run.cancel.default", {"x-stream-offset": 3}, None, b"not json"),
    (5, "run.cancel.default", {"x-stream-offset": 4}, None, b""),
    (6, "mq_worker.cancels", {"x-mq-worker-marker": "end", "x-stream-offset": 5}, None, b""),
    ("CloseOk",),
]


def test_recorded_bytes_give_every_delivery_and_method() -> None:
    assert _summary(FrameReader().feed(RECORDED)) == EXPECTED


def test_recorded_bytes_split_at_every_position_give_the_same() -> None:
    for cut in range(len(RECORDED) + 1):
        reader = FrameReader()
        items = reader.feed(RECORDED[:cut]) + reader.feed(RECORDED[cut:])
        assert _summary(items) == EXPECTED, f"cut at byte {cut}"


def test_recorded_bytes_fed_one_at_a_time_give_the_same() -> None:
    reader = FrameReader()
    items: list[Delivery | Method] = []
    for index in range(len(RECORDED)):
        items += reader.feed(RECORDED[index:index + 1])
    assert _summary(items) == EXPECTED


def _delivery(tag: int, body: bytes, frame_max: int = 131072,
              properties: spec.Basic.Properties | None = None) -> bytes:
    frames = pamqp_frame.marshal(spec.Basic.Deliver(
        consumer_tag="ctag", delivery_tag=tag, exchange="mq_worker.runs",
        routing_key="run.cancel.default"), 1)
    frames += pamqp_frame.marshal(ContentHeader(0, len(body), properties
                                                or spec.Basic.Properties()), 1)
    step = frame_max - 8
    for start in range(0, len(body), step):
        frames += pamqp_frame.marshal(ContentBody(body[start:start + step]), 1)
    return frames


def test_a_body_in_several_frames_and_heartbeats_between_messages() -> None:
    body = bytes(range(256)) * 40
    data = (_delivery(1, body, frame_max=1000) + pamqp_frame.marshal(Heartbeat(), 0)
            + _delivery(2, b"{}"))
    items = FrameReader().feed(data)
    assert [(i.delivery_tag, i.body) for i in items if isinstance(i, Delivery)] \
        == [(1, body), (2, b"{}")]
    assert len(items) == 2


def test_timestamps_as_every_connection_decodes_them() -> None:
    seconds = spec.Basic.Properties(timestamp=datetime(2026, 1, 2, tzinfo=UTC))
    items = FrameReader().feed(_delivery(1, b"{}", properties=seconds))
    assert isinstance(items[0], Delivery)
    assert items[0].timestamp == datetime(2026, 1, 2, tzinfo=UTC).timestamp()
    # Milliseconds (as some clients stamp them) are read as pamqp reads them.
    header = bytearray(pamqp_frame.marshal(ContentHeader(0, 2, seconds), 1))
    millis = int(datetime(2026, 1, 2, tzinfo=UTC).timestamp() * 1000)
    header[-9:-1] = millis.to_bytes(8, "big")
    deliver = pamqp_frame.marshal(spec.Basic.Deliver("c", 1, False, "x", "k"), 1)
    body = pamqp_frame.marshal(ContentBody(b"{}"), 1)
    items = FrameReader().feed(deliver + bytes(header) + body)
    assert isinstance(items[0], Delivery)
    assert items[0].timestamp == pytest.approx(millis / 1000)


def test_a_server_cancel_between_deliveries_is_a_method() -> None:
    data = _delivery(1, b"{}") + pamqp_frame.marshal(spec.Basic.Cancel("ctag"), 1) \
        + _delivery(2, b"{}")
    items = FrameReader().feed(data)
    assert [type(i).__name__ for i in items] == ["Delivery", "Method", "Delivery"]
    assert isinstance(items[1], Method) and isinstance(items[1].method, spec.Basic.Cancel)


@pytest.mark.parametrize("damage", [
    "frame end", "frame type", "header without deliver", "body without header",
    "method inside content", "body too long", "headers table too long",
])
def test_malformed_frames_raise_frame_error(damage: str) -> None:
    good = _delivery(1, b"{}")
    deliver_end = good.index(b"\xce") + 1  # the deliver frame's end byte (tag 1: no 0xce)
    header_end = deliver_end + 7 + int.from_bytes(good[deliver_end + 3:deliver_end + 7],
                                                  "big") + 1
    data: bytes
    if damage == "frame end":
        data = good[:deliver_end - 1] + b"\x00" + good[deliver_end:]
    elif damage == "frame type":
        data = b"\x05" + good[1:]
    elif damage == "header without deliver":
        data = good[deliver_end:]
    elif damage == "body without header":
        data = good[:deliver_end] + good[header_end:]
    elif damage == "method inside content":
        data = good[:header_end] + good
    elif damage == "body too long":
        data = good[:header_end] + pamqp_frame.marshal(ContentBody(b"{}{}"), 1)
    else:
        table = spec.Basic.Properties(headers={"a": 1})
        header = bytearray(pamqp_frame.marshal(ContentHeader(0, 2, table), 1))
        header[7 + 14:7 + 18] = (1000).to_bytes(4, "big")  # the table's length
        data = good[:deliver_end] + bytes(header) + good[header_end:]
    with pytest.raises(FrameError):
        FrameReader().feed(data)
