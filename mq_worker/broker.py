"""Connecting to RabbitMQ: several addresses, TLS, connection names, masked credentials."""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq.abc
import aiormq.exceptions
import anyio
from pamqp import commands as spec
from yarl import URL

from mq_worker import frame_reading, socket_writes, wire_decoding
from mq_worker.errors import BrokerError, ConfigurationError

wire_decoding.install()
frame_reading.install()

DEFAULT_URL = "amqp://guest:guest@localhost:5672/"
# Seconds between AMQP heartbeats; a silent peer is declared dead after about two.
DEFAULT_HEARTBEAT = 10

# The password of an AMQP or HTTP URL (any case) runs to the last '@' before the
# path, as a URL parser reads it: it may contain an unescaped '@'. The pattern
# starts with a literal scheme and never scans past a '/', so it stays linear
# on long log lines.
_URL_PASSWORD = re.compile(r"((?:amqps?|https?)://[^:/@\s]*:)([^/\s]*)(@)", re.IGNORECASE)


def mask_url(url: str) -> str:
    """`url` with its password replaced by '****'."""
    return _URL_PASSWORD.sub(r"\1****\3", url)


def mask_secrets(text: str) -> str:
    """`text` with the password of every URL in it replaced by '****'."""
    return _URL_PASSWORD.sub(r"\1****\3", text)


@dataclass(frozen=True)
class TlsOptions:
    """Files for TLS connections (`amqps://`): a CA bundle and an optional client certificate."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        """A client context that checks the broker's certificate and host name.

        Raises ConfigurationError naming the file that cannot be used.
        """
        if self.key_file and not self.cert_file:
            raise ConfigurationError("cannot load TLS files: a key file needs a certificate file")
        try:
            context = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"cannot load TLS files: CA file {self.ca_file}: {exc}"
            ) from exc
        if self.cert_file:
            try:
                context.load_cert_chain(
                    str(self.cert_file), str(self.key_file) if self.key_file else None
                )
            except (OSError, ssl.SSLError) as exc:
                files = f"{self.cert_file}" + (f" and key file {self.key_file}"
                                               if self.key_file else "")
                raise ConfigurationError(
                    f"cannot load TLS files: certificate file {files}: {exc}"
                ) from exc
        return context


def split_urls(values: str | Sequence[str]) -> list[str]:
    """Broker addresses from repeated options and/or comma-separated lists."""
    items = [values] if isinstance(values, str) else list(values)
    urls = [u.strip() for item in items for u in item.split(",") if u.strip()]
    for url in urls:
        if URL(url).scheme not in ("amqp", "amqps"):
            raise ConfigurationError(f"not an AMQP URL: {mask_url(url)}")
    return urls or [DEFAULT_URL]


def _with_heartbeat(url: str, heartbeat: int) -> str:
    parsed = URL(url)
    if "heartbeat" in parsed.query:
        return url
    return str(parsed.update_query(heartbeat=str(heartbeat)))


async def connect(
    urls: Sequence[str],
    *,
    name: str,
    tls: TlsOptions | None = None,
    timeout: float = 10.0,
    heartbeat: int = DEFAULT_HEARTBEAT,
    start: int = 0,
) -> tuple[aio_pika.abc.AbstractConnection, int]:
    """Connect to the first address that answers, trying them in order from `start`.

    Returns the connection and the index of the address used, so that a caller
    reconnecting after a failure can begin with the next one.
    """
    errors: list[str] = []
    context = None
    for offset in range(len(urls)):
        index = (start + offset) % len(urls)
        url = urls[index]
        if URL(url).scheme == "amqps" and context is None:
            context = (tls or TlsOptions()).context()
        try:
            connection = await aio_pika.connect(
                _with_heartbeat(url, heartbeat),
                client_properties={"connection_name": name},
                ssl_context=context if URL(url).scheme == "amqps" else None,
                timeout=timeout,
                # Keeps its socket's writer, for events written in the turn they are made.
                connection_class=socket_writes.KeepingConnection,
            )
        except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
            errors.append(f"{mask_url(url)}: {mask_secrets(str(exc)) or type(exc).__name__}")
            continue
        return connection, index
    raise BrokerError("cannot connect to RabbitMQ: " + "; ".join(errors))


class Link:
    """A connection with one channel, re-established (on the next address first) when lost.

    The publisher and the subscriber use it; the worker manages its own sessions.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        name: str,
        tls: TlsOptions | None = None,
        publisher_confirms: bool = True,
    ) -> None:
        self.urls = list(urls)
        self.name = name
        self.tls = tls
        self.publisher_confirms = publisher_confirms
        self.connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._index = 0

    async def channel(self) -> aiormq.abc.AbstractChannel:
        """The live channel, connecting first if needed."""
        if self._channel is None or self._channel.is_closed or self.connection is None \
                or self.connection.is_closed:
            await self.close()
            self.connection, self._index = await connect(
                self.urls, name=self.name, tls=self.tls, start=self._index
            )
            self._channel = await self.connection.channel(
                publisher_confirms=self.publisher_confirms,
                on_return_raises=self.publisher_confirms,
            )
        return await self._channel.get_underlay_channel()

    async def reset(self) -> None:
        """Drop the connection; the next `channel()` tries the next address first."""
        await self.close()
        self._index += 1

    async def close(self) -> None:
        connection, self.connection, self._channel = self.connection, None, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(aiormq.exceptions.AMQPError, OSError, RuntimeError):
                await connection.close()


class ConsumerCancelledByBroker(ConnectionError):
    """The broker cancelled one of our consumers (its queue was deleted, for example)."""


async def raise_on_server_cancel(channel: aiormq.abc.AbstractChannel, what: str) -> None:
    """Raise ConsumerCancelledByBroker when the broker cancels a consumer of `channel`.

    Run as a task of a session, it turns a consumer the broker dropped into a
    session error, so the session starts again and declares and consumes anew
    instead of silently receiving nothing.
    """
    cancelled: list[str] = []
    event = anyio.Event()

    def on_cancel(frame: Any) -> None:
        cancelled.append(str(frame.consumer_tag))
        event.set()

    channel.on_consumer_cancel_callbacks.add(on_cancel)
    try:
        await event.wait()
        raise ConsumerCancelledByBroker(
            f"the broker cancelled the consumer {cancelled[0]} of {what} (queue deleted?)")
    finally:
        channel.on_consumer_cancel_callbacks.discard(on_cancel)


async def wait_closing(channel: aiormq.abc.AbstractChannel) -> None:
    """Return once `channel` or its connection closes, also when the broker closed them
    (aio-pika's own `closed()` does not see that). Cancelling the wait leaves the channel be."""
    closing = anyio.Event()

    def on_closing(_: object) -> None:
        closing.set()

    channel.closing.add_done_callback(on_closing)
    try:
        await closing.wait()
    finally:
        channel.closing.remove_done_callback(on_closing)


def deliver_frame(message: aiormq.abc.DeliveredMessage) -> spec.Basic.Deliver:
    """The basic.deliver frame of a consumed message (its tag, routing key, flags)."""
    frame = message.delivery
    assert isinstance(frame, spec.Basic.Deliver), frame
    return frame


def delivery_tag(message: aiormq.abc.DeliveredMessage) -> int:
    tag = deliver_frame(message).delivery_tag
    assert tag is not None
    return tag
