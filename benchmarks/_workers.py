"""Workers as benchmarks start them: `python -m mq_worker start` processes of their own."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Self

import psutil

from benchmarks._paths import PYTHON, RESULTS, ROOT


class WorkerProcess:
    """`python -m mq_worker start` as a process of its own; SIGTERM stops it gracefully."""

    def __init__(
        self,
        url: str,
        *,
        limit: int,
        name: str,
        loop: str = "auto",
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
        tree: Path = ROOT,
    ) -> None:
        self.name = name
        self.tree = tree  # the checkout whose mq_worker package runs
        self.argv = [
            PYTHON, "-m", "mq_worker", "start", "--url", url, "--limit", str(limit),
            "--name", name, "--log-level", "WARNING", "--log-format", "json", "--loop", loop,
            *extra_args,
        ]
        self.env = {**os.environ, **(env or {})}
        if tree != ROOT:
            self.env["PYTHONPATH"] = os.pathsep.join(
                path for path in (str(tree), (env or {}).get("PYTHONPATH")) if path)
        self.log_path = RESULTS / "logs" / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(self.argv, stdout=log, stderr=log, env=self.env,
                                          cwd=self.tree, stdin=subprocess.DEVNULL)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def process(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def rss_bytes(self) -> int:
        return int(self.process.memory_info().rss)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"worker {self.name} exited with {self.popen.returncode}:\n{tail}")


@contextlib.contextmanager
def workers(
    url: str, count: int, *, limit: int, prefix: str, loop: str = "auto",
    env: dict[str, str] | None = None, tree: Path = ROOT,
) -> Iterator[list[WorkerProcess]]:
    started = [
        WorkerProcess(url, limit=limit, name=f"{prefix}-{i}", loop=loop, env=env,
                      tree=tree).start()
        for i in range(count)
    ]
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()
