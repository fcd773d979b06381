"""Every ```python and ```bash sample in README.md and docs/*.md runs, against a real worker.

Each sample gets a vhost of its own with a process worker serving pool `default`,
queue `default` (heartbeats every second) and its health endpoint. Samples are
run as a reader would paste them, with these substitutions only:

* `amqp://guest:guest@localhost:5672/` becomes the test vhost's URL, and
  `MQ_WORKER_URL` is set to it (commands without `--url` use it);
* `localhost:8080` becomes the worker's health endpoint;
* `mq-worker` and `.venv/bin/...` are the project's virtual environment.

Bash samples run with `set -euo pipefail` from the repository root; a line ending
in a comment `# exits N` must exit with status N. A block preceded by the comment
`<!-- not-run: reason -->` is skipped with that reason (and only such blocks).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from mq_worker.health import serve_health
from tests.helpers import VHost, running_worker

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = ("python", "bash")
DOC_URL = "amqp://guest:guest@localhost:5672/"
DOC_HEALTH = "localhost:8080"
_NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(.+?)\s*-->$")
_EXITS = re.compile(r"#\s*(?:.*,\s*)?exits (\d+)\b")


@dataclass(frozen=True)
class Sample:
    path: Path
    line: int
    language: str
    code: str
    not_run: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def samples_of(path: Path) -> list[Sample]:
    """The fenced python and bash blocks of a Markdown file."""
    found: list[Sample] = []
    lines = path.read_text().splitlines()
    previous = ""
    index = 0
    while index < len(lines):
        line = lines[index]
        fence = re.match(r"^(\s*)```(\w*)\s*$", line)
        if fence is None:
            if line.strip():
                previous = line.strip()
            index += 1
            continue
        indent, language = fence.groups()
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if language in LANGUAGES:
            code = "\n".join(body.removeprefix(indent) for body in lines[index + 1:end])
            marker = _NOT_RUN.match(previous)
            found.append(Sample(path, index + 1, language, code + "\n",
                                marker.group(1) if marker else None))
        previous = ""
        index = end + 1
    return found


SAMPLES = [sample for path in DOCUMENTS for sample in samples_of(path)]


def test_the_docs_have_samples_and_markers_are_explained() -> None:
    assert len([s for s in SAMPLES if s.not_run is None]) >= 7
    for path in DOCUMENTS:
        text = path.read_text()
        markers = len(re.findall(r"<!--\s*not-run:", text))
        assert markers == len([s for s in SAMPLES if s.path == path and s.not_run]), (
            f"{path.name}: a not-run marker that is not right before a python/bash block")


def bash_script(code: str) -> str:
    """The sample with its `# exits N` lines checked for that status."""
    out = ["set -euo pipefail"]
    for line in code.splitlines():
        expected = _EXITS.search(line)
        if expected and not line.rstrip().endswith("\\"):
            command = line[: expected.start()].rstrip()
            out.append(f"set +e; {command}; status=$?; set -e")
            out.append(f'[ "$status" -eq {expected.group(1)} ] || '
                       f'{{ echo "expected exit {expected.group(1)}, got $status: '
                       f'{command.replace(chr(34), "")}" >&2; exit 1; }}')
        else:
            out.append(line)
    return "\n".join(out) + "\n"


@dataclass
class DocWorld:
    url: str
    health_port: int


@pytest.fixture
async def world(vhost: VHost) -> AsyncIterator[DocWorld]:
    async with running_worker(vhost.url, name="doc-worker", heartbeat_seconds=1) as worker, \
            anyio.create_task_group() as tg:
        port = await tg.start(serve_health, worker, 0)
        yield DocWorld(vhost.url, port)
        tg.cancel_scope.cancel()


@pytest.mark.anyio
@pytest.mark.parametrize("sample", SAMPLES, ids=[s.id for s in SAMPLES])
async def test_sample_runs(sample: Sample, world: DocWorld, tmp_path: Path) -> None:
    if sample.not_run is not None:
        pytest.skip(f"marked not-run: {sample.not_run}")
    code = sample.code.replace(DOC_URL, world.url).replace(
        DOC_HEALTH, f"127.0.0.1:{world.health_port}")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "MQ_WORKER_URL": world.url, "TMPDIR": str(tmp_path),
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    if sample.language == "python":
        script = tmp_path / "sample.py"
        script.write_text(code)
        command = [sys.executable, str(script)]
    else:
        script = tmp_path / "sample.sh"
        script.write_text(bash_script(code))
        command = ["bash", str(script)]
    with anyio.fail_after(120):
        result = await anyio.run_process(command, cwd=ROOT, env=env, check=False)
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, f"{sample.id} failed ({result.returncode}):\n{output}"


def test_systemd_unit_in_operations_passes_systemd_analyze(tmp_path: Path) -> None:
    """The unit file in docs/operations.md is one systemd accepts without a warning."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = (ROOT / "docs" / "operations.md").read_text()
    found = re.search(r"mq-worker\.service`:\n\n```ini\n(.*?)```", text, re.S)
    assert found is not None
    unit = found.group(1)
    # Only what must exist on this machine changes: the program, the user, the env file.
    unit = unit.replace("/opt/mq-worker/.venv/bin/mq-worker", str(Path(sys.executable).parent
                                                                  / "mq-worker"))
    unit = re.sub(r"^(User|Group)=.*$", r"\1=root", unit, flags=re.M)
    unit = unit.replace("EnvironmentFile=/etc/mq-worker/", f"EnvironmentFile=-{tmp_path}/")
    path = tmp_path / "mq-worker.service"
    path.write_text(unit)
    result = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
