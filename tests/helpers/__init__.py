"""Helpers shared by the tests; conftest.py holds only fixtures.

The broker's administration and the event log are mq_worker.testing's, shared with the
benchmarks and offered to users.
"""

from mq_worker.testing import EventLog, event_log, unique
from tests.helpers.broker import (
    HOST,
    MANAGEMENT,
    PORT,
    VHost,
    consumer_count,
    management,
    publish_raw,
    queue_deleted,
    queue_exists,
    queue_stats,
    rabbitmqctl,
    ready_counts,
    until_consumers,
    until_no_run_left,
    until_ready,
)
from tests.helpers.waiting import wait_until
from tests.helpers.workers import (
    PROBE,
    PYTHON,
    WorkerProcess,
    ended_runs,
    probe,
    run_body,
    running_worker,
    started_runs,
    worker_settings,
)

__all__ = [
    "HOST",
    "MANAGEMENT",
    "PORT",
    "PROBE",
    "PYTHON",
    "EventLog",
    "VHost",
    "WorkerProcess",
    "consumer_count",
    "ended_runs",
    "event_log",
    "management",
    "probe",
    "publish_raw",
    "queue_deleted",
    "queue_exists",
    "queue_stats",
    "rabbitmqctl",
    "ready_counts",
    "run_body",
    "running_worker",
    "started_runs",
    "unique",
    "until_consumers",
    "until_no_run_left",
    "until_ready",
    "wait_until",
    "worker_settings",
]
