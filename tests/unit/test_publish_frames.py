"""An event's publish frames, written straight to bytes, are the bytes aiormq and pamqp write
for the same `basic_publish`: the broker cannot tell them apart."""

from __future__ import annotations

from typing import Any

import pytest
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from mq_worker.publish_frames import Message, publish_frames

FRAME_MAX = 131_072
MAX_CONTENT = FRAME_MAX - 8  # as aiormq's channel computes it


def pamqp_frames(channel: int, message: Message, max_content: int) -> bytes:
    """What aiormq's `Channel.basic_publish` writes for `message`."""
    properties = spec.Basic.Properties(
        content_type=message.content_type, delivery_mode=2 if message.persistent else 1,
        message_id=message.message_id, headers=message.headers)
    body = message.body
    chunks = [body[i:i + max_content] for i in range(0, len(body), max_content)]
    frames: list[Any] = [spec.Basic.Publish(exchange=message.exchange,
                                            routing_key=message.routing_key),
                         ContentHeader(properties=properties, body_size=len(body)),
                         *(ContentBody(chunk) for chunk in chunks)]
    return ChannelFrame.marshall(channel_number=channel, frames=frames).payload


@pytest.mark.parametrize("message", [
    Message("mq_worker.events", "mq_worker.run.completed", b'{"id":"x"}',
            "application/cloudevents+json", "0b7a1c52-9a8e-4a59-8c0e-3d1c8f0f7a11"),
    Message("mq_worker.events", "mq_worker.worker.heartbeat", b"{}", "application/json",
            "e1", headers={"BCC": ["workers.default"]}),
    Message("", "queue-name", b"", "text/plain", "no body", persistent=False),
    Message("ex", "r\u00e9sum\u00e9.key", "d\u00e9j\u00e0 vu".encode(), "a/b", "\u00e9"),
    Message("mq_worker.events", "k", b"x" * (3 * MAX_CONTENT + 17), "a/b", "big"),
    Message("mq_worker.events", "k", b"y" * MAX_CONTENT, "a/b", "exactly one frame"),
])
@pytest.mark.parametrize("channel", [1, 2, 65535])
def test_the_same_bytes_as_aiormq(message: Message, channel: int) -> None:
    assert publish_frames(channel, message, MAX_CONTENT) == pamqp_frames(channel, message,
                                                                         MAX_CONTENT)


def test_a_small_frame_max_splits_the_body_as_aiormq_does() -> None:
    message = Message("e", "k", bytes(range(256)) * 3, "a/b", "id")
    assert publish_frames(1, message, 100) == pamqp_frames(1, message, 100)


def test_too_long_a_message_id_is_refused_not_cut() -> None:
    with pytest.raises(TypeError):  # as pamqp's encoder refuses it
        publish_frames(1, Message("e", "k", b"", "a/b", "x" * 256), MAX_CONTENT)


def test_a_routing_key_per_message_is_encoded_as_pamqp_does() -> None:
    # Run output has a routing key per run: nothing cached may stand in for another's.
    for i in range(600):
        message = Message("mq_worker.output", f"output.pool.run-{i}", b"{}", "a/b", f"id-{i}")
        assert publish_frames(i % 3 + 1, message, MAX_CONTENT) == pamqp_frames(
            i % 3 + 1, message, MAX_CONTENT)


def test_too_long_a_routing_key_is_refused_as_pamqp_refuses_it() -> None:
    with pytest.raises(TypeError):
        publish_frames(1, Message("e", "k" * 256, b"", "a/b", "id"), MAX_CONTENT)
