"""The dashboard in a real headless Chromium, against `mq-worker ledger --http-port`.

What an operator sees: a worker and a run appear on the overview without a
reload; a run's output arrives while it runs; Cancel stops the process; a
rejected run is fixed and replayed from Dead letters; the state filter of the
runs page. Screenshots (light, dark, phone width) go to test-artifacts/.
"""

from __future__ import annotations

import json
import shlex
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from mq_worker import Publisher, new_run
from tests.helpers import (
    VHost,
    probe,
    publish_raw,
    running_worker,
    started_runs,
    until_ready,
    wait_until,
)
from tests.helpers.dashboard import DESKTOP, PHONE, DashboardProcess, browser, screenshot

pytestmark = pytest.mark.anyio
SPEAKER = str(Path(__file__).parent / "helpers" / "speaker.py")
SECONDS = 1000  # Playwright counts milliseconds


@pytest.fixture
def dashboard(vhost: VHost, tmp_path: Path) -> Iterator[DashboardProcess]:
    process = DashboardProcess(vhost.url, f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        process.wait_serving()
        yield process
    finally:
        process.stop()


async def _open(chromium: Any, url: str, *, scheme: str = "light",
                viewport: dict[str, int] = DESKTOP) -> Any:
    context = await chromium.new_context(color_scheme=scheme, viewport=viewport)
    page = await context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # the confirmations of actions
    await page.goto(url)
    return page


async def test_overview_shows_a_new_worker_and_a_new_run_without_reload(
        dashboard: DashboardProcess, vhost: VHost, tmp_path: Path) -> None:
    async with browser() as chromium:
        page = await _open(chromium, dashboard.base + "/")
        await page.wait_for_selector("#live.on", timeout=15 * SECONDS)
        await page.evaluate("window.notReloaded = true")
        name = f"dash-{uuid.uuid4().hex[:6]}"
        async with running_worker(vhost.url, name=name) as worker, Publisher(vhost.url) as pub:
            await page.wait_for_selector(f'#workers tr[data-worker="{name}"]',
                                         timeout=5 * SECONDS)
            row = await page.inner_text(f'#workers tr[data-worker="{name}"]')
            assert "live" in row and worker.settings.name in row
            run = await pub.submit(new_run(probe(tmp_path, sleep=1), name="watched"))
            await page.wait_for_selector(f'#recent-runs tr[data-run="{run.id}"]',
                                         timeout=5 * SECONDS)
            await page.wait_for_selector(
                f'#recent-runs tr[data-run="{run.id}"] >> text=completed', timeout=15 * SECONDS)
            assert await page.evaluate("window.notReloaded") is True
            await screenshot(page, "overview-light")
            for scheme, viewport, shot in (("dark", DESKTOP, "overview-dark"),
                                           ("dark", PHONE, "overview-phone-dark"),
                                           ("light", PHONE, "overview-phone-light")):
                other = await _open(chromium, dashboard.base + "/", scheme=scheme,
                                    viewport=viewport)
                await other.wait_for_selector(f'tr[data-worker="{name}"]',
                                              timeout=5 * SECONDS)
                await screenshot(other, shot)
                width = await other.evaluate("document.documentElement.scrollWidth")
                assert width <= viewport["width"], f"{shot}: the page scrolls sideways"


async def test_run_page_shows_output_lines_as_they_are_printed(
        dashboard: DashboardProcess, vhost: VHost, tmp_path: Path) -> None:
    async with running_worker(vhost.url) as _, Publisher(vhost.url) as publisher, \
            browser() as chromium:
        run = await publisher.submit(new_run(shlex.join([sys.executable, SPEAKER,
                                                         str(tmp_path)])))
        page = await _open(chromium, f"{dashboard.base}/runs/{run.id}")
        await page.wait_for_selector(f"#output >> text=first line of {run.id}",
                                     timeout=15 * SECONDS)
        # Still running: the second line is not printed before the gate opens.
        assert await page.inner_text("#run-state") in ("submitted", "pending",
                                                       "not recorded yet")
        assert "second line" not in await page.inner_text("#output")
        (tmp_path / f"{run.id}.gate").touch()
        await page.wait_for_selector(f"#output >> text=second line of {run.id}",
                                     timeout=15 * SECONDS)
        await page.wait_for_selector("#run-state >> text=completed", timeout=15 * SECONDS)
        await screenshot(page, "run-output-light")
        # And stored: a fresh page shows both lines from the ledger.
        fresh = await _open(chromium, f"{dashboard.base}/runs/{run.id}", scheme="dark",
                            viewport=PHONE)
        text = await fresh.inner_text("#output")
        assert text.splitlines() == [f"first line of {run.id}", f"second line of {run.id}"]
        await screenshot(fresh, "run-output-phone-dark")


async def test_cancel_button_cancels_a_running_run(
        dashboard: DashboardProcess, vhost: VHost, tmp_path: Path) -> None:
    async with running_worker(vhost.url) as _, Publisher(vhost.url) as publisher, \
            browser() as chromium:
        run = await publisher.submit(new_run(probe(tmp_path, sleep=600), name="to-cancel"))
        await wait_until(lambda: str(run.id) in started_runs(tmp_path))
        pid = started_runs(tmp_path)[str(run.id)]["pid"]
        page = await _open(chromium, f"{dashboard.base}/runs/{run.id}")
        await page.wait_for_selector("#run-state >> text=submitted", timeout=15 * SECONDS)
        await page.click("#cancel button")
        await page.wait_for_selector("#run-state >> text=cancelled", timeout=20 * SECONDS)
        await wait_until(lambda: not psutil.pid_exists(pid)
                         or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
        assert await page.is_hidden("#cancel")
        await screenshot(page, "run-cancelled")
        status, body = dashboard.get(f"/api/runs/{run.id}")
        assert status == 200 and json.loads(body)["state"] == "cancelled"


async def test_a_rejected_run_is_fixed_and_replayed_from_dead_letters(
        dashboard: DashboardProcess, vhost: VHost, tmp_path: Path) -> None:
    async with running_worker(vhost.url) as _, browser() as chromium:
        run_id = str(uuid.uuid4())
        body = {"id": run_id, "job_variables": {"command": probe(tmp_path), "colour": "red"}}
        await publish_raw(vhost.url, body)
        await until_ready(vhost.url, {"mq_worker.dead": 1})
        page = await _open(chromium, dashboard.base + "/dead")
        letter = page.locator("article.letter", has_text=run_id)
        assert "undeclared job variable" in await letter.locator(".reason").inner_text()
        await screenshot(page, "dead-letters")
        edited = json.loads(await letter.locator("textarea").input_value())
        del edited["job_variables"]["colour"]
        await letter.locator("textarea").fill(json.dumps(edited, indent=2))
        await letter.locator("button[value=replay]").click()
        await page.wait_for_selector(".notice >> text=1 replayed", timeout=15 * SECONDS)
        await wait_until(lambda: run_id in started_runs(tmp_path))
        # Not held unacknowledged either: the dashboard closed the connection it took the
        # letter on (which gives back what it did not acknowledge) before showing the notice.
        await until_ready(vhost.url, {"mq_worker.dead": 0})
        assert run_id in await page.inner_text("#actions")
        await page.goto(f"{dashboard.base}/runs/{run_id}")
        await page.wait_for_selector("#run-state >> text=completed", timeout=15 * SECONDS)


async def test_runs_filter_by_state(dashboard: DashboardProcess, vhost: VHost,
                                    tmp_path: Path) -> None:
    async with running_worker(vhost.url) as _, Publisher(vhost.url) as publisher, \
            browser() as chromium:
        good = await publisher.submit(new_run(probe(tmp_path), name="good"))
        bad = await publisher.submit(new_run(probe(tmp_path, exit_code=4), name="bad"))
        await wait_until(lambda: all(
            json.loads(dashboard.get(f"/api/runs/{r.id}")[1]).get("state") in
            ("completed", "crashed") for r in (good, bad)))
        page = await _open(chromium, dashboard.base + "/runs")
        await page.wait_for_selector(f'#runs tr[data-run="{good.id}"]', timeout=5 * SECONDS)
        await page.check("input[name=state][value=crashed]")
        await page.click(".filters button[type=submit]")
        await page.wait_for_url("**/runs?*state=crashed*")
        ids = await page.eval_on_selector_all("#runs tbody tr[data-run]",
                                              "rows => rows.map(r => r.dataset.run)")
        assert ids == [str(bad.id)]
        await screenshot(page, "runs-filtered")



async def test_submit_form_runs_a_command_and_shows_its_page(
        dashboard: DashboardProcess, vhost: VHost, tmp_path: Path) -> None:
    async with running_worker(vhost.url) as _, browser() as chromium:
        page = await _open(chromium, dashboard.base + "/submit", viewport=PHONE)
        await page.fill("input[name=name]", "tried-from-the-form")
        await page.fill("input[name=command]", probe(tmp_path))
        await page.fill("textarea[name=job_variables]", '{"env": {"TIER": "form"}}')
        await screenshot(page, "submit-phone-light")
        await page.click("#submit-form button[type=submit]")
        await page.wait_for_url("**/runs/*?message=submitted")
        run_id = page.url.split("/runs/")[1].split("?")[0]
        await page.wait_for_selector("#run-state >> text=completed", timeout=15 * SECONDS)
        assert started_runs(tmp_path)[run_id]["env"]["TIER"] == "form"
        await page.reload()
        assert "tried-from-the-form" in await page.inner_text(".facts")
        assert '"TIER": "form"' in await page.inner_text("#configuration")
