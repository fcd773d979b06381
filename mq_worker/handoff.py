"""Hand-offs: a delivered message copied elsewhere (parked, dead-lettered) before it is settled.

The original is acknowledged only once the broker has confirmed that the copy
is stored. Three things can keep the copy from being stored, and none of them
may lose the message:

* its queue is missing (an operator deleted the delay ladder or the dead
  queue): the broker *returns* the mandatory publish. The queue is declared
  again and the copy published once more; if it comes back again, the
  hand-off fails and the caller gives the original back to its queue;
* its confirmation never comes (a lost confirm on an open channel): after
  `CONFIRM_TIMEOUT` seconds the publish raises TimeoutError, which ends the
  session like a broken connection, so the original is redelivered;
* its headers do not fit in one frame: the received headers plus the ones a
  dead letter adds can exceed the connection's `frame_max`, and the broker
  closes the connection (FRAME_ERROR). `fit_headers` keeps the copy's header
  frame within the limit by leaving out the largest received headers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiormq.exceptions
from pamqp import commands as spec
from pamqp import encode
from pamqp.header import ContentHeader

from mq_worker.topology import DROPPED_HEADERS_HEADER

# Seconds to wait for the broker's confirmation of a hand-off or an event.
CONFIRM_TIMEOUT = 15.0
DEFAULT_FRAME_MAX = 131_072
_FRAME_ENVELOPE = 8  # type, channel, size, end marker
# Room left for what the broker adds when it delivers the copy (x-delivery-count, x-death...).
_BROKER_HEADROOM = 1024


class HandoffReturned(Exception):
    """The broker returned the copy twice: its destination is missing and could not be made."""


async def hand_off(
    publish: Callable[[], Awaitable[object]],
    redeclare: Callable[[], Awaitable[None]],
    *,
    what: str,
    log: Any,
) -> None:
    """Publish a mandatory, confirmed copy; if returned, declare its queue again and retry once."""
    try:
        await publish()
        return
    except aiormq.exceptions.PublishError as exc:
        log.warning(f"{what} returned by the broker: its queue is missing; declaring it again",
                    reply=_reply_text(exc))
    await redeclare()
    try:
        await publish()
    except aiormq.exceptions.PublishError as exc:
        log.error(f"{what} returned again after declaring its queue; the message is given back",
                  reply=_reply_text(exc))
        raise HandoffReturned(f"{what} returned by the broker: {_reply_text(exc)}") from None


def _reply_text(exc: aiormq.exceptions.PublishError) -> str:
    frame = exc.args[1] if len(exc.args) > 1 else None
    return str(getattr(frame, "reply_text", "") or "NO_ROUTE")


def frame_max_of(channel: Any) -> int:
    """The frame size negotiated on `channel`'s connection (RabbitMQ's default if unknown)."""
    tune = getattr(getattr(channel, "connection", None), "connection_tune", None)
    value = getattr(tune, "frame_max", 0) or DEFAULT_FRAME_MAX
    return int(value)


def header_frame_size(properties: spec.Basic.Properties, body_size: int) -> int | None:
    """Bytes of the content header frame with `properties`; None if they cannot be encoded."""
    try:
        return len(ContentHeader(0, body_size, properties).marshal()) + _FRAME_ENVELOPE
    except (ValueError, TypeError, OverflowError, UnicodeError):
        return None


def fit_headers(
    properties: spec.Basic.Properties,
    received: Mapping[str, Any],
    added: Mapping[str, Any],
    *,
    body_size: int,
    frame_max: int,
) -> tuple[spec.Basic.Properties, list[str]]:
    """`properties` with the received headers plus `added`, within `frame_max`.

    The largest received headers are left out until the frame fits (and then
    `x-mq-worker-dropped-headers` counts them); `added` always stays. If even
    that does not fit (or the other properties cannot be encoded), the result
    keeps only the added headers and the delivery mode. Returns the properties
    to publish with and the names of the headers left out.
    """
    limit = max(frame_max - _BROKER_HEADROOM, 4096)
    kept = dict(received)
    properties.headers = {**kept, **added}
    size = header_frame_size(properties, body_size)
    if size is not None and size <= limit:
        return properties, []
    # Leave out the largest received headers until the estimate fits, then check it.
    costs = {name: _item_size(name, value) for name, value in kept.items()}
    dropped: list[str] = []
    estimate = size if size is not None else 1 << 30
    for name in sorted(costs, key=costs.__getitem__, reverse=True):
        if estimate <= limit:
            break
        del kept[name]
        dropped.append(name)
        estimate -= costs[name]
    properties.headers = {**kept, **added, DROPPED_HEADERS_HEADER: len(dropped)}
    size = header_frame_size(properties, body_size)
    if size is not None and size <= limit:
        return properties, dropped
    dropped = list(received)
    minimal = spec.Basic.Properties(
        delivery_mode=properties.delivery_mode,
        headers={**added, DROPPED_HEADERS_HEADER: len(dropped)},
    )
    return minimal, dropped


def _item_size(name: str, value: Any) -> int:
    """Bytes one header adds to a field table (huge if it cannot be encoded)."""
    try:
        return len(encode.field_table({name: value})) - 4
    except (ValueError, TypeError, OverflowError, UnicodeError):
        return 1 << 30
