"""The probe command (benchmarks/probe.c) runs execute, and the log it appends to."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from benchmarks._paths import BENCH, BUILD


def probe_command() -> str:
    """The path of the probe (benchmarks/probe.c), compiled if needed; see probe.c.

    Without a C compiler, a bash script with the same behaviour is used (bash's
    start-up then counts in the figures: about a millisecond more).
    """
    source = BENCH / "probe.c"
    binary = BUILD / "probe"
    compiler = shutil.which("cc") or shutil.which("gcc")
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return str(binary)
    if compiler is not None:
        BUILD.mkdir(parents=True, exist_ok=True)
        subprocess.run([compiler, "-O2", "-o", str(binary), str(source)], check=True)
        return str(binary)
    return str(BENCH / "probe.sh")


@dataclass
class AppendedLines:
    """The whole lines appended to a file since the last call (a line being written waits)."""

    path: Path
    _offset: int = 0
    _partial: bytes = b""

    def read(self) -> list[bytes]:
        try:
            with self.path.open("rb") as file:
                file.seek(self._offset)
                chunk = file.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        return lines


@dataclass
class ProbeLog:
    """The lines the probe appends: 'S <run id> <unix time>' at start, 'T ...' on SIGTERM."""

    path: Path
    started: dict[str, float] = field(default_factory=dict)
    terminated: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._appended = AppendedLines(self.path)

    def read(self) -> None:
        """Read what was appended since the last call."""
        for line in self._appended.read():
            kind, run_id, stamp = line.decode().split()
            (self.started if kind == "S" else self.terminated)[run_id] = float(stamp)

    async def wait_started(self, run_id: str, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while run_id not in self.started:
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} did not start within {timeout} s")
            await asyncio.sleep(0.0005)
            self.read()
        return self.started[run_id]


def run_body(run_id: str, command: str, **variables: Any) -> bytes:
    job_variables = {"command": command, "stream_output": False, **variables}
    return orjson.dumps({"id": run_id, "job_variables": job_variables})
