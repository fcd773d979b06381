"""Marks inside a worker process, for `benchmarks.latency --marks`: when each run passed
the steps between its delivery and its `submitted` event's socket write.

Python imports this `sitecustomize` at start-up when its directory is on PYTHONPATH (the
benchmark puts it there, with MQ_WORKER_MARKS naming the output file). It wraps a few of
the worker's functions, private ones included, to note the time (CLOCK_REALTIME) and the
thread's CPU time at each, and writes them as JSON at exit. A wrapped function that no
longer exists is left out. The wrappers cost a few µs each: the marks show where the time
goes, not the latency without them.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import re
import time
from collections.abc import Callable
from typing import Any

_OUT = os.environ.get("MQ_WORKER_MARKS")
_SUBJECT = re.compile(rb'"subject":"([0-9a-f-]{36})"')
_marks: dict[str, dict[str, float]] = {}  # run id or "tag:N" -> point -> time
_run_of_tag: dict[str, str] = {}


def _mark(key: str, point: str) -> None:
    points = _marks.setdefault(key, {})
    if point not in points:
        points[point] = time.time()
        points[point + " (cpu)"] = time.thread_time()


def _wrap(owner: Any, name: str, key: Callable[..., str | None], point: str, *,
          after: bool = False) -> None:
    original = getattr(owner, name, None)
    if original is None:
        return
    if asyncio.iscoroutinefunction(original):
        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            found = key(*args, **kwargs)
            if found is not None:
                _mark(found, point)
            return await original(*args, **kwargs)
        setattr(owner, name, wrapped_async)
        return

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        found = key(*args, **kwargs)
        if found is not None and not after:
            _mark(found, point)
        result = original(*args, **kwargs)
        if found is not None and after:
            _mark(found, point)
        return result
    setattr(owner, name, wrapped)


def _dump() -> None:
    runs: dict[str, dict[str, float]] = {}
    for key, points in _marks.items():
        if key.startswith("tag:"):
            continue
        merged = dict(_marks.get(_run_of_tag.get(key, ""), {}))
        merged.update(points)
        runs[key] = merged
    with open(str(_OUT), "w") as file:
        json.dump(runs, file)


def _install() -> None:
    import aiormq.channel

    from mq_worker import confirmed_batch
    from mq_worker.workers import keeper, process, reporter

    def tag_of(frame: Any) -> str:
        return f"tag:{frame.delivery_tag}"

    def pending_key(_self: Any, active: Any, **_: Any) -> str:
        _run_of_tag[str(active.id)] = f"tag:{active.delivery.delivery_tag}"
        return str(active.id)

    def batch_key(_channel: Any, messages: Any) -> None:
        for message in messages:
            found = _SUBJECT.search(message.body)
            if message.routing_key.endswith(".submitted") and found:
                _mark(found.group(1).decode(), "outbox writes the batch")
        return None

    def write_key(_writer: Any, data: Any) -> None:
        if b"mq_worker.run.submitted" in data:
            for found in _SUBJECT.finditer(bytes(data)):
                _mark(found.group(1).decode(), "socket write")
        return None

    _wrap(aiormq.channel.Channel, "_on_deliver_frame", lambda _s, frame: tag_of(frame),
          "channel reads the delivery")
    _wrap(keeper.RunKeeper, "take", lambda _s, delivery: f"tag:{delivery.delivery_tag}",
          "handler starts")
    _wrap(reporter.Reporter, "pending", pending_key, "pending made")
    _wrap(process.ProcessWorker, "start_run", lambda _s, run, _c: str(run.id), "spawn called")
    _wrap(process.ProcessWorker, "start_run", lambda _s, run, _c: str(run.id), "spawn returned",
          after=True)
    _wrap(reporter.Reporter, "submitted", lambda _s, active, **_: str(active.id),
          "submitted queued", after=True)
    _wrap(confirmed_batch, "publish", batch_key, "")
    _wrap(confirmed_batch, "publish_now", batch_key, "")
    _wrap(asyncio.StreamWriter, "write", write_key, "")
    atexit.register(_dump)


if _OUT:
    _install()
