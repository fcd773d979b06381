"""Run policies without a broker: variables, delays, jitter, what is retried, the next message."""

from __future__ import annotations

import random
import statistics
import uuid
from datetime import UTC, datetime

import orjson
import pytest

from mq_worker.errors import InvalidMessage
from mq_worker.events import CrashReason
from mq_worker.job_configuration import BaseJobTemplate
from mq_worker.messages import RunMessage, parse_run
from mq_worker.policies import (
    NO_POLICY,
    RunPolicy,
    failure_reason,
    jitter_bounds,
    next_attempt_body,
    next_attempt_headers,
)
from mq_worker.workers.process import ProcessJobConfiguration, ProcessWorker


def policy_of(variables: dict[str, object], deployment: dict[str, object] | None = None
              ) -> RunPolicy:
    template = BaseJobTemplate.from_dict(ProcessWorker.get_default_base_job_template())
    run = RunMessage(id=uuid.uuid4(), job_variables={"command": "true", **variables},
                     deployment={"job_variables": deployment or {}})
    configuration = ProcessJobConfiguration.from_template_and_values(
        template, run.merged_job_variables())
    return RunPolicy.from_configuration(configuration)


def test_by_default_a_run_has_no_timeout_and_no_retries() -> None:
    policy = policy_of({})
    assert policy.timeout_seconds is None
    assert not policy.should_retry(CrashReason.EXIT_CODE, 1)
    assert policy.retry_on == {"exit-code", "submission-failed"}


def test_deployment_sets_defaults_and_the_run_overrides_them() -> None:
    policy = policy_of({"retries": 1}, deployment={"retries": 5, "timeout_seconds": 60,
                                                   "retry_delay_seconds": 10})
    assert (policy.retries, policy.timeout_seconds, policy.retry_delays) == (1, 60, (10.0,))


def test_retries_bound_the_attempts_and_only_listed_failures_are_retried() -> None:
    policy = policy_of({"retries": 2})
    assert policy.should_retry(CrashReason.EXIT_CODE, 1)
    assert policy.should_retry(CrashReason.SUBMISSION_FAILED, 2)
    assert not policy.should_retry(CrashReason.EXIT_CODE, 3)  # the third attempt is the last
    assert not policy.should_retry(CrashReason.TIMEOUT, 1)  # only when asked
    assert policy_of({"retries": 2, "retry_on": ["timeout"]}).should_retry(CrashReason.TIMEOUT, 1)


def test_a_list_of_delays_gives_each_retry_its_own_and_the_last_repeats() -> None:
    policy = policy_of({"retries": 5, "retry_delay_seconds": [1, 10, 60]})
    assert [policy.retry_delay(k) for k in range(1, 6)] == [1, 10, 60, 60, 60]
    assert policy_of({"retries": 5, "retry_delay_seconds": 7}).retry_delay(4) == 7


@pytest.mark.parametrize("variables", [
    {"retries": -1},
    {"retries": 1.5},
    {"retry_delay_seconds": -1},
    {"retry_delay_seconds": [5, -1]},
    {"retry_delay_seconds": []},
    {"retry_delay_seconds": "soon"},
    {"timeout_seconds": 0},
    {"retry_jitter_factor": -0.1},
    {"retry_on": ["cancelled"]},
    {"retry_on": "exit-code"},
])
def test_invalid_policies_reject_the_run_with_a_reason(variables: dict[str, object]) -> None:
    with pytest.raises(InvalidMessage) as raised:
        policy_of(variables)
    assert raised.value.reason.split()[:2] in (["job", "variable"], ["job", "configuration"])


