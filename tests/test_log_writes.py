"""A log record costs one write(2): the worker logs two records per run at INFO."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.helpers import PYTHON

RECORDS = 200
_LOGGING = (
    "from mq_worker import logs; import structlog\n"
    "logs.configure('json', 'INFO')\n"
    "log = structlog.get_logger('mq_worker.test')\n"
    f"for i in range({RECORDS}): log.info('run ended', run_id=str(i))\n"
)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_each_log_record_is_written_with_one_system_call(tmp_path) -> None:  # type: ignore[no-untyped-def]
    trace = tmp_path / "trace"
    result = subprocess.run(
        ["strace", "-f", "-e", "trace=write", "-o", str(trace), PYTHON, "-c", _LOGGING],
        capture_output=True, text=True, timeout=120, check=True)
    lines = result.stderr.splitlines()
    assert len(lines) == RECORDS and all(line.startswith("{") for line in lines)
    writes_to_stderr = [line for line in trace.read_text().splitlines()
                        if re.search(r"\bwrite\(2,", line)]
    assert len(writes_to_stderr) <= RECORDS + 2
