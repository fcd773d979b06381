"""Tolerant decoding of AMQP frames: one odd message property never costs a connection.

pamqp raises while decoding a content header whose `timestamp` property (or a
`T` header) lies past year 9999, as when a client stamps microseconds or
nanoseconds, or whose short strings or table keys are not UTF-8 (RabbitMQ
passes any bytes on). aiormq then drops the whole connection, and the broker
delivers the same message again: a work queue loops until its delivery limit,
a stream consumer resumes at the same offset forever. Such values are decoded
here as "absent" (a timestamp) or with replacement characters (a string), so
the message itself reaches the worker, which handles or rejects it like any
other.

`install()` replaces pamqp's decoders in its dispatch tables; it is idempotent
and called when `mq_worker.broker` is imported.
"""

from __future__ import annotations

import datetime
import struct
from collections.abc import Callable

from pamqp import common, decode

_TIMESTAMP_BYTES = 8
_installed = False


def tolerant_timestamp(value: bytes) -> tuple[int, datetime.datetime | None]:
    """A timestamp, or None when it is not representable (before year 1 or after 9999)."""
    if len(value) < _TIMESTAMP_BYTES:
        raise ValueError("Could not unpack timestamp value")
    try:
        return decode.timestamp(value)
    except (ValueError, OverflowError, OSError):
        return _TIMESTAMP_BYTES, None


def tolerant_short_str(value: bytes) -> tuple[int, str]:
    """A short string; bytes that are not UTF-8 become U+FFFD."""
    try:
        length = common.Struct.byte.unpack(value[0:1])[0]
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack short string value") from err
    return length + 1, value[1 : length + 1].decode("utf-8", errors="replace")


def tolerant_field_table(value: bytes) -> tuple[int, common.FieldTable]:
    """pamqp's field table decoder, with keys that are not UTF-8 decoded with U+FFFD."""
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
        offset = 4
        data: common.FieldTable = {}
        end = offset + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        while offset < end:
            key_length = common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = value[offset : offset + key_length].decode("utf-8", errors="replace")
            offset += key_length
            consumed, result = decode.embedded_value(value[offset:])
            offset += consumed
            data[key] = result
        return end, data
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err


def header_text(value: object) -> object:
    """A header value as text where it came as bytes (AMQP long strings are bytes): bytes
    that are not UTF-8 become replacement characters, so they compare unequal, not raise."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def install() -> None:
    """Make pamqp decode with the tolerant decoders (for every connection of the process)."""
    global _installed
    if _installed:
        return
    replacements: dict[str, Callable[..., tuple[int, common.FieldValue]]] = {
        "timestamp": tolerant_timestamp,
        "shortstr": tolerant_short_str,
        "table": tolerant_field_table,
    }
    decode.METHODS.update(replacements)
    decode.TABLE_MAPPING[b"T"] = tolerant_timestamp
    decode.TABLE_MAPPING[b"F"] = tolerant_field_table
    _installed = True
