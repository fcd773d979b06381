"""Terminates a worker's runs when the worker dies.

Started by the worker as a separate process (standard library only, run as a
script). It reads lines "+PGID" and "-PGID" from stdin as the worker starts and
reaps run processes. When stdin reaches end of file, the worker is gone (a
graceful worker sends nothing more and closes it when its runs are over): every
process group still listed gets SIGTERM and, after a grace period, SIGKILL, so
no run goes on unsupervised.
"""

import os
import signal
import sys
import time


def main() -> None:
    grace = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    # The worker's terminal signals are not ours: survive them to do the cleanup.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin.buffer:
        text = line.strip()
        if text[:1] == b"+":
            groups.add(int(text[1:]))
        elif text[:1] == b"-":
            groups.discard(int(text[1:]))
    alive = _signal_all(groups, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = _signal_all(alive, 0)
    _signal_all(alive, signal.SIGKILL)


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
