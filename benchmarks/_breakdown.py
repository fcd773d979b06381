"""Where a run's publish -> `submitted` received goes, step by step, from the wiretap's
times of each message on the wire (benchmarks._wiretap) and the times the parties took
themselves (the publisher's clock before publishing, the events' own `time`, the
subscriber's clock on receipt). Every clock is the host's CLOCK_REALTIME."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson

from benchmarks._amqp import RUN_PENDING, RUN_SUBMITTED, RUNS_EXCHANGE, Seen
from benchmarks._report import summarize_ms
from benchmarks._wiretap import WireMessage

EVENTS_EXCHANGE = "mq_worker.events"

# (label, from, to): the points are named below, in the order a run passes them.
STEPS = (
    ("publisher: publish called -> run on the wire", "called", "run_out"),
    ("broker: run on the wire -> delivered to the worker", "run_out", "run_in"),
    ("worker: delivered -> `pending` made (read, parse, configure)", "run_in", "pending"),
    ("worker: `pending` made -> `submitted` made (the spawn)", "pending", "submitted"),
    ("worker: `submitted` made -> on the wire (outbox, writer)", "submitted", "event_out"),
    ("broker: `submitted` on the wire -> delivered to the subscriber", "event_out", "event_in"),
    ("subscriber: delivered -> its callback", "event_in", "received"),
    ("the whole path: publish called -> received", "called", "received"),
    ("the same, to the subscriber's socket: publish called -> delivered", "called", "event_in"),
    ("the worker's part: run delivered -> `submitted` on the wire", "run_in", "event_out"),
)


def _subject(body: bytes) -> str | None:
    try:
        subject = orjson.loads(body).get("subject")
    except orjson.JSONDecodeError:
        return None
    return subject if isinstance(subject, str) else None


def _run_id(body: bytes) -> str | None:
    try:
        run_id = orjson.loads(body).get("id")
    except orjson.JSONDecodeError:
        return None
    return run_id if isinstance(run_id, str) else None


def points(wire: Iterable[WireMessage], ids: Iterable[str], sent: Mapping[str, float],
           events: Mapping[str, Mapping[str, Seen]]) -> dict[str, dict[str, float]]:
    """Per run id, the time it passed each point (those the capture saw)."""
    at: dict[str, dict[str, float]] = {}
    wanted = set(ids)
    for run_id in wanted:
        submitted = events[RUN_SUBMITTED].get(run_id)
        pending = events[RUN_PENDING].get(run_id)
        at[run_id] = {"called": sent[run_id]}
        if submitted is not None:
            at[run_id].update(submitted=submitted.produced, received=submitted.received)
        if pending is not None:
            at[run_id]["pending"] = pending.produced
    for message in wire:
        if message.exchange == RUNS_EXCHANGE:
            run_id = _run_id(message.body)
            point = "run_out" if message.direction == "publish" else "run_in"
        elif message.exchange == EVENTS_EXCHANGE and message.routing_key == RUN_SUBMITTED:
            run_id = _subject(message.body)
            point = "event_out" if message.direction == "publish" else "event_in"
        elif message.exchange == EVENTS_EXCHANGE and message.routing_key == RUN_PENDING \
                and message.direction == "publish":
            run_id, point = _subject(message.body), "pending_out"
        else:
            continue
        if run_id in wanted:
            at[run_id].setdefault(point, message.sent)  # a redelivery keeps the first
    return at


def breakdown(at: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Each step's latencies over the runs, and how often `submitted` left with `pending`."""
    steps = {label: summarize_ms([p[b] - p[a] for p in at.values() if a in p and b in p])
             for label, a, b in STEPS}
    both = [p for p in at.values() if "pending_out" in p and "event_out" in p]
    together = sum(1 for p in both if p["pending_out"] == p["event_out"])
    return {"steps": steps, "submitted_with_pending": together, "runs_seen_on_wire": len(both)}


# The marks a worker takes with benchmarks/worker_marks on (in the order a run passes them).
MARKS = ("channel reads the delivery", "handler starts", "pending made", "spawn called",
         "spawn returned", "submitted queued", "outbox writes the batch", "socket write")


def marks_breakdown(path: Path, ids: Iterable[str]) -> dict[str, Any]:
    """Each hop between two marks inside the worker, and the CPU time from the delivery to
    the spawn and from the spawn's return to `submitted` queued, over the runs `ids`."""
    marks: dict[str, dict[str, float]] = orjson.loads(path.read_bytes())
    runs = [marks[i] for i in ids if i in marks]
    hops = {f"{a} -> {b}": summarize_ms([r[b] - r[a] for r in runs if a in r and b in r])
            for a, b in itertools.pairwise(MARKS)}
    cpu = {
        "delivery -> spawn called (cpu)": summarize_ms(
            [r["spawn called (cpu)"] - r["channel reads the delivery (cpu)"] for r in runs
             if "spawn called (cpu)" in r and "channel reads the delivery (cpu)" in r]),
        "spawn returned -> submitted queued (cpu)": summarize_ms(
            [r["submitted queued (cpu)"] - r["spawn returned (cpu)"] for r in runs
             if "submitted queued (cpu)" in r and "spawn returned (cpu)" in r]),
    }
    return {**hops, **cpu}
