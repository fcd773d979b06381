"""Several runs of one worker writing to one transactional token channel (no broker).

A worker's runs share its session's slots channel, which holds their tokens in
`tx.select` mode, and take, give back and scan on it at the same time. RabbitMQ 3.10
closes the connection of a channel that receives any command while a `tx.commit` on it
waits for its reply ("unexpected command while processing 'tx.commit'"), and aiormq
keeps only its requests with a reply (get, publish, commit) one at a time on a
channel: an acknowledgement or a requeue is written at once. A transaction is the
channel's, not a run's: one run's commit also commits what another has written so far.

The channel here plays the token queue as RabbitMQ and aiormq together treat it:
acknowledgements, requeues and publishes take effect at the commit, a reply comes a
few scheduling rounds after its request, and a command that reaches the broker while
a commit waits for its reply is recorded as refused (the broker would close the
connection).
"""

from __future__ import annotations

from collections import Counter, deque
from types import SimpleNamespace
from typing import Any, cast

import aiormq.abc
import anyio
import anyio.lowlevel
import pytest
from pamqp import commands as spec

from mq_worker.control import TokenMessage, encode
from mq_worker.limits import ControlState, Limit
from mq_worker.slot_requests import Lease, SlotRequests
from mq_worker.spares import HeldToken
from mq_worker.topology import limit_queue_name

TARGET = "key:db"
LIMIT = 6
pytestmark = pytest.mark.anyio


class TxChannel:
    """A channel to TARGET's token queue in `tx.select` mode."""

    def __init__(self) -> None:
        self.ready: deque[tuple[bytes, bool]] = deque()  # (token, marked redelivered)
        self.held: dict[int, tuple[bytes, bool]] = {}
        self.pending: list[tuple[str, Any]] = []
        self.commits: list[list[tuple[str, bytes]]] = []  # (ack | nack | publish, token)
        self.refused: list[str] = []
        self.committing = False
        self.tags = 0
        self.is_closed = False
        self.connection = SimpleNamespace(channel=None)
        self._requests = anyio.Lock()  # aiormq: one request with a reply at a time

    def put(self, number: int, marked: bool = False) -> None:
        self.ready.append((encode(TokenMessage(target=TARGET, number=number, version=1)),
                           marked))

    def tokens(self) -> list[tuple[int, bool]]:
        """What the queue holds ready: (number, marked)."""
        return sorted((TokenMessage.model_validate_json(body).number, marked)
                      for body, marked in self.ready)

    def _arrives(self, command: str) -> None:
        if self.committing:
            self.refused.append(command)

    @staticmethod
    async def _round_trip() -> None:
        for _ in range(3):
            await anyio.lowlevel.checkpoint()

    async def basic_get(self, queue: str, no_ack: bool) -> Any:
        assert queue == limit_queue_name(TARGET) and not no_ack
        async with self._requests:
            self._arrives("basic.get")
            await self._round_trip()
            if not self.ready:
                return SimpleNamespace(delivery=spec.Basic.GetEmpty())
            body, marked = self.ready.popleft()
            self.tags += 1
            self.held[self.tags] = (body, marked)
            return SimpleNamespace(body=body, delivery=spec.Basic.GetOk(
                delivery_tag=self.tags, redelivered=marked, exchange="", routing_key=queue,
                message_count=0))  # (no sweep: see SlotRequests._sweep)

    async def basic_ack(self, delivery_tag: int, wait: bool = True) -> None:
        self._arrives("basic.ack")  # written without aiormq's lock
        self.pending.append(("ack", delivery_tag))
        await anyio.lowlevel.checkpoint()

    async def basic_nack(self, delivery_tag: int, requeue: bool, wait: bool = True) -> None:
        assert requeue
        self._arrives("basic.nack")  # written without aiormq's lock
        self.pending.append(("nack", delivery_tag))
        await anyio.lowlevel.checkpoint()

    async def basic_publish(self, body: bytes, *, exchange: str, routing_key: str,
                            properties: Any) -> None:
        assert routing_key == limit_queue_name(TARGET)
        async with self._requests:
            self._arrives("basic.publish")
            self.pending.append(("publish", body))
            await anyio.lowlevel.checkpoint()

    async def tx_commit(self) -> None:
        async with self._requests:
            self._arrives("tx.commit")
            self.committing = True
            await self._round_trip()
            committed = []
            for kind, value in self.pending:
                if kind == "ack":
                    committed.append((kind, self.held.pop(value)[0]))
                elif kind == "nack":
                    body, _ = self.held.pop(value)
                    self.ready.appendleft((body, True))
                    committed.append((kind, body))
                else:
                    self.ready.append((value, False))
                    committed.append((kind, value))
            self.commits.append(committed)
            self.pending = []
            self.committing = False


