"""A run command for retry tests: records every attempt of a run, then fails or succeeds.

    attempts.py DIR [--exit N] [--succeed-on K] [--sleep S]

Appends one JSON line per attempt to DIR/<run id>.attempts (attempt number from
MQ_WORKER_RUN_ATTEMPT, pid, start time), sleeps S seconds, then exits 0 if the
attempt is K or later, else N.
"""

import json
import os
import sys
import time


def main() -> None:
    args = sys.argv[1:]
    directory = args[0]
    code = int(args[args.index("--exit") + 1]) if "--exit" in args else 3
    succeed_on = int(args[args.index("--succeed-on") + 1]) if "--succeed-on" in args else 0
    sleep = float(args[args.index("--sleep") + 1]) if "--sleep" in args else 0.0
    attempt = int(os.environ.get("MQ_WORKER_RUN_ATTEMPT", "0"))
    record = {"attempt": attempt, "pid": os.getpid(), "t": time.time(),
              "worker": os.environ.get("MQ_WORKER_WORKER")}
    path = os.path.join(directory, os.environ.get("MQ_WORKER_RUN_ID", "unknown") + ".attempts")
    with open(path, "a") as f:  # one short write: lines of concurrent attempts never mix
        f.write(json.dumps(record) + "\n")
    time.sleep(sleep)
    sys.exit(0 if succeed_on and attempt >= succeed_on else code)


if __name__ == "__main__":
    main()
