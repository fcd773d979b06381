"""Frames read from what a socket read brought are the frames, and the errors, aiormq's own
receiver reads from the same bytes, however the bytes arrive."""

from __future__ import annotations

import asyncio
from typing import Any

import aiormq.connection
import pamqp.frame
import pytest
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader, ProtocolHeader
from pamqp.heartbeat import Heartbeat

from mq_worker import frame_reading
from mq_worker.frame_reading import BufferedFrameReceiver

AIORMQS = BufferedFrameReceiver.__mro__[1]  # aiormq's own, even once install() replaced it
PAYLOAD = b'{"id": "8c3e", "command": ["/bin/true"]}' * 3
FRAMES: list[tuple[int, Any]] = [
    (0, spec.Connection.Start(server_properties={"product": "RabbitMQ"})),
    (1, spec.Basic.Deliver("ctag1.0a", 17, False, "mq_worker.runs", "default.default")),
    (1, ContentHeader(0, len(PAYLOAD), spec.Basic.Properties(
        content_type="application/json", delivery_mode=2, message_id="m-1",
        headers={"x-attempt": 2}))),
    (1, ContentBody(PAYLOAD)),
    (2, spec.Basic.Ack(5, False)),
    (2, spec.Basic.Ack(2**63 - 1, True)),
    (3, spec.Basic.Deliver("", 1, True, "", "")),
    (0, Heartbeat()),
    (2, spec.Basic.Nack(7, True, False)),
    (1, spec.Basic.ConsumeOk("ctag1.0a")),
]
STREAM = b"".join(pamqp.frame.marshal(frame, channel) for channel, frame in FRAMES)


def fields(frame: Any) -> tuple[Any, ...]:
    """What a frame holds, comparable across instances (pamqp compares only some kinds)."""
    if isinstance(frame, ContentHeader):
        return (ContentHeader, frame.weight, frame.body_size, fields(frame.properties))
    names = getattr(frame, "__slots__", None) or sorted(vars(frame))
    return (type(frame), *(getattr(frame, name) for name in names))


async def read_all(receiver_class: type[aiormq.connection.FrameReceiver], data: bytes,
                   chunk: int) -> tuple[list[tuple[int, int, tuple[Any, ...]]], Exception | None]:
    """Every frame `receiver_class` reads from `data` fed `chunk` bytes at a time, then
    what ended the reading (None: the iteration ended)."""
    reader = asyncio.StreamReader()
    receiver = receiver_class(reader)
    frames = []

    async def feed() -> None:
        for at in range(0, len(data), chunk):
            reader.feed_data(data[at:at + chunk])
            if at + chunk >= len(data):
                reader.feed_eof()  # with the last bytes: the connection ends between frames
            await asyncio.sleep(0)

    feeding = asyncio.create_task(feed())
    ended: Exception | None = None
    try:
        async for size, channel, frame in receiver:
            frames.append((size, channel, fields(frame)))
    except Exception as exc:  # what ended it is part of the comparison
        ended = exc
    await feeding
    return frames, ended


def read(receiver_class: type[aiormq.connection.FrameReceiver], data: bytes,
         chunk: int) -> tuple[list[tuple[int, int, tuple[Any, ...]]], Exception | None]:
    return asyncio.run(read_all(receiver_class, data, chunk))


@pytest.mark.parametrize("chunk", [1, 2, 7, 8, 13, 64, 1000, len(STREAM)])
def test_the_frames_are_aiormqs_however_the_bytes_arrive(chunk: int) -> None:
    ours, ours_ended = read(BufferedFrameReceiver, STREAM, chunk)
    theirs, theirs_ended = read(AIORMQS, STREAM, chunk)
    assert len(ours) == len(FRAMES)
    assert ours == theirs
    assert ours_ended is None and theirs_ended is None


def test_a_connection_that_ends_while_waiting_is_an_error_as_aiormqs_is() -> None:
    async def ends_while_waiting(receiver_class: type[aiormq.connection.FrameReceiver]) -> str:
        reader = asyncio.StreamReader()
        reader.feed_data(STREAM)
        receiver = receiver_class(reader)
        for _ in FRAMES:
            await receiver.get_frame()
        waiting = asyncio.create_task(receiver.get_frame())
        await asyncio.sleep(0)
        reader.feed_eof()
        with pytest.raises(AMQPConnectionError) as raised:
            await waiting
        return str(raised.value)

    assert asyncio.run(ends_while_waiting(BufferedFrameReceiver)) == \
        asyncio.run(ends_while_waiting(AIORMQS))


@pytest.mark.parametrize("cut", [1, 3, 7, 10, len(STREAM) - 1, len(STREAM) - 20])
def test_a_connection_that_ends_mid_frame_is_the_error_aiormq_raises(cut: int) -> None:
    ours, ours_ended = read(BufferedFrameReceiver, STREAM[:cut], 5)
    theirs, theirs_ended = read(AIORMQS, STREAM[:cut], 5)
    assert isinstance(ours_ended, AMQPConnectionError)
    assert "unexpectedly closed" in str(ours_ended)
    assert (ours, str(ours_ended)) == (theirs, str(theirs_ended))
    assert len(ours) < len(FRAMES)


