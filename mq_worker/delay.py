"""Parking runs in the broker until they are due, without plugins.

The delay ladder (declared in `topology.declare_delay_ladder`) has one quorum
queue per power of two seconds, 2**0 to 2**24. A run parked for D seconds gets
the routing key "b24.b23. ... .b0.run.scheduled.<pool>.<queue>" (the bits of D)
and is published to the top level. At each level it either waits 2**N seconds
(bit 1) or passes straight down (bit 0); after level 0 it reaches
`mq_worker.due`, where its work queue is bound, as an ordinary run message.

Every queue of the ladder has one fixed TTL, so its messages expire in arrival
order and a short delay is never stuck behind a long one. A parked message
takes at most 25 hops; each costs a few milliseconds.
"""

from __future__ import annotations

import math
from typing import Any

from pamqp import commands as spec

from mq_worker.topology import DELAY_LEVELS, MAX_PARK_SECONDS, delay_name


def ladder_routing_key(delay_seconds: int, target_routing_key: str) -> str:
    """The routing key that parks a message for `delay_seconds` (capped) before `target`."""
    delay = max(0, min(int(delay_seconds), MAX_PARK_SECONDS))
    bits = format(delay, f"0{DELAY_LEVELS}b")
    return ".".join(bits) + "." + target_routing_key


def park_seconds(seconds_until_due: float, prefetch_seconds: float) -> int:
    """Whole seconds to park a run that is due in `seconds_until_due`.

    With a prefetch window of 2 s or more the run comes back 1-2 s before it is due,
    a margin that covers the ladder's own transit (milliseconds), and the worker that
    takes it holds it and starts it exactly on time. A smaller window leaves less
    margin; with none the run comes back up to 1 s after it is due.
    """
    if prefetch_seconds >= 1.0:
        lead = min(1.0, prefetch_seconds - 1.0)
        return max(0, math.floor(seconds_until_due - lead))
    return max(0, math.ceil(seconds_until_due - prefetch_seconds))


async def park(
    channel: Any,
    *,
    body: bytes,
    properties: spec.Basic.Properties,
    target_routing_key: str,
    delay_seconds: int,
    timeout: float | None = None,
) -> None:
    """Publish a run into the ladder (confirmed), keeping its body and properties."""
    properties.delivery_mode = 2
    await channel.basic_publish(
        body,
        exchange=delay_name(DELAY_LEVELS - 1),
        routing_key=ladder_routing_key(delay_seconds, target_routing_key),
        properties=properties,
        mandatory=True,
        timeout=timeout,
    )
