"""One transaction at a time on each channel that holds slot tokens.

A worker's token channels are in `tx.select` mode (see SlotRequests.settle), and
several of its runs write to one of them at once: the session's slots channel holds
the tokens of all its runs. Two things forbid them to interleave there:

* RabbitMQ 3.10 closes the connection of a channel that receives any command while
  a `tx.commit` on it waits for its reply (CHANNEL_ERROR "unexpected command while
  processing 'tx.commit'"),
  and aiormq keeps only requests with a reply (get, publish, commit) one at a time on
  a channel: an acknowledgement or a requeue goes out at once;
* a transaction is the channel's: one run's commit also commits what another has
  written so far, such as a token's acknowledgement without its publish, which a
  connection lost before the other's own commit turns into a lost slot.

So every sequence of writes to a token channel that ends with its commit holds the
channel's `transaction` lock from its first write to the commit's reply. A lone
`basic.get` needs no more than aiormq's own lock: it writes nothing to the transaction.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Collection

import aiormq.abc
import anyio
from pamqp import commands as spec

from mq_worker import topology
from mq_worker.control import TokenMessage, encode
from mq_worker.spares import HeldToken

_PERSISTENT = 2

# By id: a channel is compared by identity. The entry goes with the channel; one that
# takes no weak reference (a stand-in in a test) keeps its entry, and an id is reused
# only once its channel is gone, so never while a lock of it is held.
_locks: dict[int, anyio.Lock] = {}


def transaction(channel: aiormq.abc.AbstractChannel) -> anyio.Lock:
    """The lock held by whoever writes to `channel`'s transaction, until its commit."""
    key = id(channel)
    lock = _locks.get(key)
    if lock is None:
        lock = _locks[key] = anyio.Lock()
        with contextlib.suppress(TypeError):
            weakref.finalize(channel, _locks.pop, key, None)
    return lock


async def settle_on(channel: aiormq.abc.AbstractChannel, tokens: list[HeldToken],
                    destroy: Collection[HeldToken]) -> None:
    """Give back `tokens` held on `channel` (destroyed if in `destroy`) in one
    transaction of its own (see SlotRequests.settle; the caller shields it)."""
    async with transaction(channel):
        for token in tokens:
            if token in destroy:
                await channel.basic_ack(token.tag)
            elif token.returned:  # put back as it is: still marked
                await channel.basic_nack(token.tag, requeue=True, wait=False)
            else:
                await channel.basic_ack(token.tag)
                await channel.basic_publish(
                    encode(TokenMessage(target=token.target, number=token.number,
                                        version=token.version)),
                    exchange="", routing_key=topology.limit_queue_name(token.target),
                    properties=spec.Basic.Properties(delivery_mode=_PERSISTENT))
        await channel.tx_commit()
