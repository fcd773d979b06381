"""A run command for tests: records its start and end, sleeps, exits with a given code.

    probe.py DIR [--sleep S] [--exit N] [--ignore-term] [--term-marker FILE] [--gate FILE]

Writes DIR/<run id>.start (with its pid, start time and environment) and
DIR/<run id>.end, so tests can see which runs really ran, when, and with what.
With --gate, it waits (at most 120 s) until FILE exists before it sleeps: a test
then decides when the run ends, whatever the time its peers took to start.
"""

import json
import os
import signal
import sys
import time


def main() -> None:
    args = sys.argv[1:]
    directory = args[0]
    sleep = float(args[args.index("--sleep") + 1]) if "--sleep" in args else 0.0
    code = int(args[args.index("--exit") + 1]) if "--exit" in args else 0
    if "--ignore-term" in args:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "--term-marker" in args:
        marker = args[args.index("--term-marker") + 1]

        def on_term(signum: int, frame: object) -> None:
            with open(marker, "w") as f:
                f.write(repr(time.time()))
            os._exit(143)

        signal.signal(signal.SIGTERM, on_term)
    run_id = os.environ.get("MQ_WORKER_RUN_ID", "unknown")
    _write(os.path.join(directory, f"{run_id}.start"),
           {"pid": os.getpid(), "t": time.time(), "cwd": os.getcwd(), "env": dict(os.environ)})
    if "--gate" in args:
        gate = args[args.index("--gate") + 1]
        deadline = time.monotonic() + 120
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.05)
    time.sleep(sleep)
    _write(os.path.join(directory, f"{run_id}.end"), {"t": time.time()})
    sys.exit(code)


def _write(path: str, record: dict) -> None:
    """Write atomically: readers never see half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
