"""What a spawn costs the worker in system calls (counted with strace, not timed)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.helpers import PYTHON

SPAWNS = 30
_SPAWNING = (
    "from mq_worker.infrastructure import start_process\n"
    f"for _ in range({SPAWNS}):\n"
    "    handle = start_process(['/bin/true'], env={}, cwd=None, capture_output=False)\n"
    "    handle.popen.wait()\n"
)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_run_without_output_does_not_open_dev_null_for_every_spawn(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-e", "trace=openat", "-o", str(trace), PYTHON, "-c", _SPAWNING],
                   check=True, timeout=120)
    opens = [line for line in trace.read_text().splitlines()
             if re.search(r'openat\(.*"/dev/null"', line)]
    assert len(opens) <= 1
