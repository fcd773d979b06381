"""The dashboard for tests: `mq-worker ledger --http-port` as operators start it, and a browser.

The browser is a Chromium installed on the machine (on PATH, or named by
MQ_WORKER_TEST_CHROMIUM), driven by Playwright's client;
nothing downloads a browser. Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("MQ_WORKER_TEST_CHROMIUM") or next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
HAVE_CHROMIUM = CHROMIUM is not None and os.path.exists(CHROMIUM)
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class DashboardProcess:
    """`mq-worker ledger --http-port PORT` (or `mq-worker dashboard`) in a process of its own."""

    def __init__(self, url: str, db: str, *args: str, command: str = "ledger") -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.gettempdir()) / f"mq_worker-test-dashboard-{self.port}.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mq_worker", command, "--url", url, "--db", db,
             "--http-port", str(self.port), "--log-format", "json", *args],
            stdout=self._log, stderr=subprocess.STDOUT)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        request = urllib.request.Request(self.base + path, data=body, headers=headers,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def wait_serving(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the dashboard exited: {self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.base + "/api/workers", timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # answering (perhaps asking for authentication)
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"the dashboard did not serve: {self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()


@asynccontextmanager
async def browser() -> AsyncIterator[Any]:
    """Headless Chromium, or the test is skipped when it is not installed."""
    if not HAVE_CHROMIUM:
        pytest.skip("no Chromium on PATH (set MQ_WORKER_TEST_CHROMIUM to its executable, or "
                    "apt-get install chromium chromium-driver)")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM,
                                                    args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            await chromium.close()


async def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path
