"""Run output on the wire: a run's stdout/stderr lines, batched, on `mq_worker.output`.

A run's lines are collected in a batch that is sealed after `batch_seconds`
or when it reaches `batch_bytes`, numbered (`sequence`, from 0 without gaps
per run and worker) and queued for one publishing task. Output never holds
up a run: adding a line never waits, a run ships at most `max_run_bytes`
(then one batch says `truncated`), and the queue of sealed batches is bounded
(`max_pending_bytes`): a batch that does not fit while the broker is slow or
away is dropped and its lines are counted in the next batch's `dropped_lines`.
The last batch of a run has `eof: true`.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aio_pika.abc
import aiormq.exceptions
import anyio
import orjson
import structlog
from pamqp import commands as spec
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ConfigDict, Field

from mq_worker import confirmed_batch
from mq_worker.topology import (
    JSON_CONTENT_TYPE,
    OUTPUT_EXCHANGE,
    declare_output_exchange,
    output_routing_key,
)

log = structlog.get_logger("mq_worker.output")

DEFAULT_MAX_RUN_BYTES = 10 * 1024 * 1024
DEFAULT_BATCH_BYTES = 64 * 1024
DEFAULT_BATCH_SECONDS = 0.05
DEFAULT_MAX_PENDING_BYTES = 8 * 1024 * 1024
# Room for the small batches that must not be dropped (eof, truncation marker).
_CONTROL_ROOM = 1024 * 1024
_LINE_OVERHEAD = 32  # JSON around one line's text
# Sealed batches written together (a lost connection loses them): bodies, messages.
_WRITE_BYTES = 256 * 1024
_WRITE_MESSAGES = 64


class OutputLineModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    stream: str = Field(description="stdout or stderr.")
    text: str = Field(description="The line, without its newline; invalid UTF-8 replaced.")


class OutputMessage(BaseModel):
    """A batch of a run's output lines, in order (routing key `output.<pool>.<run id>`)."""

    model_config = ConfigDict(extra="allow")

    run_id: str = Field(description="The run's id.")
    pool: str
    queue: str | None = None
    worker: str = Field(description="The worker that runs it; sequences are per worker.")
    sequence: int = Field(ge=0, description="0, 1, 2... per run and worker, without gaps.")
    started_at: datetime = Field(description="When the worker started the run's process.")
    time: datetime = Field(description="When the batch was published.")
    first_line: int = Field(ge=0, description="Number of the batch's first line in the run's "
                            "output, from 0, counting dropped and truncated lines.")
    lines: list[OutputLineModel]
    dropped_lines: int = Field(ge=0, description="Lines of this run dropped so far because "
                               "the broker was slow or away (cumulative).")
    truncated: bool = Field(description="The run reached its output cap: no more lines follow.")
    eof: bool = Field(description="The run's last batch: its output is complete.")


@dataclass(frozen=True)
class OutputStats:
    shipped_lines: int
    dropped_lines: int
    truncated_lines: int
    pending_bytes: int


@dataclass
class _Batch:
    run: RunOutput
    sequence: int
    first_line: int
    lines: list[dict[str, str]]
    size: int
    truncated: bool = False
    eof: bool = False
    dropped_lines: int = 0

    def body(self) -> bytes:
        run = self.run
        return orjson.dumps({
            "run_id": run.run_id, "pool": run.shipper.pool, "queue": run.queue,
            "worker": run.shipper.worker, "sequence": self.sequence,
            "started_at": run.started_at, "time": datetime.now(UTC),
            "first_line": self.first_line, "lines": self.lines,
            "dropped_lines": self.dropped_lines, "truncated": self.truncated, "eof": self.eof,
        }, option=orjson.OPT_UTC_Z)


@dataclass(eq=False)
class RunOutput:
    """The output of one run on its way to the broker. `line` never blocks."""

    shipper: OutputShipper
    run_id: str
    queue: str | None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    _lines: list[dict[str, str]] = field(default_factory=list)
    _size: int = 0
    _first_line: int = 0
    _line_number: int = 0
    _sequence: int = 0
    _shipped_bytes: int = 0
    _dropped: int = 0
    _truncated: bool = False
    _marked: bool = False  # the truncation marker is on its way
    _closed: bool = False
    _timer: asyncio.TimerHandle | None = None

    def line(self, stream: str, text: str) -> None:
        if self._closed:
            return
        self._line_number += 1
        if self._truncated:
            self.shipper._count("truncated", 1)
            return
        # The cap counts what a reader gets (the text and its newline), buffers the JSON too.
        shipped = len(text) + 1
        cost = len(text) + _LINE_OVERHEAD
        if self._shipped_bytes + shipped > self.shipper.max_run_bytes:
            self._truncated = True
            self.shipper._count("truncated", 1)
            self._seal()
            return
        if not self._lines:
            self._first_line = self._line_number - 1
            self._timer = asyncio.get_running_loop().call_later(
                self.shipper.batch_seconds, self._seal)
        self._lines.append({"stream": stream, "text": text})
        self._size += cost
        self._shipped_bytes += shipped
        if self._size >= self.shipper.batch_bytes:
            self._seal()

    def close(self) -> None:
        """The run's pipes are closed: ship what is left and the `eof` batch."""
        if not self._closed:
            self._seal(eof=True)
            self._closed = True

    def _seal(self, *, eof: bool = False) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        truncated_now = self._truncated and not self._marked
        if not self._lines and not eof and not truncated_now:
            return
        batch = _Batch(self, self._sequence, self._first_line, self._lines, self._size,
                       truncated=self._truncated, eof=eof, dropped_lines=self._dropped)
        self._lines, self._size = [], 0
        if self.shipper._enqueue(batch, control=eof or truncated_now):
            self._sequence += 1
            self._marked = self._truncated
        else:
            self._dropped += len(batch.lines)


