"""The worker's side of the guardian: the process that stops its runs if it dies.

The guardian itself is _guardian.py, run as a separate process. The worker lists
its runs' process groups in memory it shares with the guardian (one bit per
process-group id), so starting and ending a run costs no system call and wakes
no other process. The guardian only waits for the end of its stdin, which comes
when the worker exits or dies, and then stops every group still listed.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import sys
from pathlib import Path
from typing import IO

_GUARDIAN = Path(__file__).with_name("_guardian.py")
# Linux's largest possible process id (PID_MAX_LIMIT on 64-bit): the map has a bit for
# each, whatever kernel.pid_max says now. Only the pages of ids in use take memory.
_MAX_PID = 1 << 22


class Guardian:
    """The process that terminates this worker's runs if the worker dies."""

    def __init__(self, grace: float = 5.0) -> None:
        self._grace = grace
        self._process: subprocess.Popen[bytes] | None = None
        self._pipe: IO[bytes] | None = None
        self._groups: mmap.mmap | None = None

    def start(self) -> None:
        memory = os.memfd_create("mq_worker-guardian", os.MFD_CLOEXEC)
        try:
            os.ftruncate(memory, _MAX_PID // 8)
            self._groups = mmap.mmap(memory, _MAX_PID // 8)
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", str(_GUARDIAN), str(self._grace), str(memory)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=(memory,),
            )
        finally:
            os.close(memory)
        self._pipe = self._process.stdin

    def watch(self, pgid: int) -> None:
        """List a new process group: from now on, the guardian stops it if the worker dies."""
        if self._groups is not None:
            self._groups[pgid >> 3] |= 1 << (pgid & 7)

    def forget(self, pgid: int) -> None:
        """Take a group that has ended off the list."""
        if self._groups is not None:
            self._groups[pgid >> 3] &= ~(1 << (pgid & 7)) & 0xFF

    def stop(self) -> None:
        """Stop the guardian; groups still listed are terminated as if the worker died."""
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                self._pipe.close()
            self._pipe = None
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=self._grace + 5)
            self._process = None
        if self._groups is not None:
            self._groups.close()
            self._groups = None
