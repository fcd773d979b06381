"""A run command for the dashboard's tests: prints a line, waits for a gate, prints another.

    speaker.py DIR

Prints `first line of <run id>`, waits (at most 120 s) until DIR/<run id>.gate
exists, prints `second line of <run id>` and exits 0; so a test sees output
arrive while the run is still running.
"""

import os
import sys
import time

directory = sys.argv[1]
run_id = os.environ.get("MQ_WORKER_RUN_ID", "unknown")
print(f"first line of {run_id}", flush=True)
deadline = time.monotonic() + 120
gate = os.path.join(directory, f"{run_id}.gate")
while not os.path.exists(gate) and time.monotonic() < deadline:
    time.sleep(0.05)
print(f"second line of {run_id}", flush=True)