def as_channel(channel: TxChannel) -> aiormq.abc.AbstractChannel:
    return cast(aiormq.abc.AbstractChannel, channel)


def requests() -> SlotRequests:
    return SlotRequests(ControlState(limits={TARGET: Limit(TARGET, LIMIT, ((0, LIMIT, 1),))}))


def split_releases(channel: TxChannel) -> list[list[tuple[str, bytes]]]:
    """Commits that acknowledged a token without publishing it again, or published one
    without acknowledging it: if the connection broke before the next commit, that
    slot would be lost (or doubled). Tokens over the limit are destroyed: acknowledged
    alone."""
    def valid(body: bytes) -> bool:
        return TokenMessage.model_validate_json(body).number < LIMIT

    return [commit for commit in channel.commits
            if Counter(b for k, b in commit if k == "ack" and valid(b))
            != Counter(b for k, b in commit if k == "publish")]


async def take_all(channel: TxChannel, slot_requests: SlotRequests, count: int
                   ) -> list[HeldToken]:
    lease = Lease(as_channel(channel))
    for _ in range(count):
        assert await slot_requests.take(TARGET, lease)
    return lease.tokens


async def release_after(rounds: int, channel: TxChannel, token: HeldToken) -> None:
    """A run of the worker ends, `rounds` scheduling rounds from now."""
    for _ in range(rounds):
        await anyio.lowlevel.checkpoint()
    await SlotRequests.settle(as_channel(channel), [token])


@pytest.mark.parametrize("spacing", range(6))  # scheduling rounds between two runs' ends
async def test_runs_giving_back_tokens_at_once_send_nothing_while_a_commit_waits(
    spacing: int
) -> None:
    channel = TxChannel()
    for number in range(LIMIT):
        channel.put(number)
    held = await take_all(channel, requests(), LIMIT)
    async with anyio.create_task_group() as tg:
        for index, token in enumerate(held):  # one run each
            tg.start_soon(release_after, index * spacing, channel, token)
    assert channel.refused == []
    assert split_releases(channel) == []
    assert channel.tokens() == [(number, False) for number in range(LIMIT)]
    assert channel.held == {} and channel.pending == []


@pytest.mark.parametrize("offset", range(12))
@pytest.mark.parametrize("kind", ["lost token put back", "stale token destroyed"])
async def test_a_take_that_commits_waits_for_a_release_on_the_same_channel(
    kind: str, offset: int
) -> None:
    # A run takes the free token behind a lost one and puts the lost one back, or
    # destroys a token over a shrunk limit, while another run of the worker ends.
    channel = TxChannel()
    channel.put(0)
    slot_requests = requests()
    [ending] = await take_all(channel, slot_requests, 1)
    channel.put(LIMIT if kind == "stale token destroyed" else 1,
                marked=kind == "lost token put back")
    channel.put(2)
    lease = Lease(as_channel(channel))
    async with anyio.create_task_group() as tg:
        tg.start_soon(release_after, offset, channel, ending)
        tg.start_soon(slot_requests.take, TARGET, lease)
    assert channel.refused == []
    assert split_releases(channel) == []
    assert [t.number for t in lease.tokens] == [2]
    assert channel.pending == []


@pytest.mark.parametrize("offset", range(12))
async def test_a_scan_that_puts_tokens_back_waits_for_a_release_on_the_same_channel(
    offset: int
) -> None:
    # Back from a lost connection, the worker scans for its runs' tokens on its new
    # slots channel, while a run admitted meanwhile ends there.
    channel = TxChannel()
    channel.put(5)
    slot_requests = requests()
    [ending] = await take_all(channel, slot_requests, 1)
    channel.put(1, marked=True)  # another worker's, lost with its connection
    channel.put(2)  # free
    channel.put(0, marked=True)  # this worker's
    async with anyio.create_task_group() as tg:
        tg.start_soon(release_after, offset, channel, ending)
        kept, _ = await slot_requests.scan(as_channel(channel), TARGET, {(0, 1)})
    assert channel.refused == []
    assert split_releases(channel) == []
    assert list(kept) == [(0, 1)]
    assert channel.tokens() == [(1, True), (2, False), (5, False)]
