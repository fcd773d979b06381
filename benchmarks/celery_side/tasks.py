"""The Celery side of benchmarks/compare_celery.py (runs in benchmarks/.venv-celery).

One task, `run_true`: it records when it started, runs /bin/true through subprocess, and
appends "<index> <sent> <started> <ended>" to the file named by BENCH_RESULTS_FILE. The
broker is BENCH_BROKER_URL; BENCH_QUEUE_TYPE is "classic" (Celery's default) or "quorum".
"""

from __future__ import annotations

import os
import subprocess
import time

from celery import Celery
from kombu import Queue

QUEUE = "bench"
QUEUE_TYPE = os.environ.get("BENCH_QUEUE_TYPE", "classic")

app = Celery("tasks", broker=os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1//"))
app.conf.update(
    task_ignore_result=True,
    task_default_queue=QUEUE,
    task_queues=[
        Queue(QUEUE, queue_arguments={"x-queue-type": "quorum"})
        if QUEUE_TYPE == "quorum" else Queue(QUEUE)
    ],
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

_fd: int | None = None


def _results() -> int:
    global _fd
    if _fd is None:
        _fd = os.open(os.environ["BENCH_RESULTS_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return _fd


@app.task(name="run_true")
def run_true(index: int, sent: float) -> None:
    started = time.time()
    subprocess.run(["/bin/true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    ended = time.time()
    os.write(_results(), f"{index} {sent!r} {started!r} {ended!r}\n".encode())
