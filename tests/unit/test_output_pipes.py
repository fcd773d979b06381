"""A run's stdout and stderr read while it runs: lines, their ends, and when reading stops.

Real processes, no broker: `stream_output` on a started `ProcessHandle`, with the exit
awaited beside it as the process worker does.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import anyio
import pytest

from mq_worker.infrastructure import ProcessHandle, read_output, start_process, stream_output

pytestmark = pytest.mark.anyio


class Lines:
    """A logger and an `on_line` that keep what they get."""

    def __init__(self) -> None:
        self.logged: list[tuple[str, str]] = []
        self.seen: list[tuple[str, str]] = []

    def info(self, event: str, **fields: Any) -> None:
        assert event == "run output"
        self.logged.append((fields["stream"], fields["line"]))

    def on_line(self, stream: str, text: str) -> None:
        self.seen.append((stream, text))


def _python(code: str) -> ProcessHandle:
    return start_process([sys.executable, "-c", code], env=dict(os.environ), cwd=None,
                         capture_output=True)


async def _run(handle: ProcessHandle, lines: Lines) -> int:
    async with anyio.create_task_group() as tg:
        tg.start_soon(stream_output, handle, lines, lines.on_line)
        status = await handle.wait()
    return status


def _open_descriptors() -> set[int]:
    """Open descriptors, without the one listing them."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if "/fd" not in os.readlink(f"/proc/self/fd/{name}"):
                found.add(int(name))
        except FileNotFoundError:  # the listing's own, closed by now
            pass
    return found


async def test_every_line_of_both_streams_arrives_in_order_and_the_pipes_close() -> None:
    handle = _python(
        "import sys\n"
        "for i in range(3000): print(f'out {i}')\n"
        "sys.stdout.flush()\n"
        "sys.stderr.write('err 1\\r\\nerr 2\\n')\n"
        "sys.stdout.buffer.write(b'bad \\xff byte\\nlast without newline')\n")
    assert handle.popen.stdout is not None and handle.popen.stderr is not None
    pipes = {handle.popen.stdout.fileno(), handle.popen.stderr.fileno()}
    before = _open_descriptors()
    lines = Lines()
    assert await _run(handle, lines) == 0
    out = [text for stream, text in lines.seen if stream == "stdout"]
    err = [text for stream, text in lines.seen if stream == "stderr"]
    assert out == [f"out {i}" for i in range(3000)] + ["bad \ufffd byte", "last without newline"]
    assert err == ["err 1", "err 2"]
    assert lines.logged == lines.seen
    assert handle.popen.stdout is not None and handle.popen.stdout.closed
    assert handle.popen.stderr is not None and handle.popen.stderr.closed
    assert _open_descriptors() <= before - pipes


async def test_a_run_without_output_ends_with_nothing_logged() -> None:
    handle = start_process(["/bin/true"], env={}, cwd=None, capture_output=True)
    lines = Lines()
    assert await _run(handle, lines) == 0
    assert lines.seen == [] and lines.logged == []


async def test_output_without_newlines_is_cut_into_lines_of_64_kib() -> None:
    handle = _python("import sys; sys.stdout.write('x' * 200000)")
    lines = Lines()
    assert await _run(handle, lines) == 0
    texts = [text for _, text in lines.seen]
    assert "".join(texts) == "x" * 200000
    assert len(texts) >= 3 and all(len(t) >= 65536 for t in texts[:-1])


async def test_reading_stops_a_second_after_the_exit_when_a_child_holds_the_pipe() -> None:
    # The run exits at once; the child it left writes one line, then keeps the pipe open.
    handle = _python(
        "import os, subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', "
        "'import time; time.sleep(0.3); print(\"from the child\", flush=True); time.sleep(30)'])\n")
    lines = Lines()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream_output, handle, lines, lines.on_line)
            await handle.wait()
            exited = time.monotonic()
        waited = time.monotonic() - exited
        assert lines.seen == [("stdout", "from the child")]
        assert 1.0 <= waited < 5.0  # a second after the child's line (0.3 s after the exit)
    finally:
        handle.signal_group(9)


async def test_a_closed_reader_ships_the_partial_line_and_closes_the_pipes() -> None:
    handle = _python("import sys, time; sys.stdout.write('first\\npartial'); sys.stdout.flush(); "
                     "time.sleep(30)")
    lines = Lines()
    first = anyio.Event()

    def on_line(stream: str, text: str) -> None:
        lines.on_line(stream, text)
        first.set()

    try:
        reader = read_output(handle, lines, on_line)
        with anyio.fail_after(10):
            await first.wait()  # one write of both: "partial" was read with "first"
        assert lines.seen == [("stdout", "first")]
        reader.close()
        assert lines.seen == [("stdout", "first"), ("stdout", "partial")]
        assert handle.popen.stdout is not None and handle.popen.stdout.closed
        reader.close()  # twice is harmless
        assert len(lines.seen) == 2
        with anyio.fail_after(1):
            await reader.closed()
    finally:
        handle.signal_group(9)
        await handle.wait()


async def test_reading_started_after_the_exit_still_reads_everything() -> None:
    handle = _python("print('early')")
    await handle.wait()
    lines = Lines()
    await stream_output(handle, lines, lines.on_line)
    assert lines.seen == [("stdout", "early")]


async def test_output_after_the_exit_keeps_reading_while_it_comes() -> None:
    # A child writes a line every 0.6 s for 2.4 s after the run exits: each resets the
    # second of grace, so every line arrives (a fixed second from the exit would end at ~1 s).
    handle = _python(
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time\\n"
        "for i in range(4):\\n time.sleep(0.6); print(i, flush=True)\\n"
        "time.sleep(30)'])\n")
    lines = Lines()
    try:
        with anyio.fail_after(15):
            await _run(handle, lines)
        assert lines.seen == [("stdout", str(i)) for i in range(4)]
    finally:
        handle.signal_group(9)


async def test_a_reader_made_after_the_exit_gives_up_on_a_pipe_a_child_holds() -> None:
    handle = _python("import subprocess, sys\n"
                     "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n")
    try:
        await handle.wait()
        lines = Lines()
        with anyio.fail_after(10):
            await stream_output(handle, lines, lines.on_line)
        assert lines.seen == []
    finally:
        handle.signal_group(9)


async def test_a_line_that_cannot_be_shipped_costs_that_line_only() -> None:
    handle = _python("print('a\\nboom\\nc', flush=True)")
    lines = Lines()
    errors: list[BaseException] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: errors.append(context["exception"]))

    def on_line(stream: str, text: str) -> None:
        if text == "boom":
            raise RuntimeError("cannot ship")
        lines.on_line(stream, text)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream_output, handle, lines, on_line)
            await handle.wait()
    finally:
        loop.set_exception_handler(None)
    assert lines.seen == [("stdout", "a"), ("stdout", "c")]
    assert [str(e) for e in errors] == ["cannot ship"]
