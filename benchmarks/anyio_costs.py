"""What anyio costs a run on the worker's hot path: calls counted in a worker, steps timed alone.

    .venv/bin/python -m benchmarks.anyio_costs [--runs 1000] [--seconds 1] [--no-count]
    .venv/bin/python <this file> ...      (also from another checkout's venv: it imports
                                            nothing of benchmarks/, so it counts that tree)

*Counted*: a ProcessWorker serving in this process (limit 8, against a vhost of its own)
takes `runs` runs of /bin/true after 50 to warm up, while a `sys.setprofile` hook counts
every Python call and the calls into anyio by the function called from outside anyio (a
coroutine's call is counted again each time it resumes), and who makes events, tasks and
cancel scopes; printed per run. The hook slows the worker down, so it counts, it does
not time. *Timed*: each anyio step of a run alone, under uvloop as a worker runs, in CPU
microseconds per step (best of 5 rounds): a handler task started and run to its end, 8 at a
time, through anyio's task group, the loop's `create_task`, and `mq_worker.concurrency`'s
`TaskPool` when the tree has it; an `anyio.Event`; a `CapacityLimiter` slot taken and given
back on behalf of a delivery; a cancel scope; `move_on_after`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import anyio
import orjson

from mq_worker import logs
from mq_worker.settings import WorkerSettings
from mq_worker.testing import LocalBroker
from mq_worker.workers.process import ProcessWorker

TRUE = shutil.which("true") or "/bin/true"
BATCH = 8  # handler tasks alive at once: a worker's limit in the benchmarks
WARM_UP = 50
# The costly calls whose callers are counted too.
MADE_WHERE = {"Event.__new__", "TaskGroup.start_soon", "TaskGroup.start", "CancelScope.__init__",
              "create_task_group"}


# -- counted -------------------------------------------------------------------------------

async def _publish(url: str, count: int, stream_output: bool = False) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("mq_worker.runs", ensure=True)
        for _ in range(count):
            body = orjson.dumps({"id": str(uuid.uuid4()),
                                 "job_variables": {"command": TRUE,
                                                   "stream_output": stream_output}})
            await exchange.publish(aio_pika.Message(body, delivery_mode=2),
                                   routing_key="run.scheduled.default.default")


async def _until_finished(worker: ProcessWorker, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(worker._book.finished) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(worker._book.finished)} of {count} runs ended")
        await asyncio.sleep(0.02)  # not anyio's: its calls would be counted


async def count_calls(runs: int) -> dict[str, Any]:
    logs.configure("json", "WARNING")
    with LocalBroker.from_environment().throwaway_vhost("bench-anyio") as vhost:
        worker = ProcessWorker(WorkerSettings(url=[vhost.url], name="anyio-costs", limit=8,
                                              heartbeat_seconds=30.0))
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.serve)
            await worker.ready.wait()
            await _publish(vhost.url, WARM_UP)
            await _until_finished(worker, WARM_UP)
            calls = 0
            entries: Counter[str] = Counter()
            inside: Counter[str] = Counter()
            where: Counter[str] = Counter()

            def hook(frame: Any, event: str, arg: Any) -> None:
                nonlocal calls
                if event == "call":
                    calls += 1
                    code = frame.f_code
                    if "/anyio/" in code.co_filename:
                        inside[code.co_qualname] += 1
                        caller = frame.f_back
                        if caller is None or "/anyio/" not in caller.f_code.co_filename:
                            entries[code.co_qualname] += 1
                            if code.co_qualname in MADE_WHERE and caller is not None:
                                where[f"{code.co_qualname} from {caller.f_code.co_qualname}"] += 1

            publisher = asyncio.ensure_future(_publish(vhost.url, runs))
            began = time.process_time()
            sys.setprofile(hook)
            try:
                await _until_finished(worker, WARM_UP + runs)
            finally:
                sys.setprofile(None)
            cpu = time.process_time() - began
            await publisher
            worker.stop()
    return {
        "runs": runs, "calls_per_run": calls / runs,
        "anyio_calls_per_run": sum(inside.values()) / runs,
        "cpu_ms_per_run_profiled": cpu / runs * 1e3,
        "anyio_entries_per_run": {k: round(v / runs, 3) for k, v in entries.most_common()
                                  if v / runs >= 0.01},
        "made_where_per_run": {k: round(v / runs, 3) for k, v in where.most_common()
                               if v / runs >= 0.01},
    }


# -- timed ---------------------------------------------------------------------------------

def _best(rounds: list[float]) -> float:
    return min(rounds)


async def _per_step(step: Callable[[int], Awaitable[None]], seconds: float) -> float:
    """CPU microseconds per unit of `step(n)` (which does n units), best of 5 rounds."""
    n = 64
    while True:
        began = time.process_time()
        await step(n)
        if time.process_time() - began > seconds / 20:
            break
        n *= 4
    n = max(BATCH, int(n * 4))
    rounds = []
    for _ in range(5):
        began = time.process_time()
        await step(n)
        rounds.append((time.process_time() - began) / n * 1e6)
    return _best(rounds)


async def _handler() -> None:
    await asyncio.sleep(0)  # a handler suspends at least once


async def time_steps(seconds: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    results: dict[str, float] = {}
    done = 0

    async def counted() -> None:
        nonlocal done
        await _handler()
        done += 1

    async def until(target: int) -> None:
        while done < target:  # noqa: ASYNC110 - the loop's turns are part of what is timed
            await asyncio.sleep(0)

    async def anyio_tasks(n: int) -> None:
        nonlocal done
        done = 0
        async with anyio.create_task_group() as tg:
            for i in range(0, n, BATCH):
                for _ in range(BATCH):
                    tg.start_soon(counted)
                await until(i + BATCH)

    async def native_tasks(n: int) -> None:
        nonlocal done
        done = 0
        keep = set()
        for i in range(0, n, BATCH):
            for _ in range(BATCH):
                task = loop.create_task(counted())
                keep.add(task)
                task.add_done_callback(keep.discard)
            await until(i + BATCH)

    results["task: anyio TaskGroup.start_soon, run to its end"] = await _per_step(
        anyio_tasks, seconds)
    results["task: loop.create_task, run to its end"] = await _per_step(native_tasks, seconds)
    try:
        from mq_worker.concurrency import TaskPool
    except ImportError:
        pass
    else:
        async def _item(_: int) -> None:
            await counted()

        async def pooled(n: int) -> None:
            nonlocal done
            done = 0
            async with anyio.create_task_group() as tg:
                pool = TaskPool(tg, _item, keep=BATCH)
                for i in range(0, n, BATCH):
                    for _ in range(BATCH):
                        pool.start_soon(i)
                    await until(i + BATCH)
                pool.close()

        results["task: TaskPool.start_soon (idle tasks reused), run to its end"] = (
            await _per_step(pooled, seconds))

    def sync_step(step: Callable[[], Any]) -> Callable[[int], Awaitable[None]]:
        async def repeat(n: int) -> None:
            for _ in range(n):
                step()
        return repeat

    limiter = anyio.CapacityLimiter(8)
    token = object()

    def slot() -> None:
        limiter.acquire_on_behalf_of_nowait(token)
        limiter.release_on_behalf_of(token)

    def scope() -> None:
        with anyio.CancelScope():  # noqa: ASYNC100 - the scope's own cost is timed
            pass

    def move_on() -> None:
        with anyio.move_on_after(60):  # noqa: ASYNC100 - the scope's own cost is timed
            pass

    results["anyio.Event()"] = await _per_step(sync_step(anyio.Event), seconds)
    results["CapacityLimiter acquire_on_behalf_of_nowait + release_on_behalf_of"] = (
        await _per_step(sync_step(slot), seconds))
    results["anyio.CancelScope() entered and left"] = await _per_step(sync_step(scope), seconds)
    results["anyio.move_on_after(60) entered and left"] = await _per_step(
        sync_step(move_on), seconds)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=1.0, help="per timed step")
    parser.add_argument("--no-count", action="store_true", help="time the steps only")
    args = parser.parse_args()
    options = {"use_uvloop": True}
    steps = anyio.run(time_steps, args.seconds, backend="asyncio", backend_options=options)
    print("| step | CPU µs (best of 5) |\n|---|---|")
    for name, value in steps.items():
        print(f"| {name} | {value:.2f} |")
    if not args.no_count:
        counted = anyio.run(count_calls, args.runs, backend="asyncio", backend_options=options)
        print(f"\nper run over {counted['runs']} runs: Python calls {counted['calls_per_run']:.0f},"
              f" of them in anyio {counted['anyio_calls_per_run']:.1f};"
              f" CPU with the hook {counted['cpu_ms_per_run_profiled']:.2f} ms")
        print("| anyio called from outside anyio | per run |\n|---|---|")
        for name, value in counted["anyio_entries_per_run"].items():
            print(f"| {name} | {value} |")
        print("| made by | per run |\n|---|---|")
        for name, value in counted["made_where_per_run"].items():
            print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
