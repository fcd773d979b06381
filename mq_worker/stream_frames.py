"""AMQP 0-9-1 frames of a stream consumer, parsed in bulk: deliveries and the odd method.

A worker replaying a long cancel window receives three frames per message
(basic.deliver, a content header, a body). Decoding each one through a general
client (a task, a queue, objects per frame) cost most of the replay's time, so
the replay reads its own socket and hands the bytes to `FrameReader`, which
cuts every complete frame out of a buffer with `struct` and assembles the
deliveries. Content headers are decoded only as far as the replay needs them
(the `headers` table and the `timestamp`, with the decoders pamqp uses for
every other connection, which mq_worker.wire_decoding makes tolerant); any
other method frame is decoded by pamqp.

Pure: no socket, no clock. Anything malformed raises `FrameError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pamqp import decode
from pamqp import frame as pamqp_frame
from pamqp.base import Frame

from mq_worker import wire_decoding

FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
BASIC_CLASS, DELIVER_METHOD = 60, 60
# A timestamp up to this is plain Unix seconds (pamqp reads larger ones as milliseconds).
_PLAIN_SECONDS = 0xFFFFFFFF

_FRAME_HEAD = struct.Struct(">BHI")
_METHOD_ID = struct.Struct(">HH")
_CONTENT_HEAD = struct.Struct(">HHQH")
_LONG_LONG = struct.Struct(">Q")
_SHORT = struct.Struct(">H")

# Content header property flags, highest bit first, with how each value is laid out.
_HEADERS_FLAG = 1 << 13
_TIMESTAMP_FLAG = 1 << 6
_OCTET_FLAGS = (1 << 12) | (1 << 11)  # delivery-mode, priority
_SHORT_STRING_FLAGS = (1 << 15) | (1 << 14) | (1 << 10) | (1 << 9) | (1 << 8) | (1 << 7) \
    | (1 << 5) | (1 << 4) | (1 << 3) | (1 << 2)


class FrameError(ValueError):
    """The bytes are not the frames of a stream consumer's channel."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message delivered by basic.deliver, with the properties the replay reads."""

    channel: int
    delivery_tag: int
    routing_key: str
    headers: dict[str, Any]
    timestamp: float | None  # Unix seconds; None when absent or past year 9999
    body: bytes


@dataclass(frozen=True, slots=True)
class Method:
    """A method frame other than basic.deliver (basic.cancel, channel.close, ...)."""

    channel: int
    method: Frame


@dataclass(slots=True)
class _Pending:
    channel: int
    delivery_tag: int
    routing_key: str
    headers: dict[str, Any] | None = None
    timestamp: float | None = None
    size: int = -1  # the body's size, once the content header has come
    parts: list[bytes] | None = None
    received: int = 0


