"""Shared limits: what a worker back from a lost connection pays to take back its own token.

    .venv/bin/python -m benchmarks.take_back [--sizes 10 100 500 1000] [--rounds 5]

A limit of N (N token messages in a quorum queue, in a vhost of its own), all free but
the one a worker held when its connection was lost. `SlotRequests.take_back` scans the
token queue (see docs/pools.md, "Only its own tokens") on a transactional channel, as
the worker does after a reconnection. Two cases, each `rounds` times:

* cut off: a connection takes a token, then closes; the broker puts the token back, and
  the scan looks for it (where the broker puts it decides what the scan pays);
* at the back: the scan looks for the token that is last in the queue (the worst case:
  every other token is taken first);
* lost together: half the limit held by `workers` connections (as many tokens each),
  all closed at once, then `workers` others take back those tokens at the same moment
  (`take_back`, which looks again when another's scan held its token): `found` is the
  slowest worker's take back, `gets` all the gets made, and `missed` the tokens a
  worker did not find (its run would be stopped).

Figures (but lost together): `found`, from the scan's start until its own token is in
hand (the other tokens it took are still held then); `held`, until the others are back at the broker
(the commit's reply): how long a fresh run elsewhere can find no token free; and the
`basic.get`s made. The cut-off deadline is slots.CUT_OFF_SECONDS, counted from the loss,
reconnection included.
"""

from __future__ import annotations

import os
import time
from typing import Any

import aio_pika
import aiormq.abc
import anyio
from pamqp import commands as spec

from benchmarks._broker import vhost
from benchmarks._report import print_table, summarize_ms
from benchmarks._runner import command_line, run_benchmark
from mq_worker.control import TokenMessage, encode
from mq_worker.limits import ControlState, Limit
from mq_worker.slot_requests import Lease, SlotRequests
from mq_worker.slots import CUT_OFF_SECONDS
from mq_worker.spares import HeldToken
from mq_worker.topology import limit_queue_name

TARGET = "key:bench"
QUEUE = limit_queue_name(TARGET)


async def channel_of(connection: aio_pika.abc.AbstractConnection) -> aiormq.abc.AbstractChannel:
    return await (await connection.channel(publisher_confirms=False)).get_underlay_channel()


async def one_scan(requests: SlotRequests, channel: aiormq.abc.AbstractChannel,
                   wanted: tuple[int, int]) -> tuple[float, float, int]:
    """(found, held) in seconds and the gets made, for one scan; the token found is put
    back afterwards (as a free one)."""
    found_at: list[float] = []
    gets = 0
    settle, basic_get = requests.settle, channel.basic_get

    async def timed_settle(*args: Any, **kwargs: Any) -> None:
        found_at.append(time.perf_counter())
        await settle(*args, **kwargs)

    async def counted_get(*args: Any, **kwargs: Any) -> Any:
        nonlocal gets
        gets += 1
        return await basic_get(*args, **kwargs)

    requests.settle = timed_settle  # type: ignore[method-assign]
    channel.basic_get = counted_get  # type: ignore[method-assign]
    try:
        began = time.perf_counter()
        kept, _ = await requests.scan(channel, TARGET, {wanted})
        held = time.perf_counter() - began
    finally:
        requests.settle = settle  # type: ignore[method-assign]
        channel.basic_get = basic_get  # type: ignore[method-assign]
    assert set(kept) == {wanted}, kept
    found = (found_at[0] if found_at else time.perf_counter()) - began
    await requests.settle(channel, [token._replace(returned=False) for token in kept.values()])
    return found, held, gets


async def last_in_queue(channel: aiormq.abc.AbstractChannel, size: int) -> tuple[int, int]:
    """The token last in the queue: all taken, none acknowledged, then put back at the
    end of a transaction that publishes them again in the same order."""
    taken: list[HeldToken] = []
    for _ in range(size):
        message = await channel.basic_get(QUEUE, no_ack=False)
        assert isinstance(message.delivery, spec.Basic.GetOk)
        token = TokenMessage.model_validate_json(message.body)
        taken.append(HeldToken(TARGET, message.delivery.delivery_tag or 0, token.number,
                               token.version))
    await SlotRequests.settle(channel, taken)
    return taken[-1].number, taken[-1].version


