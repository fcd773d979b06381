"""The probe and metrics port: what Kubernetes, Prometheus and a hostile neighbour see."""

from __future__ import annotations

import gzip
import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest

from mq_worker.health import serve_health
from tests.helpers import PYTHON, VHost, running_worker, wait_until
from tests.test_operations import health_endpoint, samples

pytestmark = pytest.mark.anyio

FLOOD = 1100  # more than a default descriptor limit of 1024


def fetch(port: int, path: str, *, accept: str | None = None,
          timeout: float = 5) -> tuple[int, str, bytes]:
    """(status, content type, body) of GET http://127.0.0.1:port/path; 0 if refused."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()
    except (ConnectionError, urllib.error.URLError, TimeoutError):
        return 0, "", b""


async def get(port: int, path: str, **kwargs: Any) -> tuple[int, str, bytes]:
    return await anyio.to_thread.run_sync(lambda: fetch(port, path, **kwargs))


async def wait_status(port: int, path: str, status: int, timeout: float = 15) -> None:
    """Poll `path` (from a thread: the server may share this event loop) until `status`."""
    with anyio.fail_after(timeout):
        while True:
            if (await get(port, path, timeout=2))[0] == status:
                return
            await anyio.sleep(0.05)


def _open_idle_connections(port: int, count: int, opened: list[socket.socket]) -> None:
    """Connect `count` times and send nothing (a connection refused or timed out is fine)."""
    for _ in range(count):
        try:
            opened.append(socket.create_connection(("127.0.0.1", port), timeout=3))
        except OSError:
            continue


def _worker_with_1024_descriptors(url: str, port: int, log: Any) -> subprocess.Popen[bytes]:
    """`mq-worker start` under the common default limit of 1024 open descriptors."""
    return subprocess.Popen(
        ["sh", "-c", 'ulimit -n 1024 && exec "$@"', "sh", PYTHON, "-m", "mq_worker", "start",
         "--url", url, "--health-port", str(port), "--log-format", "json"],
        stdout=log, stderr=subprocess.STDOUT)


def free_port() -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return int(probe_socket.getsockname()[1])


async def test_probes_tell_liveness_from_readiness(vhost: VHost) -> None:
    async with running_worker(vhost.url) as worker, health_endpoint(worker) as port:
        await wait_status(port, "/readyz", 200)
        for path in ("/livez", "/readyz", "/health"):
            status, content_type, body = await get(port, path)
            assert status == 200 and content_type == "application/json"
            assert json.loads(body)["status"] == "ok"
        assert worker._consumer is not None
        worker._consumer.pause("outbox")
        for path in ("/readyz", "/health"):
            status, _, body = await get(port, path)
            assert status == 503 and "outbox" in json.loads(body)["reason"]
        assert (await get(port, "/livez"))[0] == 200
        assert (await get(port, "/nope"))[0] == 404


async def test_metrics_follow_prometheus_conventions(vhost: VHost) -> None:
    async with running_worker(vhost.url, queue=["a", "b"]) as worker, \
            health_endpoint(worker) as port:
        status, content_type, body = await get(port, "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        values = samples(body.decode())
        info = [labels for (name, labels) in values if name == "mq_worker_build_info"]
        assert info and dict(info[0])["version"]
        assert values[("process_resident_memory_bytes", ())] > 0
        for queue in ("a", "b"):
            labels = (("pool", "default"), ("queue", queue))
            assert values[("mq_worker_runs_completed_total", labels)] == 0
            assert values[("mq_worker_runs_crashed_total", labels)] == 0
            assert values[("mq_worker_run_duration_seconds_count", labels)] == 0
            assert values[("mq_worker_publish_to_start_seconds_count", labels)] == 0

        status, content_type, body = await get(
            port, "/metrics", accept="application/openmetrics-text; version=1.0.0")
        assert content_type.startswith("application/openmetrics-text")
        assert body.rstrip().endswith(b"# EOF")

        def gzipped() -> tuple[str, bytes]:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                             headers={"Accept-Encoding": "gzip"})
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.headers["Content-Encoding"], response.read()

        encoding, packed = await anyio.to_thread.run_sync(gzipped)
        assert encoding == "gzip"
        assert b"mq_worker_build_info" in gzip.decompress(packed)


async def test_slow_headers_are_timed_out_and_excess_connections_refused(
    vhost: VHost
) -> None:
    async with running_worker(vhost.url) as worker, anyio.create_task_group() as tg:
        port = await tg.start(lambda task_status: serve_health(
            worker, 0, max_connections=4, header_timeout=0.5, task_status=task_status))
        idle = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(4)]
        await idle[0].send(b"GET /livez HTTP/1.1\r\nHost: x\r\n")  # never finished
        with anyio.fail_after(5):
            status, _, _ = await get(port, "/livez")
        assert status in (503, 200)
        with anyio.fail_after(5):
            answer = await idle[0].receive()
        assert answer.startswith(b"HTTP/1.1 408")
        await wait_status(port, "/livez", 200, timeout=10)
        for stream in idle:
            await stream.aclose()
        tg.cancel_scope.cancel()


async def test_the_health_port_binds_loopback_by_default(vhost: VHost) -> None:
    address = _outside_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    async with running_worker(vhost.url) as worker, health_endpoint(worker) as port:
        assert (await get(port, "/livez"))[0] == 200
        with pytest.raises(OSError), socket.create_connection((address, port), timeout=5):
            pass


def _outside_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            udp.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
        except OSError:
            return None
        address = str(udp.getsockname()[0])
    return None if address.startswith("127.") else address


# Slow: waits out the header timeout of a worker started as users do. Covered in the default
# suite by test_lifecycle's test_runs_started_while_descriptors_are_exhausted_are_not_crashed
# (idle connections to the health port take every descriptor; runs are given back, then run,
# and the health port answers again) and test_slow_headers_are_timed_out_and_excess_
# connections_refused above (idle connections timed out, those beyond the limit refused).
@pytest.mark.slow
async def test_a_flood_of_idle_connections_leaves_the_worker_usable(
    vhost: VHost, tmp_path: Path
) -> None:
    port = free_port()
    log = (tmp_path / "worker.log").open("w")
    worker = _worker_with_1024_descriptors(vhost.url, port, log)
    flood: list[socket.socket] = []
    try:
        await wait_until(lambda: fetch(port, "/health")[0] == 200, timeout=30)
        await anyio.to_thread.run_sync(_open_idle_connections, port, FLOOD, flood)
        began = time.monotonic()
        status, _, _ = await get(port, "/health", timeout=10)
        assert status in (0, 200, 503), "the probe hung instead of being answered or refused"
        assert time.monotonic() - began < 10
        await wait_until(lambda: fetch(port, "/health", timeout=2)[0] == 200, timeout=30)
        result = await anyio.to_thread.run_sync(lambda: subprocess.run(
            [PYTHON, "-m", "mq_worker", "submit", "--url", vhost.url, "--wait",
             "--timeout", "60", "--", "echo", "still here"],
            capture_output=True, text=True, timeout=90))
        assert result.returncode == 0, result.stderr
        assert worker.poll() is None
    finally:
        for connection in flood:
            connection.close()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()
