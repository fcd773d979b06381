"""The control stream: pauses and limits, set by operators, followed by every worker.

`mq-worker pause/resume/limit` publish a control message to `mq_worker.runs`
with routing key `control.<kind>`; the stream `mq_worker.control` keeps every
one of them (no age limit). A worker replays the stream when it connects (it
takes no run before it has caught up) and follows it, so a change reaches every
worker at once and survives broker and worker restarts. The state is the last
message per target.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

import aiormq.abc
import anyio
import anyio.abc
import orjson
import structlog
from pamqp import commands as spec
from pydantic import Field, ValidationError, field_validator

from mq_worker.broker import delivery_tag
from mq_worker.limits import ControlState, Limit, check_target
from mq_worker.messages import _WireModel
from mq_worker.topology import CONTROL_STREAM, MARKER_HEADER, STREAM_OFFSET

log = structlog.get_logger("mq_worker.control")

MARKER_CONFIRM_TIMEOUT = 15.0


class ControlMessage(_WireModel):
    """A pause, resume or limit, as published to `mq_worker.runs` with key `control.<kind>`."""

    kind: Literal["pause", "resume", "limit"]
    target: str = Field(description="pool:<pool>, queue:<pool>/<queue> or key:<key>.")
    limit: int | None = Field(
        default=None, ge=0, description="For `limit`: most runs at once; null removes the limit."
    )
    ranges: list[tuple[int, int, int]] = Field(
        default_factory=list,
        description="For `limit`: [first, end, version] of the slot token numbers now valid.",
    )
    version: int = Field(default=0, description="When it was set, in nanoseconds since 1970.")
    by: str | None = Field(default=None, max_length=256, description="Who set it.")

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        return check_target(value)


class TokenMessage(_WireModel):
    """A free slot of a limit, kept in the limit's token queue."""

    target: str
    number: int = Field(ge=0)
    version: int


def apply(state: ControlState, message: ControlMessage) -> None:
    """Fold one control message into `state`."""
    if message.kind == "pause":
        state.paused.add(message.target)
    elif message.kind == "resume":
        state.paused.discard(message.target)
    elif message.limit is None:
        state.limits.pop(message.target, None)
    else:
        state.limits[message.target] = Limit(
            message.target, message.limit, tuple(tuple(r) for r in message.ranges)  # type: ignore[misc]
        )


def encode(message: ControlMessage | TokenMessage) -> bytes:
    return orjson.dumps(message.model_dump(mode="json"))


def new_version() -> int:
    return time.time_ns()


class ControlFollower:
    """Reads the control stream into a state and reports each change."""

    def __init__(self, state: ControlState, on_change: Callable[[], None]) -> None:
        self.state = state
        self._on_change = on_change
        self._next_offset: int | None = None
        self._marker: str | None = None
        self._caught_up = anyio.Event()

    async def follow(
        self,
        channel: aiormq.abc.AbstractChannel,
        publisher: aiormq.abc.AbstractChannel,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Consume the stream; report started once every earlier message has been read."""
        offset: Any = "first" if self._next_offset is None else self._next_offset
        self._marker = uuid.uuid4().hex
        self._caught_up = anyio.Event()
        await channel.basic_qos(prefetch_count=1000)
        await channel.basic_consume(
            CONTROL_STREAM, self._on_message, arguments={STREAM_OFFSET: offset}
        )
        await publisher.basic_publish(
            b"", exchange="", routing_key=CONTROL_STREAM,
            properties=spec.Basic.Properties(headers={MARKER_HEADER: self._marker}),
            timeout=MARKER_CONFIRM_TIMEOUT,
        )
        await self._caught_up.wait()
        task_status.started()
        await anyio.sleep_forever()

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        headers: dict[str, Any] = dict(message.header.properties.headers or {})
        offset = headers.get(STREAM_OFFSET)
        if isinstance(offset, int):
            self._next_offset = offset + 1
        await message.channel.basic_ack(delivery_tag(message), wait=False)
        marker = headers.get(MARKER_HEADER)
        if marker is not None:
            if isinstance(marker, bytes):
                marker = marker.decode()
            if marker == self._marker:
                self._caught_up.set()
                self._on_change()
            return
        try:
            control = ControlMessage.model_validate_json(message.body)
        except (ValidationError, ValueError) as exc:
            log.warning("invalid control message ignored", error=str(exc)[:200])
            return
        apply(self.state, control)
        if self._caught_up.is_set():
            log.info("control changed", kind=control.kind, target=control.target,
                     limit=control.limit)
            self._on_change()
