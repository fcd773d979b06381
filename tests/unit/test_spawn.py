"""Starting a run's process: what it inherits and what the start costs, without a broker."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mq_worker.infrastructure import start_process
from tests.helpers import PYTHON

SPAWNS = 30
_OPEN_DESCRIPTORS = (
    "import os\n"
    "found = []\n"
    "for fd in range(3, 1024):\n"
    "    try:\n"
    "        os.fstat(fd)\n"
    "    except OSError:\n"
    "        continue\n"
    "    found.append(fd)\n"
    "print(found)\n"
)
_SPAWNING = (
    "from mq_worker.infrastructure import start_process\n"
    f"for _ in range({SPAWNS}):\n"
    "    handle = start_process(['/bin/true'], env={}, cwd=None, capture_output=False)\n"
    "    handle.popen.wait()\n"
)


@pytest.mark.parametrize("cwd", [None, "/"])
def test_a_run_inherits_no_descriptor_but_its_standard_streams(cwd: str | None) -> None:
    inheritable = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(inheritable, True)
    try:
        handle = start_process([sys.executable, "-c", _OPEN_DESCRIPTORS], env={}, cwd=cwd,
                               capture_output=True)
        assert handle.popen.stdout is not None
        output = handle.popen.stdout.read()
        handle.popen.stdout.close()
        assert handle.popen.stderr is not None
        handle.popen.stderr.close()
        assert handle.popen.wait() == 0
    finally:
        os.close(inheritable)
    assert output.strip() == b"[]"


def test_exit_codes_and_signals_are_reported_as_subprocess_does() -> None:
    exits = start_process([sys.executable, "-c", "raise SystemExit(3)"], env={}, cwd=None,
                          capture_output=False)
    killed = start_process([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"],
                           env={}, cwd=None, capture_output=False)
    assert (exits.popen.wait(), killed.popen.wait()) == (3, -9)
    assert (exits.returncode, killed.returncode) == (3, -9)


def test_a_missing_executable_raises_at_start() -> None:
    with pytest.raises(FileNotFoundError):
        start_process(["/nonexistent/run"], env={}, cwd=None, capture_output=False)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_a_spawn_needs_no_pipe_of_its_own(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trace = tmp_path / "trace"
    subprocess.run(["strace", "-e", "trace=pipe2,pipe", "-o", str(trace), PYTHON, "-c",
                    _SPAWNING], check=True, timeout=120)
    pipes = [line for line in trace.read_text().splitlines() if re.match(r"pipe2?\(", line)]
    assert len(pipes) < SPAWNS / 2


def test_a_run_does_not_inherit_the_signals_python_ignores() -> None:
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # as in every Python process
    handle = start_process(["/bin/sleep", "30"], env={}, cwd=None, capture_output=False)
    try:
        status = Path(f"/proc/{handle.pid}/status").read_text()
        ignored = int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M).group(1), 16)  # type: ignore[union-attr]
        assert not ignored & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1))
    finally:
        os.killpg(handle.pid, signal.SIGKILL)
        handle.popen.wait()
