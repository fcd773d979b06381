"""The guardian stops a dead worker's runs, and costs a run no system call to tell it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import anyio
import psutil
import pytest

from tests.helpers import PYTHON, wait_until

pytestmark = pytest.mark.anyio

RUNS = 30
_RUNS_UNDER_A_GUARDIAN = (
    "import asyncio\n"
    "from mq_worker.guardian import Guardian\n"
    "from mq_worker.infrastructure import start_process\n"
    "async def main():\n"
    "    guardian = Guardian()\n"
    "    guardian.start()\n"
    f"    for _ in range({RUNS}):\n"
    "        handle = start_process(['/bin/true'], env={}, cwd=None, capture_output=False)\n"
    "        guardian.watch(handle.pid)\n"
    "        await asyncio.sleep(0)\n"
    "        handle.popen.wait()\n"
    "        guardian.forget(handle.pid)\n"
    "        await asyncio.sleep(0)\n"
    "    guardian.stop()\n"
    "asyncio.run(main())\n"
)

# A table of one slot at first: the second run makes it grow.
_DYING_WORKER = (
    "import json, os, signal\n"
    "from mq_worker.guardian import Guardian\n"
    "from mq_worker.infrastructure import start_process\n"
    "guardian = Guardian(slots=1)\n"
    "guardian.start()\n"
    "ended, *running = (start_process(['sleep', '60'], env={'PATH': os.environ['PATH']},\n"
    "                                 cwd=None, capture_output=False) for _ in range(3))\n"
    "guardian.watch(ended.pid)\n"
    "guardian.forget(ended.pid)\n"
    "for handle in running:\n"
    "    guardian.watch(handle.pid)\n"
    "print(json.dumps([ended.pid, [h.pid for h in running]]), flush=True)\n"
    "os.kill(os.getpid(), signal.SIGKILL)\n"
)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_starting_and_ending_runs_writes_nothing_to_the_guardian(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-e", "trace=write,writev", "-o", str(trace), PYTHON, "-c",
                    _RUNS_UNDER_A_GUARDIAN], check=True, timeout=120)
    writes = [line for line in trace.read_text().splitlines() if re.match(r"writev?\(", line)]
    assert writes == []


async def test_a_dead_workers_runs_are_terminated_and_ended_ones_left_alone() -> None:
    worker = await anyio.run_process([PYTHON, "-c", _DYING_WORKER], check=False)
    ended, running = json.loads(worker.stdout)
    try:
        await wait_until(lambda: not any(_alive(pid) for pid in running), timeout=15)
        assert _alive(ended)
    finally:
        for pid in (*running, ended):
            if _alive(pid):
                psutil.Process(pid).kill()