class OutputShipper:
    """Publishes the output of a worker's runs; one per worker."""

    def __init__(
        self,
        *,
        pool: str,
        worker: str,
        max_run_bytes: int = DEFAULT_MAX_RUN_BYTES,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        batch_seconds: float = DEFAULT_BATCH_SECONDS,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.pool = pool
        self.worker = worker
        self.max_run_bytes = max_run_bytes
        self.batch_bytes = batch_bytes
        self.batch_seconds = batch_seconds
        self.max_pending_bytes = max_pending_bytes
        self._pending: deque[_Batch] = deque()
        self._pending_bytes = 0
        self._ready = anyio.Event()
        self._emptied = anyio.Event()
        self._refused = False
        self._counts = {"shipped": 0, "dropped": 0, "truncated": 0}
        self._counter: Counter | None = None
        if registry is not None:
            self._counter = Counter(
                "mq_worker_output_lines", "Output lines of runs: shipped, dropped under broker "
                "pressure, or over the per-run cap (truncated).", ["outcome"], registry=registry)

    def open(self, run_id: str, queue: str | None) -> RunOutput:
        return RunOutput(self, run_id, queue)

    def stats(self) -> OutputStats:
        return OutputStats(self._counts["shipped"], self._counts["dropped"],
                           self._counts["truncated"], self._pending_bytes)

    async def flush(self) -> None:
        """Wait until every sealed batch has been written to the broker's connection.

        A stopping worker calls it once its runs have ended (their `eof` batches are
        sealed) and before it closes its connection; the caller bounds the wait.
        """
        while self._pending:
            self._emptied = anyio.Event()
            await self._emptied.wait()

    def abandon(self) -> tuple[int, int]:
        """Drop the batches not yet shipped, counting their lines as dropped: (batches, lines)."""
        batches, lines = len(self._pending), sum(len(b.lines) for b in self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        self._count("dropped", lines)
        self._emptied.set()
        return batches, lines

    def _count(self, outcome: str, lines: int) -> None:
        self._counts[outcome] += lines
        if self._counter is not None and lines:
            self._counter.labels(outcome).inc(lines)

    def _enqueue(self, batch: _Batch, *, control: bool) -> bool:
        if self._refused:
            self._count("dropped", len(batch.lines))
            return False
        limit = self.max_pending_bytes + (_CONTROL_ROOM if control else 0)
        if self._pending_bytes + batch.size > limit:
            self._count("dropped", len(batch.lines))
            if control:  # keep the marker or eof, without its lines
                batch.dropped_lines += len(batch.lines)
                batch.lines, batch.size = [], 0
            else:
                return False
        self._pending.append(batch)
        self._pending_bytes += batch.size
        self._ready.set()
        return True

    async def ship_forever(self, connection: aio_pika.abc.AbstractConnection) -> None:
        """Publish sealed batches in order on a channel of `connection`, until cancelled.

        Without publisher confirms: output is best effort, and a confirm wait
        would only slow the next batch. Batches sealed together go in one write
        (up to _WRITE_BYTES): a lost connection loses at most the batches being
        written; the rest waits (bounded) for the next connection.
        A stopping worker waits (bounded) for the queue to empty (`flush`).
        """
        channel = await (await connection.channel(publisher_confirms=False)).get_underlay_channel()
        try:
            await declare_output_exchange(channel)
        except aiormq.exceptions.ChannelAccessRefused as exc:
            # Runs matter more than their output: go on without shipping it.
            log.error("run output is not shipped: this worker may not declare the output "
                      "exchange (see docs/security.md)", exchange=OUTPUT_EXCHANGE, error=str(exc))
            self._refused = True
            self._pending.clear()
            self._pending_bytes = 0
            self._emptied.set()
            return
        batched = confirmed_batch.supports_unconfirmed(channel)
        while True:
            while not self._pending:
                self._ready = anyio.Event()
                await self._ready.wait()
            batches, messages = self._next_write(_WRITE_MESSAGES if batched else 1)
            if batched:
                await confirmed_batch.publish_unconfirmed(channel, messages)
            else:
                await channel.basic_publish(
                    messages[0].body, exchange=OUTPUT_EXCHANGE,
                    routing_key=messages[0].routing_key,
                    properties=spec.Basic.Properties(content_type=JSON_CONTENT_TYPE,
                                                     delivery_mode=2,
                                                     message_id=messages[0].message_id))
            if not self._pending or self._pending[0] is not batches[0]:
                continue  # abandoned meanwhile (see `abandon`): already counted
            for batch in batches:
                self._pending.popleft()
                self._pending_bytes -= batch.size
                self._count("shipped", len(batch.lines))
            if not self._pending:
                self._emptied.set()

    def _next_write(self, most: int) -> tuple[list[_Batch], list[confirmed_batch.Message]]:
        """The sealed batches at the head of the queue that go in one socket write (the
        eof batches of runs that ended in one loop turn, say), and their messages: at
        most `most` of them and _WRITE_BYTES of bodies, unless the first alone is more."""
        batches: list[_Batch] = []
        messages: list[confirmed_batch.Message] = []
        size = 0
        for batch in itertools.islice(self._pending, most):
            body = batch.body()
            size += len(body)
            if batches and size > _WRITE_BYTES:
                break
            batches.append(batch)
            messages.append(confirmed_batch.Message(
                OUTPUT_EXCHANGE, output_routing_key(self.pool, batch.run.run_id), body,
                JSON_CONTENT_TYPE, _message_id()))
        return batches, messages


def _message_id() -> str:
    """A random id, as aiormq gives a message published without one."""
    return uuid.UUID(int=random.getrandbits(128), version=4).hex
