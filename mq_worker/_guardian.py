"""Terminates a worker's runs when the worker dies.

Started by the worker as a separate process (standard library only, run as a
script) with the descriptor of a memfd the worker shares with it: a table of
32-bit process-group ids, those of the worker's runs (0 in a free slot). The
worker writes nothing to this process's stdin; when stdin reaches end of file,
the worker is gone (a graceful worker closes it when its runs are over): every
group still in the table gets SIGTERM and, after a grace period, SIGKILL, so no
run goes on unsupervised.
"""

import array
import os
import signal
import sys
import time


def main() -> None:
    grace = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    table = int(sys.argv[2])
    # The worker's terminal signals are not ours: survive them to do the cleanup.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while sys.stdin.buffer.read(65536):
        pass
    alive = _signal_all(_listed(table), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = _signal_all(alive, 0)
    _signal_all(alive, signal.SIGKILL)


def _listed(table: int) -> set[int]:
    size = os.fstat(table).st_size
    data = os.pread(table, size, 0)
    slots = array.array("i")
    slots.frombytes(data[:len(data) - len(data) % slots.itemsize])
    return {pgid for pgid in slots if pgid > 0}


def _signal_all(groups: set[int], sig: int) -> set[int]:
    alive = set()
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
            alive.add(pgid)
        except (ProcessLookupError, PermissionError):
            pass
    return alive


if __name__ == "__main__":
    main()
