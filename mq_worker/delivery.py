"""A run message delivered to this worker, with the slot it holds.

The consumer that received it (`mq_worker.consumer.RunConsumer`) acknowledges,
settles and frees it; a delivery reaches it only through `DeliveryOwner`.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import aiormq.abc
import anyio

from mq_worker.topology import DELIVERY_COUNT_HEADER


class DeliveryOwner(Protocol):
    """What a `Delivery` asks of the consumer that received it."""

    def on_hold(self, delivery: Delivery) -> None: ...

    async def ack_started(self, delivery: Delivery) -> None: ...

    async def settle(self, delivery: Delivery, *, requeue: bool, failed: bool) -> None: ...

    def release_slot(self, delivery: Delivery) -> None: ...


class Delivery:
    """A run message delivered to this worker, with the slot it holds."""

    __slots__ = (
        "_held",
        "_owner",
        "_slot_held",
        "body",
        "channel",
        "consumer_tag",
        "delivery_tag",
        "headers",
        "lost",
        "properties",
        "queue",
        "received_at",
        "redelivered",
        "routing_key",
        "settled",
        "started_at",
    )

    def __init__(
        self, owner: DeliveryOwner, message: aiormq.abc.DeliveredMessage, queue: str
    ) -> None:
        delivery: Any = message.delivery
        self._owner = owner
        self.channel = message.channel
        self.consumer_tag: str = delivery.consumer_tag
        self.delivery_tag: int = delivery.delivery_tag
        self.redelivered: bool = bool(delivery.redelivered)
        self.routing_key: str = delivery.routing_key
        self.queue = queue
        self.body: bytes = message.body
        self.properties = message.header.properties
        self.headers: dict[str, Any] = dict(self.properties.headers or {})
        self.received_at = time.monotonic()
        self.settled = False
        self.started_at: float | None = None  # when its run's process started
        self.lost = anyio.Event()
        self._slot_held = True
        self._held = False

    @property
    def delivery_count(self) -> int:
        """Earlier deliveries of this message, as counted by a quorum queue."""
        value = self.headers.get(DELIVERY_COUNT_HEADER, 0)
        return value if isinstance(value, int) else 0

    @property
    def held(self) -> bool:
        """Whether `hold()` was called: it stays unacknowledged until its start time."""
        return self._held

    def hold(self) -> None:
        """Say this message will stay unacknowledged a while (its run waits for its start
        time), so that it does not keep the window closed for runs that could start now."""
        if not self._held and not self.settled:
            self._held = True
            self._owner.on_hold(self)

    async def ack_started(self) -> None:
        """Acknowledge a run whose process has started; it keeps its slot."""
        self.started_at = time.monotonic()
        await self._owner.ack_started(self)

    async def settle(self, *, requeue: bool = False, failed: bool = False) -> None:
        """Acknowledge (or give back) a message whose run will not run here; free its slot.

        A message given back because handling it failed (`failed`) counts towards
        its queue's delivery limit; one given back for any other reason does not
        (on brokers that tell the two apart: RabbitMQ 4.3 and later).
        """
        await self._owner.settle(self, requeue=requeue, failed=failed)
        self.release_slot()

    def release_slot(self) -> None:
        """Free the slot of a run that has ended."""
        if self._slot_held:
            self._slot_held = False
            self._owner.release_slot(self)
