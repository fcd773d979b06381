"""What reading one AMQP frame costs a worker: aiormq's receiver against `frame_reading`'s.

    .venv/bin/python -m benchmarks.frames [--runs 5000] [--rounds 3]

The frames one run brings a worker at limit 8, `runs` times over (its delivery: method,
content header, body; two publisher confirms), fed to an asyncio StreamReader in pieces
the size of one run's frames and of a 4 KiB socket read, and read by aiormq's
`FrameReceiver` and by `BufferedFrameReceiver`, interleaved. Printed: CPU µs per frame, the
lowest of the rounds. No broker: the pieces stand in for what the socket brings.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import pamqp.frame
from pamqp import commands
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from benchmarks._report import banner, print_table, write_results
from mq_worker.frame_reading import BufferedFrameReceiver

AIORMQS = BufferedFrameReceiver.__mro__[1]
BODY = b'{"id": "0b9c8f0e-4c33-4f57-9d43-1d2f3c4b5a69", "command": "/bin/true"}' * 4
RUN_FRAMES = b"".join([
    pamqp.frame.marshal(commands.Basic.Deliver("ctag1.5f0c2e", 17, False, "mq_worker.runs",
                                               "default.default"), 1),
    pamqp.frame.marshal(ContentHeader(0, len(BODY), commands.Basic.Properties(
        content_type="application/json", delivery_mode=2, message_id="4c33")), 1),
    pamqp.frame.marshal(ContentBody(BODY), 1),
    pamqp.frame.marshal(commands.Basic.Ack(5, False), 2),
    pamqp.frame.marshal(commands.Basic.Ack(7, True), 2),
])
FRAMES_PER_RUN = 5


async def cpu_per_frame(receiver_class: type, runs: int, piece: int) -> float:
    reader = asyncio.StreamReader(limit=1 << 30)
    data = RUN_FRAMES * runs
    receiver = receiver_class(reader)

    async def feed() -> None:
        for at in range(0, len(data), piece):
            reader.feed_data(data[at:at + piece])
            if at + piece >= len(data):
                reader.feed_eof()  # with the last piece: the reading ends between frames
            await asyncio.sleep(0)

    feeding = asyncio.create_task(feed())
    began = time.process_time()
    frames = 0
    async for _ in receiver:
        frames += 1
    spent = time.process_time() - began
    await feeding
    assert frames == runs * FRAMES_PER_RUN
    return spent / frames * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    banner("frames")
    pieces = {"one run's frames": len(RUN_FRAMES), "4 KiB": 4096}
    receivers = {"aiormq's FrameReceiver": AIORMQS, "BufferedFrameReceiver": BufferedFrameReceiver}
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for piece_name, piece in pieces.items():
            for name, receiver in receivers.items():
                cost = asyncio.run(cpu_per_frame(receiver, args.runs, piece))
                key = (piece_name, name)
                best[key] = min(best.get(key, cost), cost)
    print_table(f"CPU µs per frame, lowest of {args.rounds} rounds of {args.runs} runs' frames",
                ["pieces read", "receiver", "µs per frame", "µs per run (5 frames)"],
                [[piece, name, round(cost, 2), round(cost * FRAMES_PER_RUN, 1)]
                 for (piece, name), cost in best.items()])
    write_results("frames", {"runs": args.runs, "rounds": args.rounds,
                             "us_per_frame": {f"{p} / {n}": c for (p, n), c in best.items()}})


if __name__ == "__main__":
    main()
