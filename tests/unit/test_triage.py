"""Triage: the verdict on each kind of delivery, without a broker."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from uuid import UUID

import pytest

from mq_worker.cancellation import CancelRecord
from mq_worker.errors import InvalidMessage
from mq_worker.job_configuration import BaseJobConfiguration
from mq_worker.messages import RunMessage
from mq_worker.workers.triage import (
    Cancelled,
    Duplicate,
    GiveBack,
    Park,
    Reject,
    Run,
    Triage,
    Verdict,
    triage,
)

PREFETCH = 60.0


@dataclass
class Keeper:
    stopping: bool = False
    held: set[UUID] = field(default_factory=set)
    ended: set[UUID] = field(default_factory=set)
    cancels: dict[UUID, CancelRecord] = field(default_factory=dict)

    def holds(self, run_id: UUID) -> bool:
        return run_id in self.held

    def ended_here(self, run_id: UUID) -> bool:
        return run_id in self.ended

    def cancel_of(self, run_id: UUID) -> CancelRecord | None:
        return self.cancels.get(run_id)


def configure(run: RunMessage, queue: str) -> BaseJobConfiguration:
    if "refuse" in run.tags:
        raise InvalidMessage("command not allowed", run_id=run.id)
    return BaseJobConfiguration()


def run_message(*, due_in: float | None = None, tags: tuple[str, ...] = ()) -> RunMessage:
    fields: dict[str, object] = {"id": str(uuid.uuid4()), "tags": list(tags)}
    if due_in is not None:
        fields["scheduled_start_time"] = time.time() + due_in
    return RunMessage.model_validate(fields)


def judge(message: RunMessage | InvalidMessage | None, keeper: Keeper, *,
          redelivered: bool = False) -> Triage:
    return triage(message, queue="q", redelivered=redelivered, known=keeper,
                  configure=configure, now=time.time(), prefetch_seconds=PREFETCH)


def test_a_valid_run_due_now_is_run_with_its_configuration() -> None:
    run = run_message()
    verdict = judge(run, Keeper())
    assert isinstance(verdict, Run) and verdict.verdict is Verdict.RUN
    assert verdict.run is run and isinstance(verdict.configuration, BaseJobConfiguration)


def test_a_stopping_worker_gives_back_whatever_comes() -> None:
    assert isinstance(judge(run_message(), Keeper(stopping=True)), GiveBack)
    assert isinstance(judge(None, Keeper(stopping=True)), GiveBack)
    assert isinstance(judge(InvalidMessage("bad"), Keeper(stopping=True)), GiveBack)


def test_an_unreadable_message_and_a_refused_configuration_are_rejected() -> None:
    error = InvalidMessage("not JSON")
    assert judge(error, Keeper()) == Reject(error)
    refused = run_message(tags=("refuse",))
    verdict = judge(refused, Keeper())
    assert isinstance(verdict, Reject) and verdict.run is refused
    assert verdict.error.reason == "command not allowed"


def test_a_run_held_here_is_a_duplicate_dead_lettered_unless_redelivered() -> None:
    run = run_message()
    keeper = Keeper(held={run.id}, cancels={run.id: CancelRecord(run.id, "x", time.time())})
    assert judge(run, keeper, redelivered=True) == Duplicate(run, None)
    verdict = judge(run, keeper)
    assert isinstance(verdict, Duplicate) and verdict.dead_letter is not None
    assert str(run.id) in verdict.dead_letter


def test_a_run_ended_here_is_a_duplicate_only_when_redelivered() -> None:
    run = run_message()
    keeper = Keeper(ended={run.id})
    assert judge(run, keeper, redelivered=True) == Duplicate(run, None)
    assert isinstance(judge(run, keeper), Run)  # published again: a new run of the same id


def test_a_run_cancelled_before_it_arrived_is_not_run_even_when_due_later() -> None:
    run = run_message(due_in=10 * PREFETCH)
    record = CancelRecord(run.id, "no longer wanted", time.time())
    assert judge(run, Keeper(cancels={run.id: record})) == Cancelled(run, record)


@pytest.mark.parametrize(("due_in", "expected"), [
    (PREFETCH + 30, Park), (PREFETCH - 30, Run), (-3600.0, Run),
])
def test_a_run_due_after_the_prefetch_horizon_is_parked(
    due_in: float, expected: type[Triage]
) -> None:
    assert isinstance(judge(run_message(due_in=due_in), Keeper()), expected)


def test_a_run_is_parked_before_its_configuration_is_checked() -> None:
    assert isinstance(judge(run_message(due_in=2 * PREFETCH, tags=("refuse",)), Keeper()), Park)
