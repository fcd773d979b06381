"""Reading a connection's AMQP frames from what one socket read brought, not a read per part.

aiormq's `FrameReceiver` reads each frame in three awaited `readexactly` calls (its type,
its channel and size, then its payload) under an asyncio lock, into a `BytesIO` of its own:
~14 % of a worker's Python calls per run at limit 8 (`benchmarks.calls`), for the 6-7
frames a run brings (its delivery's three, the events' confirms). `BufferedFrameReceiver`
reads whatever the socket has (up to `READ_SIZE`) and cuts every whole frame out of it
without awaiting; it awaits only when no whole frame is left. The frames and their order
are the same; so are its errors: a connection that ends mid-frame, or a frame pamqp cannot
decode, raise what aiormq's raise, and a connection that ended between frames ends the
iteration. One difference: frames already read are handed out before a socket error that
came after them (aiormq's receiver raised it at once), so a `Connection.Close` the broker
sent before a reset is seen.

`install()` makes aiormq use it for every connection (aiormq builds its receiver from the
module's name when it connects); it is idempotent and called when `mq_worker.broker` is
imported.
"""

from __future__ import annotations

import asyncio

import aiormq.connection
import pamqp.frame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp import base, commands
from pamqp.exceptions import PAMQPException

__all__ = ["READ_SIZE", "BufferedFrameReceiver", "install"]

READ_SIZE = 1 << 16
_HEAD = 7  # type (1), channel (2), payload size (4); then the payload and a frame-end byte
_METHOD_FRAME = 1
_FRAME_END = 0xCE
_ACK = commands.Basic.Ack.index
_DELIVER = commands.Basic.Deliver.index


class BufferedFrameReceiver(aiormq.connection.FrameReceiver):
    """aiormq's frame receiver, reading the socket in chunks and cutting frames from them."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._data: bytes | bytearray = b""
        self._offset = 0

    async def get_frame(self) -> aiormq.connection.ReceivedFrame:
        frame = self._cut()
        if frame is not None:
            return frame
        if self._offset == len(self._data) and self.reader.at_eof():
            del self.reader
            raise StopAsyncIteration
        async with self.lock:  # one refill at a time, as aiormq reads one frame at a time
            while (frame := self._cut()) is None:
                await self._refill()
        return frame

    def _cut(self) -> aiormq.connection.ReceivedFrame | None:
        """The next whole frame in the data read, or None when it is not all there yet."""
        data, start = self._data, self._offset
        if len(data) - start < _HEAD:
            return None
        if not self.started:
            if data.startswith(b"AMQP", start):
                raise ProtocolSyntaxError("Unexpected AMQP protocol header")
            self.started = True
        end = start + _HEAD + int.from_bytes(data[start + 3:start + _HEAD], "big") + 1
        if end > len(data):
            return None
        self._offset = end
        if data[start] == _METHOD_FRAME and data[end - 1] == _FRAME_END:
            method = _common_method(data, start + _HEAD, end - 1)
            if method is not None:
                return end - start, int.from_bytes(data[start + 1:start + 3], "big"), method
        try:
            return pamqp.frame.unmarshal(bytes(data[start:end]))
        except PAMQPException as e:
            raise InvalidFrameError(str(e)) from e

    async def _refill(self) -> None:
        """Read what the socket has, after the part of a frame left over (kept in a
        bytearray that grows, so a large frame arriving in pieces is copied once)."""
        try:
            chunk = await self.reader.read(READ_SIZE)
        except ConnectionRefusedError as e:
            raise AMQPConnectionError(f"Server connection refused: {e!r}") from e
        except ConnectionResetError as e:
            raise AMQPConnectionError(f"Server connection reset: {e!r}") from e
        except ConnectionError as e:
            raise AMQPConnectionError(f"Server connection error: {e!r}") from e
        except OSError as e:
            raise AMQPConnectionError(f"Server communication error: {e!r}") from e
        data, offset = self._data, self._offset
        if not chunk:
            read, expected = _aiormqs_shortfall(data[offset:])
            raise AMQPConnectionError(
                "Server connection unexpectedly closed. "
                f"Read {read} bytes but {expected} bytes expected")
        if offset == len(data):
            self._data = chunk
        elif offset == 0 and isinstance(data, bytearray):
            data += chunk
        else:
            self._data = bytearray(data[offset:]) + chunk
        self._offset = 0


def _aiormqs_shortfall(rest: bytes | bytearray) -> tuple[int, int]:
    """What aiormq says it had read and expected of the frame a connection ended in: it
    reads a frame's type alone, then its channel and size, then its payload and end."""
    if not rest:
        return 0, 1
    if len(rest) < _HEAD:
        return len(rest) - 1, _HEAD - 1
    return len(rest) - _HEAD, int.from_bytes(rest[3:_HEAD], "big") + 1


def _common_method(data: bytes | bytearray, start: int, end: int) -> base.Frame | None:
    """`Basic.Ack` (a publisher confirm) or `Basic.Deliver` decoded from `data[start:end]`
    as pamqp decodes them (short strings as `wire_decoding` does), at a fifth of pamqp's
    cost; None for any other method, or one that does not fill its frame exactly (pamqp
    then decodes it, or says why it cannot)."""
    index = int.from_bytes(data[start:start + 4], "big")
    at = start + 4
    try:
        if index == _ACK:
            ack = commands.Basic.Ack()
            ack.delivery_tag = int.from_bytes(data[at:at + 8], "big", signed=True)
            ack.multiple = bool(data[at + 8] & 1)
            return ack if at + 9 == end else None
        if index == _DELIVER:
            deliver = commands.Basic.Deliver()
            deliver.consumer_tag, at = _short_string(data, at)
            deliver.delivery_tag = int.from_bytes(data[at:at + 8], "big", signed=True)
            deliver.redelivered = bool(data[at + 8] & 1)
            deliver.exchange, at = _short_string(data, at + 9)
            deliver.routing_key, at = _short_string(data, at)
            return deliver if at == end else None
    except IndexError:
        return None
    return None


def _short_string(data: bytes | bytearray, at: int) -> tuple[str, int]:
    length = data[at]
    return data[at + 1:at + 1 + length].decode("utf-8", errors="replace"), at + 1 + length


def install() -> None:
    aiormq.connection.FrameReceiver = BufferedFrameReceiver  # type: ignore[misc]
