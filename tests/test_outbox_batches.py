"""The outbox on a real broker: events published in order, confirmed, and written to the
socket a batch at a time (counted with strace, not timed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import anyio
import orjson
import pytest

from mq_worker import broker, socket_writes, topology
from mq_worker.events import build_event
from mq_worker.outbox import Outbox
from tests.helpers import PYTHON, VHost

EVENTS = 60
_PUBLISHING = f"""
import asyncio, sys
import aiormq
from mq_worker import topology
from mq_worker.events import build_event
from mq_worker.outbox import Outbox

async def main():
    connection = await aiormq.connect(sys.argv[1])
    channel = await connection.channel(publisher_confirms=True)
    await topology.declare_exchanges(channel)
    await channel.queue_declare("seen", durable=True)
    await channel.queue_bind("seen", topology.EVENTS_EXCHANGE, routing_key="mq_worker.run.#")
    outbox = Outbox()
    publishing = asyncio.create_task(outbox.publish_forever(channel))
    print("start", file=sys.stderr, flush=True)
    for i in range({EVENTS}):
        outbox.put(build_event("mq_worker.run.submitted", source="/test", subject=str(i),
                               data={{"index": i}}))
    await outbox.wait_empty()
    print("end", file=sys.stderr, flush=True)
    publishing.cancel()
    print(outbox.published)
    seen = []
    while len(seen) < {EVENTS}:
        message = await channel.basic_get("seen", no_ack=True)
        if message.body:
            seen.append(message.body)
    print(b"\\n".join(seen).decode())
    await connection.close()

asyncio.run(main())
"""


def _traced(script: str, url: str, trace: Path) -> subprocess.CompletedProcess[str]:
    """Run `script` against `url` under strace, recording its socket writes in `trace`."""
    return subprocess.run(
        ["strace", "-e", "trace=write,sendto,sendmsg,writev", "-o", str(trace), PYTHON, "-c",
         script, url], capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_events_are_confirmed_in_order_and_written_a_batch_at_a_time(
    vhost: VHost, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    trace = tmp_path / "trace"
    result = _traced(_PUBLISHING, vhost.url, trace)
    published, *bodies = result.stdout.splitlines()
    assert int(published) == EVENTS
    assert [orjson.loads(b)["data"]["index"] for b in bodies] == list(range(EVENTS))
    lines = trace.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if '"start' in line)
    end = next(i for i, line in enumerate(lines) if '"end' in line)
    sends = [line for line in lines[start + 1:end]
             if re.match(r"(write|sendto|sendmsg|writev)\((?![12],)", line)]
    assert len(sends) == 1


_ACK_AND_EVENTS = """
import asyncio, sys
import aiormq
from mq_worker import topology
from mq_worker.events import build_event
from mq_worker.outbox import Outbox

async def main():
    connection = await aiormq.connect(sys.argv[1])
    events = await connection.channel(publisher_confirms=True)
    runs = await connection.channel()
    await topology.declare_exchanges(events)
    await runs.queue_declare("work", durable=True)
    await runs.basic_publish(b"run", routing_key="work")
    delivered = await runs.basic_get("work")
    outbox = Outbox()
    publishing = asyncio.create_task(outbox.publish_forever(events))
    outbox.put(build_event("mq_worker.worker.started", source="/test", subject="w", data={}))
    await outbox.wait_empty()
    print("start", file=sys.stderr, flush=True)
    # One loop turn, as when a run starts: its ack, and its event.
    acking = asyncio.create_task(runs.basic_ack(delivered.delivery_tag))
    outbox.put(build_event("mq_worker.run.submitted", source="/test", subject="r", data={}))
    await acking
    await outbox.wait_empty()
    print("end", file=sys.stderr, flush=True)
    publishing.cancel()
    await asyncio.sleep(0)
    print((await runs.queue_declare("work", passive=True)).message_count)
    await connection.close()

asyncio.run(main())
"""


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_an_ack_and_the_events_of_the_same_loop_turn_share_one_socket_write(
    vhost: VHost, tmp_path  # type: ignore[no-untyped-def]
) -> None:
    trace = tmp_path / "trace"
    result = _traced(_ACK_AND_EVENTS, vhost.url, trace)
    assert result.stdout.split() == ["0"]  # the ack reached the broker
    lines = trace.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if '"start' in line)
    end = next(i for i, line in enumerate(lines) if '"end' in line)
    sends = [line for line in lines[start + 1:end]
             if re.match(r"(write|sendto|sendmsg|writev)\((?![12],)", line)]
    assert len(sends) == 1


@pytest.mark.anyio
async def test_events_sent_at_once_leave_for_the_socket_in_the_callers_turn_in_order(
        vhost: VHost) -> None:
    """On a worker's connection (`broker.connect`), `send_now` writes the events itself:
    nothing waits in aiormq's write queue for its writer, the socket has taken them, and
    the broker confirms them and routes them in order."""
    connection, _ = await broker.connect([vhost.url], name="test")
    try:
        channel = await (await connection.channel(publisher_confirms=True)).get_underlay_channel()
        await topology.declare_exchanges(channel)
        await channel.queue_declare("seen", durable=True)
        await channel.queue_bind("seen", topology.EVENTS_EXCHANGE, routing_key="mq_worker.run.#")
        outbox = Outbox()
        async with anyio.create_task_group() as tg:
            tg.start_soon(outbox.publish_forever, channel)
            await anyio.wait_all_tasks_blocked()
            for event_type in ("mq_worker.run.pending", "mq_worker.run.submitted"):
                outbox.put(build_event(event_type, source="/test", subject="r", data={}))

            assert outbox.send_now()
            assert channel.write_queue.empty()
            assert socket_writes.writer_of(channel).transport.get_write_buffer_size() == 0

            with anyio.fail_after(10):
                await outbox.wait_empty()
            tg.cancel_scope.cancel()
        assert outbox.published == 2
        seen = []
        while len(seen) < 2:
            message = await channel.basic_get("seen", no_ack=True)
            if message.body:
                seen.append(orjson.loads(message.body)["type"])
        assert seen == ["mq_worker.run.pending", "mq_worker.run.submitted"]
    finally:
        await connection.close()
