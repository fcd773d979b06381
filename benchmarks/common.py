"""What every benchmark shares, by concern, under one name for the scripts to import:

* `_paths`: the repository, the result files, the Python that runs workers;
* `_broker`: the broker's management API and a vhost of its own (mq_worker.testing's);
* `_machine`: the machine's description, CPU time by whom, waiting for a quiet machine;
* `_probe`: the probe command runs execute, and the log it appends to;
* `_workers`: `python -m mq_worker start` processes;
* `_amqp`: runs, cancels and events over plain aio-pika, as an outside client;
* `_report`: statistics, tables, result files;
* `_runner`: a script's command line and the order of its steps.

Everything here talks to the broker the way an outside client would: plain aio-pika and the
names of the wire contract (docs/protocol.md), never mq_worker's own publisher or subscriber.
"""

from __future__ import annotations

from benchmarks._amqp import (
    CANCEL_KEY,
    EVENTS_EXCHANGE,
    FAILURES,
    RUN_CANCELLED,
    RUN_COMPLETED,
    RUN_CRASHED,
    RUN_PENDING,
    RUN_REJECTED,
    RUN_SUBMITTED,
    RUNS_EXCHANGE,
    SCHEDULED_KEY,
    WORKER_STARTED,
    EventWatch,
    Publisher,
    Seen,
    new_id,
    wait_workers_started,
)
from benchmarks._broker import AMQP_PORT, HOST, MANAGEMENT, PASSWORD, USER, VHost, management, vhost
from benchmarks._machine import (
    CpuMeter,
    background_load,
    broker_process,
    cpu_seconds,
    describe_machine,
    least_disturbed,
    machine_info,
    wait_for_quiet,
)
from benchmarks._paths import BENCH, BUILD, PYTHON, RESULTS, ROOT
from benchmarks._probe import ProbeLog, probe_command, run_body
from benchmarks._report import banner, percentile, print_table, summarize_ms, table, write_results
from benchmarks._runner import command_line, run_benchmark
from benchmarks._workers import WorkerProcess, workers

__all__ = [
    "AMQP_PORT", "BENCH", "BUILD", "CANCEL_KEY", "EVENTS_EXCHANGE", "FAILURES", "HOST",
    "MANAGEMENT", "PASSWORD", "PYTHON", "RESULTS", "ROOT", "RUNS_EXCHANGE", "RUN_CANCELLED",
    "RUN_COMPLETED", "RUN_CRASHED", "RUN_PENDING", "RUN_REJECTED", "RUN_SUBMITTED",
    "SCHEDULED_KEY", "USER", "WORKER_STARTED", "CpuMeter", "EventWatch", "ProbeLog", "Publisher",
    "Seen", "VHost", "WorkerProcess", "background_load", "banner", "broker_process",
    "command_line", "cpu_seconds", "describe_machine", "least_disturbed", "machine_info",
    "management", "new_id", "percentile", "print_table", "probe_command", "run_benchmark",
    "run_body", "summarize_ms", "table", "vhost", "wait_for_quiet", "wait_workers_started",
    "workers", "write_results",
]
