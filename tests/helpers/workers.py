"""Workers as tests start them: in the test's event loop, or as `mq-worker start` processes."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from mq_worker.job_configuration import BaseJobConfiguration
from mq_worker.messages import RunMessage
from mq_worker.settings import WorkerSettings
from mq_worker.workers.process import ProcessWorker
from mq_worker.workers.runs import WorkerResult

PROBE = str(Path(__file__).parent / "probe.py")
PYTHON = sys.executable


def reconnects(worker: Any) -> float:
    """How often `worker` (in this process) has connected again: a close is seen by this
    count, where polling `connected` can miss a reconnect quicker than the poll."""
    value = worker.metrics.registry.get_sample_value("mq_worker_reconnects_total")
    return float(value or 0.0)


class HeldSetUp:
    """Mixed into a worker type: its `run` hook sets each run up before it starts it (as
    one that pulls an image or mounts a volume would), here until the test sets `set_up`;
    `setting_up` is set once a run is being set up."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.setting_up = anyio.Event()
        self.set_up = anyio.Event()

    async def run(self, run: RunMessage, configuration: BaseJobConfiguration,
                  task_status: anyio.abc.TaskStatus[str]) -> WorkerResult:
        self.setting_up.set()
        await self.set_up.wait()
        return await super().run(run, configuration, task_status)  # type: ignore[misc]


def worker_settings(url: str | list[str], **overrides: Any) -> WorkerSettings:
    defaults: dict[str, Any] = {
        "url": url if isinstance(url, list) else [url], "name": f"w-{uuid.uuid4().hex[:6]}",
        "heartbeat_seconds": 30.0, "prefetch_seconds": 10.0,
    }
    return WorkerSettings(**{**defaults, **overrides})


@asynccontextmanager
async def running_worker(
    url: str | list[str], worker_class: type[ProcessWorker] = ProcessWorker, **overrides: Any
) -> AsyncIterator[ProcessWorker]:
    """A worker serving in this test's event loop (with these broker addresses, in order),
    stopped (and drained) at exit."""
    worker = worker_class(worker_settings(url, **overrides))
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.serve)
        with anyio.fail_after(30):
            await worker.ready.wait()
        try:
            yield worker
        finally:
            worker.stop(force=True)


def probe(directory: Path, *, sleep: float = 0.0, exit_code: int = 0, extra: str = "") -> str:
    """A command that records its run in `directory` (see tests/helpers/probe.py)."""
    return shlex.join([PYTHON, PROBE, str(directory), "--sleep", str(sleep),
                       "--exit", str(exit_code)]) + (f" {extra}" if extra else "")


def run_body(command: str | None = None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": str(uuid.uuid4())}
    if command is not None:
        body["job_variables"] = {"command": command}
    body.update(fields)
    return body


def started_runs(directory: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in directory.glob("*.start")}


def ended_runs(directory: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in directory.glob("*.end")}


class WorkerProcess:
    """`mq-worker start` as a separate process, as operators run it."""

    def __init__(self, url: str, *args: str, name: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name or f"p-{uuid.uuid4().hex[:6]}"
        # A file of its own: names like "fatal" are fixed, and tests run in parallel
        # checkouts on one machine (and a test may start a worker of the same name again).
        descriptor, path = tempfile.mkstemp(prefix=f"mq_worker-test-{self.name}-", suffix=".log")
        self.log_path = Path(path)
        self._log_file = os.fdopen(descriptor, "w")
        self.process = subprocess.Popen(
            [PYTHON, "-m", "mq_worker", "start", "--url", url, "--name", self.name,
             "--log-format", "json", *args],
            stdout=self._log_file, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                lines.append({"event": line})
        return lines

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        self._log_file.close()
