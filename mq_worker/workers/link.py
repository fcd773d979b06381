"""The worker's link to the broker: the channels of the live session, if any."""

from __future__ import annotations

import aio_pika.abc
import aiormq.abc
import aiormq.exceptions
import anyio

from mq_worker import topology

# What a broken connection raises.
SESSION_ERRORS = (
    aiormq.exceptions.AMQPError,
    ConnectionError,
    OSError,
    RuntimeError,
    TimeoutError,
)


class Session:
    """The channels of one live connection."""

    def __init__(
        self,
        connection: aio_pika.abc.AbstractConnection,
        runs: aiormq.abc.AbstractChannel,
        publish: aiormq.abc.AbstractChannel,
        aux: aiormq.abc.AbstractChannel,
    ) -> None:
        self.connection = connection
        self.runs = runs
        self.publish = publish
        self.aux = aux
        self._ladder_declared = False
        self._ladder_lock = anyio.Lock()

    async def declare_delay_ladder(self, *, again: bool = False) -> None:
        """Declare the delay ladder once per session, or `again` (a publish was returned)."""
        async with self._ladder_lock:
            if again or not self._ladder_declared:
                await topology.declare_delay_ladder(self.publish)
                self._ladder_declared = True


class Link:
    """The session a worker has now (None between connections), and when the last ended."""

    def __init__(self) -> None:
        self.current: Session | None = None
        self.disconnected_at = 0.0

    @property
    def connected(self) -> bool:
        return self.current is not None

    async def wait_connected(self, timeout: float) -> Session | None:
        """The session, waiting up to `timeout` seconds for one (a reconnection under way)."""
        with anyio.move_on_after(timeout):
            # Rare (a reconnection at the end of an attempt): polling keeps the
            # session code free of a hook for it.
            while self.current is None:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        return self.current