async def lost_together(url: str, requests: SlotRequests, size: int, workers: int
                        ) -> tuple[float, int, int]:
    """(slowest take back, gets, tokens missed) for `workers` workers holding half the
    limit between them, cut off and back together."""
    each = max(1, size // (2 * workers))
    holders = [await aio_pika.connect(url) for _ in range(workers)]
    back = [await aio_pika.connect(url) for _ in range(workers)]
    try:
        leases = []
        for holder in holders:
            channel = await channel_of(holder)
            lease = Lease(None)
            for _ in range(each):
                message = await channel.basic_get(QUEUE, no_ack=False)
                assert isinstance(message.delivery, spec.Basic.GetOk)
                token = TokenMessage.model_validate_json(message.body)
                lease.tokens.append(HeldToken(TARGET, 0, token.number, token.version))
            leases.append(lease)
        channels = [await channel_of(connection) for connection in back]
        gets = 0
        for channel in channels:
            await channel.tx_select()
            basic_get = channel.basic_get

            async def counted_get(*args: Any, _get: Any = basic_get, **kwargs: Any) -> Any:
                nonlocal gets
                gets += 1
                return await _get(*args, **kwargs)

            channel.basic_get = counted_get  # type: ignore[method-assign]
        for holder in holders:
            await holder.close()
        until = time.monotonic() + CUT_OFF_SECONDS  # (their loss: the closes)
        missed = 0
        slowest = 0.0

        async def take_back(channel: aiormq.abc.AbstractChannel, lease: Lease) -> None:
            nonlocal missed, slowest
            began = time.perf_counter()
            found, _ = await requests.take_back(channel, [lease], until=until)
            slowest = max(slowest, time.perf_counter() - began)
            missed += len(lease.tokens) - len(found)

        async with anyio.create_task_group() as tg:
            for channel, lease in zip(channels, leases, strict=True):
                tg.start_soon(take_back, channel, lease)
        return slowest, gets, missed
    finally:
        for connection in back:  # the tokens found go back with it, marked
            await connection.close()


async def measure_size(size: int, rounds: int, workers: int) -> dict[str, Any]:
    with vhost(f"take-back-{size}") as host:
        connection = await aio_pika.connect(host.url)
        try:
            channel = await channel_of(connection)
            await channel.queue_declare(QUEUE, durable=True,
                                        arguments={"x-queue-type": "quorum"})
            await channel.tx_select()
            for number in range(size):
                await channel.basic_publish(
                    encode(TokenMessage(target=TARGET, number=number, version=1)),
                    exchange="", routing_key=QUEUE,
                    properties=spec.Basic.Properties(delivery_mode=2))
            await channel.tx_commit()
            state = ControlState(limits={TARGET: Limit(TARGET, size, ((0, size, 1),))})
            requests = SlotRequests(state)
            out: dict[str, dict[str, list[float]]] = {
                case: {"found": [], "held": [], "gets": [], "missed": []}
                for case in ("cut off", "at the back", "lost together")}
            for _ in range(rounds):
                holder = await aio_pika.connect(host.url)
                held_channel = await channel_of(holder)
                message = await held_channel.basic_get(QUEUE, no_ack=False)
                assert isinstance(message.delivery, spec.Basic.GetOk)
                token = TokenMessage.model_validate_json(message.body)
                await holder.close()
                # The connection's close is answered once the broker has put it back.
                for case in ("cut off", "at the back"):
                    wanted = ((token.number, token.version) if case == "cut off"
                              else await last_in_queue(channel, size))
                    found, held, gets = await one_scan(requests, channel, wanted)
                    out[case]["found"].append(found)
                    out[case]["held"].append(held)
                    out[case]["gets"].append(gets)
                found, gets, missed = await lost_together(host.url, requests, size,
                                                          min(workers, size // 2))
                out["lost together"]["found"].append(found)
                out["lost together"]["gets"].append(gets)
                out["lost together"]["missed"].append(missed)
        finally:
            await connection.close()
    return {case: {"found_ms": summarize_ms(figures["found"]),
                   "held_ms": summarize_ms(figures["held"]),
                   "gets": sorted(int(g) for g in figures["gets"]),
                   "missed": sorted(int(m) for m in figures["missed"])}
            for case, figures in out.items()}


async def measure(args: Any) -> dict[str, Any]:
    load_before = os.getloadavg()
    sizes = {str(size): await measure_size(size, args.rounds, args.workers)
             for size in args.sizes}
    return {"sizes": sizes, "load_average": {
        "before": [round(v, 2) for v in load_before],
        "after": [round(v, 2) for v in os.getloadavg()]}}


def report(result: dict[str, Any]) -> None:
    rows = []
    for size, cases in result["sizes"].items():
        for case, figures in cases.items():
            found, held = figures["found_ms"], figures["held_ms"]
            rows.append([size, case, found["p50"], found["max"], held.get("p50", ""),
                         held.get("max", ""), f"{min(figures['gets'])}-{max(figures['gets'])}",
                         sum(figures["missed"])])
    print_table("take back one's own token (ms)",
                ["limit", "case", "found p50", "found max", "held p50", "held max", "gets",
                 "missed"],
                rows)
    load = result["load_average"]
    print(f"load average (1, 5, 15 min): before {load['before']}, after {load['after']}")


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 500, 1000])
    parser.add_argument("--rounds", type=int, default=5, help="Scans per case and size.")
    parser.add_argument("--workers", type=int, default=10,
                        help="Workers cut off and back together (lost together).")
    run_benchmark("take_back", parser.parse_args(), measure, report)


if __name__ == "__main__":
    main()
