"""The worker's side of the guardian: the process that stops its runs if it dies.

The guardian itself is _guardian.py, run as a separate process. The worker lists
its runs' process groups in a table in memory it shares with the guardian (a
memfd: one 32-bit slot per group, 0 when free), so starting and ending a run
costs no system call and wakes no other process. The guardian only waits for
the end of its stdin, which comes when the worker exits or dies, and then stops
every group still in the table.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import IO

import structlog

_GUARDIAN = Path(__file__).with_name("_guardian.py")
_SLOT = struct.Struct("=i")
# 1,024 groups in the first 4 KiB; the table grows a page at a time beyond that.
_FIRST_SLOTS = 1024


class Guardian:
    """The process that terminates this worker's runs if the worker dies."""

    def __init__(self, grace: float = 5.0, *, slots: int = _FIRST_SLOTS) -> None:
        self._grace = grace
        self._first_slots = slots
        self._process: subprocess.Popen[bytes] | None = None
        self._pipe: IO[bytes] | None = None
        self._memory = -1
        self._table: mmap.mmap | None = None
        self._slot_of: dict[int, int] = {}
        self._free: list[int] = []
        self._log = structlog.get_logger("mq_worker.guardian")

    def start(self) -> None:
        self._memory = os.memfd_create("mq_worker-guardian", os.MFD_CLOEXEC)
        self._resize(self._first_slots)
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-S", str(_GUARDIAN), str(self._grace), str(self._memory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=(self._memory,),
        )
        self._pipe = self._process.stdin

    def watch(self, pgid: int) -> None:
        """List a new process group: from now on, the guardian stops it if the worker dies."""
        if self._table is None or pgid in self._slot_of:
            return
        if not self._free and not self._grow():
            return
        slot = self._free.pop()
        _SLOT.pack_into(self._table, slot * _SLOT.size, pgid)
        self._slot_of[pgid] = slot

    def forget(self, pgid: int) -> None:
        """Take a group that has ended off the list."""
        slot = self._slot_of.pop(pgid, None)
        if slot is not None and self._table is not None:
            _SLOT.pack_into(self._table, slot * _SLOT.size, 0)
            self._free.append(slot)

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
        if self._table is not None:
            self._table.close()
            self._table = None
        if self._memory >= 0:
            os.close(self._memory)
            self._memory = -1

    def _grow(self) -> bool:
        slots = len(self._table) // _SLOT.size if self._table is not None else 0
        try:
            self._resize(slots + mmap.PAGESIZE // _SLOT.size)
        except OSError as exc:  # a file size limit (RLIMIT_FSIZE) applies to memfds too
            self._log.error("the guardian's table of runs cannot grow: this run would "
                            "outlive a crash of this worker", error=str(exc))
            return False
        return True

    def _resize(self, slots: int) -> None:
        old = len(self._table) // _SLOT.size if self._table is not None else 0
        os.ftruncate(self._memory, slots * _SLOT.size)
        if self._table is not None:
            self._table.close()
        self._table = mmap.mmap(self._memory, slots * _SLOT.size)
        self._free.extend(range(slots - 1, old - 1, -1))
