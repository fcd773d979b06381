"""The worker's side of the guardian: the process that stops its runs if it dies.

The guardian itself is _guardian.py, run as a separate process.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path
from typing import IO

import structlog

_GUARDIAN = Path(__file__).with_name("_guardian.py")
# How long the guardian may go on listing a group that has ended: a dead worker's
# guardian signals a group id that is, at worst, this stale.
_FORGET_DELAY_SECONDS = 0.5


class Guardian:
    """The process that terminates this worker's runs if the worker dies."""

    def __init__(self, grace: float = 5.0) -> None:
        self._grace = grace
        self._process: subprocess.Popen[bytes] | None = None
        self._pipe: IO[bytes] | None = None
        self._log = structlog.get_logger("mq_worker.guardian")
        self._lines: list[str] = []
        self._flush_handle: asyncio.Handle | None = None
        self._flush_urgent = False

    def start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-S", str(_GUARDIAN), str(self._grace)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._pipe = self._process.stdin

    def watch(self, pgid: int) -> None:
        """Tell the guardian about a new process group, within this turn of the event loop."""
        self._lines.append(f"+{pgid}\n")
        self._schedule_flush(0.0)

    def forget(self, pgid: int) -> None:
        """Tell the guardian a group is gone; not urgent, so batched with later lines."""
        self._lines.append(f"-{pgid}\n")
        self._schedule_flush(_FORGET_DELAY_SECONDS)

    def _schedule_flush(self, delay: float) -> None:
        # Each write wakes the guardian's process: write what a loop turn produced at once.
        if self._flush_handle is not None and (delay > 0 or self._flush_urgent):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_urgent = delay == 0
        self._flush_handle = (loop.call_soon(self.flush) if delay == 0
                              else loop.call_later(delay, self.flush))

    def flush(self) -> None:
        """Write the lines waiting for the guardian."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        lines, self._lines = self._lines, []
        if self._pipe is None or not lines:
            return
        try:
            self._pipe.write("".join(lines).encode())
            self._pipe.flush()
        except OSError:
            self._log.error("the guardian process is gone: "
                            "runs would outlive a crash of this worker")
            self._pipe = None

    def stop(self) -> None:
        """Stop the guardian; groups still listed are terminated as if the worker died."""
        self.flush()
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                self._pipe.close()
            self._pipe = None
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=self._grace + 5)
            self._process = None