def test_jitter_stays_within_prefects_bounds_and_keeps_the_mean() -> None:
    policy = policy_of({"retries": 1, "retry_delay_seconds": 10, "retry_jitter_factor": 0.5})
    rng = random.Random(7)
    draws = [policy.retry_delay(1, rng) for _ in range(5000)]
    lower, upper = jitter_bounds(10, 0.5)
    assert upper == 15.0 and 6.0 < lower < 7.0
    assert all(lower <= d <= upper for d in draws)
    assert min(draws) < lower + 0.5 and max(draws) > upper - 0.5  # the whole range is used
    assert statistics.mean(draws) == pytest.approx(10, rel=0.03)
    assert len(set(draws)) > 4000
    assert policy_of({"retries": 1, "retry_delay_seconds": 10}).retry_delay(1, rng) == 10


def test_what_counts_as_a_failure() -> None:
    def reason(code: int | None, **flags: bool) -> CrashReason | None:
        return failure_reason(code, **{"started": True, "cancelled": False,
                                       "timed_out": False, **flags})

    assert reason(0) is None
    assert reason(3) == CrashReason.EXIT_CODE
    assert reason(-9) == CrashReason.EXIT_CODE
    assert reason(None, started=False) == CrashReason.SUBMISSION_FAILED
    assert reason(-15, timed_out=True) == CrashReason.TIMEOUT
    assert reason(-15, cancelled=True) is None
    assert reason(3, cancelled=True) is None  # a cancelled run is never retried


def test_the_next_attempt_is_the_same_run_due_later() -> None:
    body = orjson.dumps({"id": str(uuid.uuid4()), "job_variables": {"command": "true"},
                         "from_the_future": {"kept": True}})
    start = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    next_body = next_attempt_body(body, 2, start)
    assert orjson.loads(next_body)["from_the_future"] == {"kept": True}
    run = parse_run(next_body)
    assert run.id == parse_run(body).id and run.attempt == 2
    assert run.scheduled_start_time == start
    assert parse_run(body).attempt == 1
    headers = next_attempt_headers({"x-death": [], "x-delivery-count": 3, "trace": "t",
                                    "x-mq-worker-signature": "sha256=00"})
    assert headers == {"trace": "t"}


def test_a_worker_type_without_policy_variables_has_no_policy() -> None:
    assert RunPolicy.from_configuration(object()) is NO_POLICY


def test_the_events_command_shows_the_attempt_of_retried_runs() -> None:
    from mq_worker.cli import format_event
    from mq_worker.events import Event

    def line(event_type: str, **data: object) -> str:
        return format_event(Event(id="e", source="s", type=event_type, subject="r",
                                  time=datetime(2030, 1, 1, tzinfo=UTC),
                                  data={"worker": "w", **data}))

    retrying = line("mq_worker.run.retrying", attempt=1, status_code=3, reason="exit-code",
                    next_start_time="2030-01-01T00:00:05Z")
    assert "attempt=1" in retrying and "next_start_time=2030-01-01T00:00:05Z" in retrying
    assert "attempt=2" in line("mq_worker.run.pending", attempt=2)
    assert "attempt" not in line("mq_worker.run.pending", attempt=1)


@pytest.mark.parametrize("body", [
    b'{"id":"6f0f3a40-3c4f-4b8e-9d64-1f3e6a9b1c20","parameters":{"a":123456789012345678901234567890}}',
    b'{"id":"6f0f3a40-3c4f-4b8e-9d64-1f3e6a9b1c20","parameters":{"b":1e400,"c":NaN}}',
    b'{"id":"6f0f3a40-3c4f-4b8e-9d64-1f3e6a9b1c20","name":"\xc3\xa9\\u00e9\xf0\x9f\x98\x80"}',
])
def test_the_next_attempt_keeps_every_value_the_parser_accepted(body: bytes) -> None:
    run = parse_run(body)
    again = parse_run(next_attempt_body(body, 2, datetime(2030, 1, 1, tzinfo=UTC)))
    assert again.model_dump(exclude={"attempt", "scheduled_start_time", "parameters"}) == \
        run.model_dump(exclude={"attempt", "scheduled_start_time", "parameters"})
    assert repr(again.parameters) == repr(run.parameters)  # nan != nan, reprs are equal
    assert len(next_attempt_body(body, 2, datetime(2030, 1, 1, tzinfo=UTC))) < len(body) + 80
