"""The enums the worker shares with the wire models: values exactly as documented."""

from __future__ import annotations

import typing

from mq_worker.events import CrashedData, CrashReason, HeartbeatRun, MessageKind, RejectedData
from mq_worker.fencing import REPORTED_STATES
from mq_worker.policies import RetryOn
from mq_worker.workers.runs import RunState


def test_crash_reasons_are_the_documented_wire_values() -> None:
    assert [reason.value for reason in CrashReason] == [
        "exit-code", "submission-failed", "timeout", "kill-failed", "monitoring-failed",
        "worker-lost",
        "slot-lost",
    ]
    description = CrashedData.model_fields["reason"].description or ""
    assert all(reason.value in description for reason in CrashReason)


def test_the_failures_a_policy_retries_are_crash_reasons() -> None:
    assert set(typing.get_args(RetryOn)) <= {reason.value for reason in CrashReason}


def test_rejected_message_kinds_match_the_model() -> None:
    annotation = RejectedData.model_fields["message_kind"].annotation
    assert set(typing.get_args(annotation)) == {kind.value for kind in MessageKind}


def test_run_states_are_the_ones_heartbeats_document() -> None:
    description = HeartbeatRun.model_fields["state"].description or ""
    assert all(state.value in description for state in RunState)
    # A peer reports lost the runs a heartbeat lists as starting or running.
    assert {s for s in REPORTED_STATES if s is not None} == {RunState.STARTING, RunState.RUNNING}