class FrameReader:
    """Cuts frames out of the bytes fed to it, however they were split."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pending: _Pending | None = None

    def feed(self, data: bytes) -> list[Delivery | Method]:
        """The deliveries and methods completed by `data`, in order; heartbeats are dropped."""
        buffer = self._buffer
        buffer += data
        out: list[Delivery | Method] = []
        position, length = 0, len(buffer)
        try:
            while length - position >= 8:
                kind, channel, size = _FRAME_HEAD.unpack_from(buffer, position)
                end = position + 7 + size
                if end >= length:
                    break
                if buffer[end] != FRAME_END:
                    raise FrameError(f"frame at byte {position} does not end with 0xCE")
                start = position + 7
                if kind == FRAME_METHOD:
                    self._method(buffer, position, start, end, channel, out)
                elif kind == FRAME_HEADER:
                    self._content_header(buffer, start, end, channel, out)
                elif kind == FRAME_BODY:
                    self._body(buffer, start, end, channel, out)
                elif kind != FRAME_HEARTBEAT:
                    raise FrameError(f"unknown frame type {kind}")
                position = end + 1
        finally:
            del buffer[:position]
        return out

    def _method(self, buffer: bytearray, position: int, start: int, end: int, channel: int,
                out: list[Delivery | Method]) -> None:
        if self._pending is not None:
            raise FrameError("a method frame inside a message's content")
        if end - start < 4:
            raise FrameError("method frame too short")
        class_id, method_id = _METHOD_ID.unpack_from(buffer, start)
        if (class_id, method_id) != (BASIC_CLASS, DELIVER_METHOD):
            try:
                _, _, value = pamqp_frame.unmarshal(bytes(buffer[position:end + 1]))
            except (ValueError, struct.error, KeyError, TypeError, IndexError,
                    UnicodeDecodeError) as exc:
                raise FrameError(f"undecodable method frame {class_id}.{method_id}: {exc}") \
                    from exc
            if not isinstance(value, Frame):
                raise FrameError(f"frame {class_id}.{method_id} is not a method")
            out.append(Method(channel, value))
            return
        at = start + 4
        at = _skip_short_string(buffer, at, end)  # consumer tag
        if at + 9 > end:
            raise FrameError("basic.deliver too short")
        (tag,) = _LONG_LONG.unpack_from(buffer, at)
        at = _skip_short_string(buffer, at + 9, end)  # after redelivered: exchange
        if at >= end or at + 1 + buffer[at] > end:
            raise FrameError("basic.deliver routing key runs past its frame")
        routing_key = bytes(buffer[at + 1:at + 1 + buffer[at]]).decode("utf-8", "replace")
        self._pending = _Pending(channel, tag, routing_key)

    def _content_header(self, buffer: bytearray, start: int, end: int, channel: int,
                        out: list[Delivery | Method]) -> None:
        pending = self._pending
        if pending is None or pending.size >= 0 or pending.channel != channel:
            raise FrameError("a content header that follows no basic.deliver")
        if end - start < _CONTENT_HEAD.size:
            raise FrameError("content header too short")
        _, _, size, flags = _CONTENT_HEAD.unpack_from(buffer, start)
        at = start + _CONTENT_HEAD.size
        more = flags
        while more & 1:  # further flag words: properties no client of this version sends
            if at + 2 > end:
                raise FrameError("content header flags run past its frame")
            (more,) = _SHORT.unpack_from(buffer, at)
            at += 2
        headers: dict[str, Any] = {}
        for bit in range(15, 1, -1):
            flag = 1 << bit
            if not flags & flag:
                continue
            if flag == _HEADERS_FLAG:
                try:
                    used, table = wire_decoding.tolerant_field_table(bytes(buffer[at:end]))
                except (ValueError, struct.error, KeyError, TypeError, IndexError,
                        UnicodeDecodeError) as exc:
                    raise FrameError(f"undecodable headers: {exc}") from exc
                headers = dict(table)
                at += used
            elif flag == _TIMESTAMP_FLAG:
                if at + 8 > end:
                    raise FrameError("timestamp runs past its frame")
                (seconds,) = _LONG_LONG.unpack_from(buffer, at)
                if seconds <= _PLAIN_SECONDS:
                    pending.timestamp = float(seconds)
                else:  # milliseconds, or no date: as the decoder every connection uses says
                    pending.timestamp = _decoded_timestamp(bytes(buffer[at:at + 8]))
                at += 8
            elif flag & _OCTET_FLAGS:
                at += 1
            else:
                assert flag & _SHORT_STRING_FLAGS
                at = _skip_short_string(buffer, at, end)
            if at > end:
                raise FrameError("content header properties run past its frame")
        pending.headers, pending.size, pending.parts = headers, size, []
        if size == 0:
            self._deliver(out)

    def _body(self, buffer: bytearray, start: int, end: int, channel: int,
              out: list[Delivery | Method]) -> None:
        pending = self._pending
        if pending is None or pending.parts is None or pending.channel != channel:
            raise FrameError("a body frame that follows no content header")
        pending.parts.append(bytes(buffer[start:end]))
        pending.received += end - start
        if pending.received > pending.size:
            raise FrameError("body frames longer than their content header says")
        if pending.received == pending.size:
            self._deliver(out)

    def _deliver(self, out: list[Delivery | Method]) -> None:
        pending = self._pending
        assert pending is not None and pending.parts is not None and pending.headers is not None
        parts = pending.parts
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        out.append(Delivery(pending.channel, pending.delivery_tag, pending.routing_key,
                            pending.headers, pending.timestamp, body))
        self._pending = None


def _decoded_timestamp(value: bytes) -> float | None:
    try:
        _, decoded = decode.METHODS["timestamp"](value)
    except (ValueError, OverflowError, OSError) as exc:
        raise FrameError(f"undecodable timestamp: {exc}") from exc
    return decoded.timestamp() if isinstance(decoded, datetime) else None


def _skip_short_string(buffer: bytearray, at: int, end: int) -> int:
    if at >= end:
        raise FrameError("a short string runs past its frame")
    after = at + 1 + buffer[at]
    if after > end:
        raise FrameError("a short string runs past its frame")
    return after


def marshal(method: Frame, channel: int = 0) -> bytes:
    """One method frame, as pamqp encodes it."""
    return pamqp_frame.marshal(method, channel)
