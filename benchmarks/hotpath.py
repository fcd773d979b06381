"""The per-run steps of a worker's hot path, timed one by one in this process (no broker).

    .venv/bin/python -m benchmarks.hotpath [--seconds 0.5]

Each step is what `BaseWorker._take` and `ProcessWorker.run` do for one run of
{"command": "/bin/true", "stream_output": false}, called on a ProcessWorker that is not
serving. It shows what a run costs before any I/O: parsing, job variables (jsonschema),
the configuration model (pydantic), the environment, events, logging, metrics and the spawn.
Private methods are used as they are today; a step whose method has changed is skipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog

from benchmarks.common import command_line, print_table, run_benchmark
from mq_worker import logs
from mq_worker.events import EventType, build_event
from mq_worker.infrastructure import start_process
from mq_worker.job_configuration import RunContext
from mq_worker.messages import parse_run
from mq_worker.settings import WorkerSettings
from mq_worker.workers import runs
from mq_worker.workers.process import ProcessJobConfiguration, ProcessWorker

TRUE = shutil.which("true") or "true"
BODY = orjson.dumps({"id": "6f0f3a40-3c4f-4b8e-9d64-1f3e6a9b1c20",
                     "job_variables": {"command": TRUE, "stream_output": False}})


def per_call_us(step: Callable[[], Any], seconds: float) -> tuple[float, float]:
    """(wall, CPU) microseconds per call, each the best of 5 rounds of about `seconds` / 5.

    CPU time (this process only) is what the step costs a worker; wall time also counts
    waiting (for a child's exec) and, on a busy machine, other processes' turns.
    """
    step()
    count = 1
    while True:
        began = time.perf_counter()
        for _ in range(count):
            step()
        elapsed = time.perf_counter() - began
        if elapsed > seconds / 20:
            break
        count *= 4
    n = max(1, int(count * seconds / 5 / elapsed))
    wall = cpu = float("inf")
    for _ in range(5):
        began, began_cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            step()
        wall = min(wall, (time.perf_counter() - began) / n)
        cpu = min(cpu, (time.process_time() - began_cpu) / n)
    return wall * 1e6, cpu * 1e6


def steps() -> list[tuple[str, str, Callable[[], Any]]]:
    logs.configure("json", "WARNING")
    worker = ProcessWorker(WorkerSettings(name="hotpath", limit=8))
    run = parse_run(BODY)
    variables = run.merged_job_variables()
    template = worker.template
    rendered = template.render(variables)
    configuration = worker._configurer.configure(run, "default")
    data = {**worker._report.fields(run, "default", runs.related(run, "default", "default"), None),
            "infrastructure_pid": "host:1234", "late_by_seconds": 0.0,
            "labels": configuration.labels}
    env = {k: v for k, v in configuration.env.items() if v is not None}
    counter = worker.metrics.started

    def spawn() -> None:
        handle = start_process([TRUE], env=env, cwd=None, capture_output=False)
        handle.popen.wait()

    def spawn_plain() -> None:
        subprocess.Popen([TRUE], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL).wait()

    return [
        ("parse", "messages.parse_run (pydantic, JSON)", lambda: parse_run(BODY)),
        ("configure", "Configurer.configure (all of the below)",
         lambda: worker._configurer.configure(run, "default")),
        ("configure", "  BaseJobTemplate.resolve_variables (jsonschema)",
         lambda: template.resolve_variables(variables)),
        ("configure", "  BaseJobTemplate.render (placeholders)",
         lambda: template.render(variables)),
        ("configure", "  ProcessJobConfiguration.model_validate",
         lambda: ProcessJobConfiguration.model_validate(rendered)),
        ("configure", "  BaseWorker.base_environment (os.environ copy)",
         worker.base_environment),
        ("configure", "  RunContext(...) with the environment",
         lambda: RunContext(pool="default", queue="default", worker="w",
                            base_env=worker.base_environment())),
        ("configure", "  configuration.argv (shlex)", configuration.argv),
        ("events", "build_event (one event)",
         lambda: build_event(EventType.RUN_SUBMITTED, source=worker.source,
                             subject=str(run.id), data=data)),
        ("events", "related + Reporter.fields",
         lambda: worker._report.fields(run, "default", runs.related(run, "default", "default"),
                                  None)),
        ("logging", "log.bind(run_id, queue)",
         lambda: worker.log.bind(run_id=str(run.id), queue="default")),
        ("logging", "filtered log.info (level WARNING)",
         lambda: worker.log.info("run started", infrastructure_pid="x")),
        ("metrics", "counter.labels(pool, queue).inc()",
         lambda: counter.labels("default", "default").inc()),
        ("spawn", "start_process(/bin/true) + wait", spawn),
        ("spawn", "subprocess.Popen(/bin/true) + wait, inherited env", spawn_plain),
    ]


def main() -> None:
    parser = command_line(__doc__)
    parser.add_argument("--seconds", type=float, default=1.0, help="per step")
    run_benchmark("hotpath", parser.parse_args(), measure, report)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for group, label, step in steps():
        try:
            wall, cpu = per_call_us(step, args.seconds)
        except (AttributeError, TypeError) as exc:  # a private method changed
            print(f"skipped {label}: {exc}")
            continue
        rows.append({"group": group, "step": label, "wall_us": round(wall, 2),
                     "cpu_us": round(cpu, 2)})
    structlog.reset_defaults()
    return {"steps": rows, "environment_size": len(os.environ)}


def report(result: dict[str, Any]) -> None:
    print_table("per-run steps, microseconds per call (best of 5 rounds)",
                ["step", "wall µs", "CPU µs"],
                [[r["step"], r["wall_us"], r["cpu_us"]] for r in result["steps"]])


if __name__ == "__main__":
    main()
