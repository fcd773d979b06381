"""Triage: what becomes of a delivered run message, decided in one step without I/O.

The run keeper reads the message, asks `triage` for a verdict with what it knows
(the runs it holds and has ended, the cancels it has heard of, whether it is
stopping), and settles the verdict in one place.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Protocol
from uuid import UUID

from mq_worker.cancellation import CancelRecord
from mq_worker.errors import InvalidMessage
from mq_worker.job_configuration import BaseJobConfiguration
from mq_worker.messages import RunMessage


class Verdict(enum.Enum):
    GIVE_BACK = "give back"  # the worker is stopping: back to its queue, for a peer
    REJECT = "reject"  # invalid: dead-lettered, with a run.rejected event
    DUPLICATE = "duplicate"  # held or ended here: acknowledged, or dead-lettered if not redelivered
    CANCELLED = "cancelled"  # cancelled before it started: a run.cancelled event, acknowledged
    PARK = "park"  # due after the prefetch horizon: parked in the delay ladder
    RUN = "run"  # held until due and run, once the pool's limits admit it


# One verdict each, with what settling it needs.


@dataclass(frozen=True, slots=True)
class GiveBack:
    verdict: ClassVar[Verdict] = Verdict.GIVE_BACK


@dataclass(frozen=True, slots=True)
class Reject:
    error: InvalidMessage
    run: RunMessage | None = None  # when it is the configuration that is refused
    verdict: ClassVar[Verdict] = Verdict.REJECT


@dataclass(frozen=True, slots=True)
class Duplicate:
    run: RunMessage
    dead_letter: str | None  # why it is dead-lettered; None: a redelivery, acknowledged
    verdict: ClassVar[Verdict] = Verdict.DUPLICATE


@dataclass(frozen=True, slots=True)
class Cancelled:
    run: RunMessage
    cancel: CancelRecord
    verdict: ClassVar[Verdict] = Verdict.CANCELLED


@dataclass(frozen=True, slots=True)
class Park:
    run: RunMessage
    due: datetime
    verdict: ClassVar[Verdict] = Verdict.PARK


@dataclass(frozen=True, slots=True)
class Run:
    run: RunMessage
    configuration: BaseJobConfiguration
    verdict: ClassVar[Verdict] = Verdict.RUN


Triage = GiveBack | Reject | Duplicate | Cancelled | Park | Run


class Known(Protocol):
    """What the run keeper knows when a message arrives."""

    @property
    def stopping(self) -> bool: ...

    def holds(self, run_id: UUID) -> bool: ...

    def ended_here(self, run_id: UUID) -> bool: ...

    def cancel_of(self, run_id: UUID) -> CancelRecord | None: ...


def triage(
    message: RunMessage | InvalidMessage | None,
    *,
    queue: str,
    redelivered: bool,
    known: Known,
    configure: Callable[[RunMessage, str], BaseJobConfiguration],
    now: float,
    prefetch_seconds: float,
) -> Triage:
    """The verdict on one delivery; `message` is None when it was not read (stopping)."""
    if known.stopping or message is None:
        return GiveBack()
    if isinstance(message, InvalidMessage):
        return Reject(message)
    run = message
    if known.holds(run.id):
        return Duplicate(run, None if redelivered else
                         f"duplicate: run {run.id} is already in flight on this worker")
    if redelivered and known.ended_here(run.id):
        return Duplicate(run, None)
    cancel = known.cancel_of(run.id)
    if cancel is not None:
        return Cancelled(run, cancel)
    due = run.scheduled_start_time
    if due is not None and due.timestamp() - now > prefetch_seconds:
        return Park(run, due)
    try:
        configuration = configure(run, queue)
    except InvalidMessage as exc:
        return Reject(exc, run)
    return Run(run, configuration)
