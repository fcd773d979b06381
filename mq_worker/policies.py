"""Run policies: how long a run may take, and whether and when a failed attempt runs again.

A policy is read from a run's job variables (declared by `PolicyVariables`, which a
worker type's job configuration inherits), so a deployment sets defaults and a run
overrides them like any other variable. Nothing here talks to the broker: the worker
asks `RunPolicy.retry_delay` whether a failed attempt is retried and after how long,
and parks the next attempt in the delay ladder itself.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from mq_worker.events import CrashReason
from mq_worker.topology import (
    BROKER_DEATH_HEADERS,
    MAX_PARK_SECONDS,
    SIGNATURE_HEADER,
    SIGNATURE_V2_HEADER,
)

RetryOn = Literal["exit-code", "submission-failed", "timeout"]
DEFAULT_RETRY_ON: tuple[RetryOn, ...] = ("exit-code", "submission-failed")
MAX_RETRIES = 1000
_MAX_DELAY_ITEMS = 100
# Headers a retried message must not inherit: the broker's and the old signature.
_DROPPED_HEADERS = (*BROKER_DEATH_HEADERS, SIGNATURE_HEADER, SIGNATURE_V2_HEADER)


class PolicyVariables(BaseModel):
    """The job variables of a run's policy (mixed into a worker type's job configuration)."""

    timeout_seconds: float | None = Field(
        default=None, gt=0, le=MAX_PARK_SECONDS,
        description="Wall time from the process's start after which the run is stopped "
                    "(SIGTERM, grace_seconds, SIGKILL) and ends crashed with reason timeout. "
                    "None: no limit.",
    )
    retries: int = Field(
        default=0, ge=0, le=MAX_RETRIES,
        description="How many times a failed attempt is run again (so at most retries + 1 "
                    "attempts).",
    )
    retry_delay_seconds: float | list[float] = Field(
        default=0,
        description="Wait before a retry: one number for every retry, or a list giving the "
                    "wait before retry 1, 2, ... (the last one repeats).",
    )
    retry_jitter_factor: float | None = Field(
        default=None, ge=0, le=10,
        description="As Prefect's: each wait is drawn at random, at most (1 + factor) "
                    "times the delay and at least a lower bound that keeps the mean at the "
                    "delay (0.75 times it for a factor of 0.3). None or 0: no jitter.",
    )
    retry_on: list[RetryOn] = Field(
        default_factory=lambda: list(DEFAULT_RETRY_ON),
        description="Which failures are retried: exit-code (non-zero exit or killed by a "
                    "signal), submission-failed (the process could not start), timeout. "
                    "A cancelled run is never retried.",
    )

    @field_validator("retry_delay_seconds")
    @classmethod
    def _delays_in_range(cls, value: float | list[float]) -> float | list[float]:
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not 1 <= len(value) <= _MAX_DELAY_ITEMS:
            raise ValueError(f"give 1 to {_MAX_DELAY_ITEMS} delays")
        for delay in values:
            if not (math.isfinite(delay) and 0 <= delay <= MAX_PARK_SECONDS):
                raise ValueError(f"a delay must be between 0 and {MAX_PARK_SECONDS} seconds")
        return value


@dataclass(frozen=True, slots=True)
class RunPolicy:
    """A run's timeout and retry policy, as its rendered job configuration gives it."""

    timeout_seconds: float | None = None
    retries: int = 0
    retry_delays: tuple[float, ...] = (0.0,)
    jitter_factor: float | None = None
    retry_on: frozenset[str] = frozenset(DEFAULT_RETRY_ON)

    @classmethod
    def from_configuration(cls, configuration: Any) -> RunPolicy:
        """The policy of a job configuration; a worker type without the variables has none."""
        if not isinstance(configuration, PolicyVariables):
            return NO_POLICY
        delays = configuration.retry_delay_seconds
        return cls(
            timeout_seconds=configuration.timeout_seconds,
            retries=configuration.retries,
            retry_delays=tuple(float(d) for d in (delays if isinstance(delays, list)
                                                  else [delays])),
            jitter_factor=configuration.retry_jitter_factor,
            retry_on=frozenset(configuration.retry_on),
        )

    def should_retry(self, reason: str, attempt: int) -> bool:
        """Whether attempt `attempt` (1-based), which failed for `reason`, runs again."""
        return reason in self.retry_on and attempt <= self.retries

    def base_delay(self, attempt: int) -> float:
        """The configured wait after failed attempt `attempt`, before jitter."""
        return self.retry_delays[min(attempt, len(self.retry_delays)) - 1]

    def retry_delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait after failed attempt `attempt`, with jitter when the policy asks."""
        delay = self.base_delay(attempt)
        if self.jitter_factor:
            delay = clamped_poisson_interval(delay, self.jitter_factor, rng)
        return min(delay, float(MAX_PARK_SECONDS))


NO_POLICY = RunPolicy()


# Prefect's jitter (prefect.utilities.math), so that a policy means the same in both:
# an exponential draw clamped to [lower, (1 + factor)] x delay, the lower bound chosen
# so that the mean stays the delay.


def jitter_bounds(delay: float, factor: float) -> tuple[float, float]:
    """The smallest and largest wait `retry_delay` can draw for `delay` and `factor`."""
    upper_multiple = 1.0 + factor
    return max(0.0, delay * _lower_clamp_multiple(upper_multiple)), delay * upper_multiple


def clamped_poisson_interval(
    delay: float, factor: float, rng: random.Random | None = None
) -> float:
    if delay <= 0 or factor <= 0:
        return delay
    lower, upper = jitter_bounds(delay, factor)
    low_cdf, high_cdf = _exponential_cdf(lower, delay), _exponential_cdf(upper, delay)
    draw = (rng or random).uniform(low_cdf, high_cdf)
    value = -math.log(max(1.0 - draw, 1e-10)) * delay
    return min(max(value, lower), upper)


def _exponential_cdf(x: float, mean: float) -> float:
    return 1.0 - math.exp(-x / mean)


def _lower_clamp_multiple(k: float) -> float:
    if k >= 50:  # 2**k overflows the precision; the lower bound is then 0
        return 0.0
    return math.log(max(2**k / (2**k - 1), 1e-10), 2)


def failure_reason(
    status_code: int | None, *, started: bool, cancelled: bool, timed_out: bool
) -> CrashReason | None:
    """Why an attempt failed, in the terms of `retry_on`; None if it did not fail or was
    cancelled (a cancel is never retried)."""
    if cancelled:
        return None
    if not started:
        return CrashReason.SUBMISSION_FAILED
    if timed_out:
        return CrashReason.TIMEOUT
    if status_code == 0:
        return None
    return CrashReason.EXIT_CODE


def next_attempt_body(body: bytes, attempt: int, start_at: datetime) -> bytes:
    """The run message of attempt `attempt`: the same run (unknown fields kept), due at
    `start_at`.

    The standard library's json, not orjson: it round-trips whatever the run's parser
    accepted (integers beyond 64 bits, 1e400, NaN) where orjson refuses or rounds.
    """
    message = json.loads(body)
    message["attempt"] = attempt
    message["scheduled_start_time"] = start_at.isoformat()
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()


def next_attempt_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """The headers of the next attempt's message, without the broker's dead-lettering ones."""
    return {k: v for k, v in headers.items() if k not in _DROPPED_HEADERS}


def failure_message(
    reason: CrashReason, status_code: int | None, *, timeout_seconds: float | None = None,
    error: str | None = None,
) -> str:
    """One line saying why an attempt failed, for `run.retrying` and `run.crashed`."""
    if reason == CrashReason.SUBMISSION_FAILED:
        return f"the run could not be started: {error}"
    if reason == CrashReason.TIMEOUT:
        return (f"the run exceeded its timeout of {timeout_seconds:g} s and was stopped "
                f"(status code {status_code})")
    if status_code is not None and status_code < 0:
        return f"the process was killed by signal {-status_code}"
    return f"the process exited with status code {status_code}"
