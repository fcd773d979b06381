"""Terminates a worker's runs when the worker dies.

Started by the worker as a separate process (standard library only, run as a
script) with the descriptor of a memory map the worker shares with it: one bit
per process-group id, set while the group is one of the worker's runs. The
worker writes nothing to this process's stdin; when stdin reaches end of file,
the worker is gone (a graceful worker closes it when its runs are over): every
group still listed gets SIGTERM and, after a grace period, SIGKILL, so no run
goes on unsupervised.
"""

import mmap
import os
import signal
import sys
import time


def main() -> None:
    grace = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    groups_map = mmap.mmap(int(sys.argv[2]), 0)
    # The worker's terminal signals are not ours: survive them to do the cleanup.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while sys.stdin.buffer.read(65536):
        pass
    alive = _signal_all(_listed(groups_map), signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = _signal_all(alive, 0)
    _signal_all(alive, signal.SIGKILL)


def _listed(groups_map: mmap.mmap) -> set[int]:
    data = groups_map[:]
    blank = bytes(4096)
    groups = set()
    for start in range(0, len(data), len(blank)):
        if data[start:start + len(blank)] == blank:
            continue
        for index in range(start, min(start + len(blank), len(data))):
            byte = data[index]
            for bit in range(8):
                if byte >> bit & 1:
                    groups.add(index * 8 + bit)
    return groups


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