def test_deliveries_and_confirms_skip_pamqps_generic_decoding(
        monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[type] = []
    unmarshal = pamqp.frame.unmarshal

    def recording(data: bytes) -> Any:
        result = unmarshal(data)
        decoded.append(type(result[2]))
        return result

    monkeypatch.setattr(pamqp.frame, "unmarshal", recording)
    frames, _ = read(BufferedFrameReceiver, STREAM, 64)
    assert len(frames) == len(FRAMES)
    assert spec.Basic.Deliver not in decoded and spec.Basic.Ack not in decoded
    assert spec.Basic.Nack in decoded and ContentHeader in decoded


def test_a_delivery_whose_strings_run_past_its_frame_reads_nothing_of_the_next() -> None:
    """A routing key's length byte too large: the shortcut would read the next frame's
    bytes; pamqp decodes the frame alone, as aiormq's receiver does."""
    good = pamqp.frame.marshal(spec.Basic.Deliver("c", 1, False, "x", "key"), 1)
    bad = good.replace(b"\x03key", b"\x09key")
    data = bad + pamqp.frame.marshal(spec.Basic.Ack(5, False), 1)
    ours, ours_ended = read(BufferedFrameReceiver, data, 64)
    theirs, theirs_ended = read(AIORMQS, data, 64)
    assert ours == theirs and len(ours) == 2
    assert ours_ended is None and theirs_ended is None


def test_two_readers_waiting_each_get_a_frame() -> None:
    """The lock: a second caller waiting while the first reads takes the frame after."""
    async def two_waiting() -> list[tuple[Any, ...]]:
        reader = asyncio.StreamReader()
        receiver = BufferedFrameReceiver(reader)
        first = asyncio.create_task(receiver.get_frame())
        second = asyncio.create_task(receiver.get_frame())
        await asyncio.sleep(0)
        reader.feed_data(STREAM)
        async with asyncio.timeout(5):
            return [fields(frame) for _, _, frame in await asyncio.gather(first, second)]

    assert asyncio.run(two_waiting()) == [fields(frame) for _, frame in FRAMES[:2]]


def test_a_large_frame_in_small_pieces_is_read_whole() -> None:
    body = bytes(range(256)) * 512  # 128 KiB, RabbitMQ's default frame_max
    data = pamqp.frame.marshal(ContentBody(body), 1) + pamqp.frame.marshal(Heartbeat(), 0)
    frames, ended = read(BufferedFrameReceiver, data, 1448)
    assert ended is None
    assert [frame[2] for frame in frames] == [fields(ContentBody(body)), fields(Heartbeat())]


def test_a_frame_without_its_end_byte_is_invalid() -> None:
    frame = bytearray(pamqp.frame.marshal(spec.Basic.Ack(5, False), 1))
    frame[-1] = 0
    for broken in (bytes(frame), pamqp.frame.marshal(Heartbeat(), 0) + bytes(frame)):
        _, ended = read(BufferedFrameReceiver, broken, 64)
        assert isinstance(ended, InvalidFrameError)


def test_a_method_that_does_not_fill_its_frame_is_left_to_pamqp() -> None:
    """A Basic.Ack one byte too long: pamqp decodes it as it always has, no shortcut."""
    good = pamqp.frame.marshal(spec.Basic.Ack(5, True), 1)
    size = int.from_bytes(good[3:7], "big") + 1
    long_ack = good[:3] + size.to_bytes(4, "big") + good[7:-1] + b"\x00" + good[-1:]
    ours, _ = read(BufferedFrameReceiver, long_ack, 64)
    assert ours == [(len(long_ack), 1, fields(pamqp.frame.unmarshal(long_ack)[2]))]


def test_a_protocol_header_instead_of_a_frame_is_refused() -> None:
    """What a broker answers a client of another protocol version with."""
    _, ended = read(BufferedFrameReceiver, ProtocolHeader(0, 9, 1).marshal(), 64)
    assert isinstance(ended, ProtocolSyntaxError)


def test_install_makes_aiormq_connect_with_it() -> None:
    frame_reading.install()
    frame_reading.install()
    assert aiormq.connection.FrameReceiver is BufferedFrameReceiver


short_strings = st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255)


@given(tag=st.integers(-(2**63), 2**63 - 1), multiple=st.booleans(), channel=st.integers(1, 65535))
def test_acks_decode_as_pamqp_decodes_them(tag: int, multiple: bool, channel: int) -> None:
    data = pamqp.frame.marshal(spec.Basic.Ack(tag, multiple), channel)
    assert read(BufferedFrameReceiver, data, 64)[0] == [
        (len(data), channel, fields(pamqp.frame.unmarshal(data)[2]))]


@given(consumer_tag=short_strings, tag=st.integers(-(2**63), 2**63 - 1), redelivered=st.booleans(),
       exchange=st.from_regex(r"\A[a-zA-Z0-9_.:-]{0,127}\Z"), routing_key=short_strings)
def test_deliveries_decode_as_pamqp_decodes_them(consumer_tag: str, tag: int,
                                                 redelivered: bool, exchange: str,
                                                 routing_key: str) -> None:
    data = pamqp.frame.marshal(
        spec.Basic.Deliver(consumer_tag, tag, redelivered, exchange, routing_key), 9)
    assert read(BufferedFrameReceiver, data, 64)[0] == [
        (len(data), 9, fields(pamqp.frame.unmarshal(data)[2]))]


def test_a_consumer_tag_that_is_not_utf8_gets_replacement_characters() -> None:
    """As `wire_decoding` decodes every short string: the delivery arrives, not an error."""
    good = pamqp.frame.marshal(spec.Basic.Deliver("ab", 1, False, "x", "k"), 1)
    bad = good.replace(b"\x02ab", b"\x02\xff\xfe")
    frames, ended = read(BufferedFrameReceiver, bad, 64)
    assert ended is None
    assert frames[0][2][1] == "\ufffd\ufffd"
