"""The AMQP frames of one `basic.publish` of an event or a run output batch, written
straight to bytes.

pamqp builds a method object, a properties object, a content header object and a body
object per message and marshals each through its generic encoder: for the few small
events a worker publishes per run, that was most of what a publish cost the worker.
Here the method frame and the content header are packed directly, from the only
properties events and output batches carry.
`tests/unit/test_publish_frames.py` checks the bytes against pamqp's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from pamqp import encode

_FRAME_END = b"\xce"
_METHOD_FRAME, _HEADER_FRAME, _BODY_FRAME = 1, 2, 3
_BASIC_CLASS = 60
# Property flags of the basic class's content header, in the order the values follow.
_CONTENT_TYPE, _HEADERS, _DELIVERY_MODE, _MESSAGE_ID = 0x8000, 0x2000, 0x1000, 0x0080
_FRAME_START = struct.Struct(">BHI")
_HEADER_START = struct.Struct(">HHQH")
# basic.publish: class 60, method 40, then its reserved short (ticket) 0.
_PUBLISH = struct.pack(">HHH", 60, 40, 0)


@dataclass(frozen=True, slots=True)
class Message:
    """A message to publish, with the properties an event has."""

    exchange: str
    routing_key: str
    body: bytes
    content_type: str
    message_id: str
    persistent: bool = True
    headers: dict[str, Any] | None = None


def publish_frames(channel: int, message: Message, max_content_size: int) -> bytes:
    """The method, content header and body frames of `message` on `channel`.

    `max_content_size` is the largest body frame payload (aiormq's channel computes it
    from the connection's frame_max).
    """
    body = message.body
    header = _header_payload(message)
    parts = [_method_frame(channel, message.exchange, message.routing_key),
             _FRAME_START.pack(_HEADER_FRAME, channel, len(header)), header, _FRAME_END]
    for start in range(0, len(body), max_content_size):
        chunk = body[start:start + max_content_size]
        parts += (_FRAME_START.pack(_BODY_FRAME, channel, len(chunk)), chunk, _FRAME_END)
    return b"".join(parts)


def _method_frame(channel: int, exchange: str, routing_key: str) -> bytes:
    # Packed here: run output has a routing key per run, so a cache of pamqp's encoding
    # missed once per run. Mandatory and immediate are off (the flags' byte is 0).
    payload = b"".join((_PUBLISH, encode.short_string(exchange),
                        encode.short_string(routing_key), b"\x00"))
    return b"".join((_FRAME_START.pack(_METHOD_FRAME, channel, len(payload)), payload,
                     _FRAME_END))


def _header_payload(message: Message) -> bytes:
    flags = _CONTENT_TYPE | _DELIVERY_MODE | _MESSAGE_ID
    headers = b""
    if message.headers is not None:
        flags |= _HEADERS
        headers = encode.field_table(message.headers)
    return b"".join((
        _HEADER_START.pack(_BASIC_CLASS, 0, len(message.body), flags),
        encode.short_string(message.content_type),
        headers,
        b"\x02" if message.persistent else b"\x01",
        encode.short_string(message.message_id),
    ))
