"""Publishes benchmark tasks to Celery (runs in benchmarks/.venv-celery).

    client.py burst COUNT START_INDEX          publish COUNT tasks as fast as possible
    client.py paced RATE COUNT START_INDEX     publish COUNT tasks at RATE per second

Each task carries the time taken just before its publish call. A first task with index -1
opens the connection before any measured one.
"""

from __future__ import annotations

import sys
import time

from tasks import run_true


def main() -> None:
    mode = sys.argv[1]
    run_true.apply_async((-1, time.time()))
    if mode == "burst":
        count, first = int(sys.argv[2]), int(sys.argv[3])
        for index in range(first, first + count):
            run_true.apply_async((index, time.time()))
    elif mode == "paced":
        rate, count, first = float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
        start = time.monotonic() + 0.05
        for i in range(count):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            run_true.apply_async((first + i, time.time()))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
