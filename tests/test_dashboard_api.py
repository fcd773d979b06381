"""The dashboard's JSON API and its access rules, against a real broker, ledger and workers."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mq_worker import Publisher, new_run
from tests.helpers import (
    VHost,
    probe,
    publish_raw,
    running_worker,
    started_runs,
    wait_until,
)
from tests.helpers.dashboard import DashboardProcess

pytestmark = pytest.mark.anyio
SECRET = "s3cret-token-for-the-dashboard"


@pytest.fixture
def dashboard(vhost: VHost, tmp_path: Path) -> Iterator[DashboardProcess]:
    process = DashboardProcess(vhost.url, f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        process.wait_serving()
        yield process
    finally:
        process.stop()


@pytest.fixture
def guarded(vhost: VHost, tmp_path: Path) -> Iterator[DashboardProcess]:
    """`mq-worker dashboard` (no recording) with an auth file."""
    auth = tmp_path / "dashboard.secret"
    auth.write_text(SECRET + "\n")
    process = DashboardProcess(vhost.url, f"sqlite:///{tmp_path / 'ledger.db'}",
                               "--auth-file", str(auth), command="dashboard")
    try:
        process.wait_serving()
        yield process
    finally:
        process.stop()


def _json(dashboard: DashboardProcess, path: str, **headers: str) -> Any:
    status, body = dashboard.get(path, headers)
    assert status == 200, (status, body[:300])
    return json.loads(body)


def _csrf(dashboard: DashboardProcess, **headers: str) -> str:
    status, page = dashboard.get("/submit", headers)
    assert status == 200
    marker = b'name="csrf-token" content="'
    start = page.index(marker) + len(marker)
    return page[start:page.index(b'"', start)].decode()


def _post(dashboard: DashboardProcess, path: str, body: dict[str, Any],
          **headers: str) -> tuple[int, Any]:
    status, answer = dashboard.post(path, json.dumps(body).encode(),
                                    {"Content-Type": "application/json", **headers})
    try:
        return status, json.loads(answer)
    except ValueError:
        return status, answer.decode(errors="replace")


async def test_each_page_has_its_data_in_json(dashboard: DashboardProcess, vhost: VHost,
                                              tmp_path: Path) -> None:
    name = f"api-{uuid.uuid4().hex[:6]}"
    async with running_worker(vhost.url, name=name, limit=3), \
            Publisher(vhost.url) as publisher:
        good = await publisher.submit(new_run(probe(tmp_path, extra="--say hi"), name="good",
                                              tags=["nightly"]))
        bad = await publisher.submit(new_run(probe(tmp_path, exit_code=5), name="bad"))
        runs = {str(good.id), str(bad.id)}
        await wait_until(lambda: {r["id"] for r in _json(dashboard, "/api/runs")["runs"]
                                  if r["state"] in ("completed", "crashed")} >= runs)

        overview = _json(dashboard, "/api/overview")
        worker = next(w for w in overview["workers"] if w["name"] == name)
        assert worker["state"] == "live" and worker["limit"] == 3 and worker["host"]
        assert worker["version"] and worker["last_seen_age"] is not None
        assert {r["id"] for r in overview["runs"]} >= runs
        assert overview["last_hour"]["outcomes"] == {"completed": 1, "crashed": 1}
        assert overview["last_hour"]["crash_reasons"] == {"exit-code": 1}
        assert overview["last_hour"]["duration_p50"] is not None
        assert len(overview["last_hour"]["per_minute"]) == 60
        queues = {q["name"]: q for q in overview["queues"]}
        assert "mq_worker.default.default" in queues and "mq_worker.dead" in queues

        crashed = _json(dashboard, "/api/runs?state=crashed")["runs"]
        assert [r["id"] for r in crashed] == [str(bad.id)]
        assert [r["id"] for r in _json(dashboard, "/api/runs?tag=nightly")["runs"]] == [
            str(good.id)]
        assert [r["id"] for r in _json(dashboard, f"/api/runs?q={str(bad.id)[:8]}")["runs"]] \
            == [str(bad.id)]
        assert [r["id"] for r in _json(dashboard, "/api/runs?q=goo")["runs"]] == [str(good.id)]
        first = _json(dashboard, "/api/runs?limit=1")
        second = _json(dashboard, f"/api/runs?limit=1&before={first['next']}")
        assert {first["runs"][0]["id"], second["runs"][0]["id"]} == runs
        for cursor in ("None", "yesterday/x", "1e999/x"):
            status, body = dashboard.get(f"/api/runs?before={cursor}")
            assert (status, b"before" in body) == (400, True), (cursor, status, body[:200])
            assert dashboard.get(f"/runs?before={cursor}")[0] == 400

        run = _json(dashboard, f"/api/runs/{good.id}")
        assert [e["type"].rsplit(".", 1)[-1] for e in run["events"]] == [
            "pending", "submitted", "completed"]
        assert run["job_variables"]["command"] == probe(tmp_path, extra="--say hi")
        assert _json(dashboard, "/api/workers")["workers"][0]["name"] == name
        assert _json(dashboard, "/api/dead") == {"messages": []}
        status, _ = dashboard.get(f"/api/runs/{uuid.uuid4()}")
        assert status == 404


async def test_output_of_a_run_in_json(dashboard: DashboardProcess, vhost: VHost,
                                       tmp_path: Path) -> None:
    async with running_worker(vhost.url), Publisher(vhost.url) as publisher:
        command = f"{sys.executable} -c \"print('one'); print('two')\""
        run = await publisher.submit(new_run(command))
        await wait_until(lambda: _json(dashboard, f"/api/runs/{run.id}/output")["lines"])
        lines = _json(dashboard, f"/api/runs/{run.id}/output")["lines"]
        assert lines == [{"stream": "stdout", "text": "one"}, {"stream": "stdout", "text": "two"}]


async def test_no_secret_is_ever_rendered(dashboard: DashboardProcess, vhost: VHost,
                                          tmp_path: Path) -> None:
    secrets = ("hunter2-db", "pw-in-url", "opt-token-value")
    variables = {"command": f"{probe(tmp_path)} --db postgresql://app:pw-in-url@db/x "
                            "--api-token opt-token-value",
                 "env": {"DB_PASSWORD": "hunter2-db", "TIER": "prod"}}
    async with running_worker(vhost.url), Publisher(vhost.url) as publisher:
        run = await publisher.submit(new_run(job_variables=variables))
        await wait_until(lambda: dashboard.get(f"/api/runs/{run.id}")[0] == 200
                         and json.loads(dashboard.get(f"/api/runs/{run.id}")[1])["job_variables"])
        rejected_id = str(uuid.uuid4())
        await publish_raw(vhost.url, {"id": rejected_id, "job_variables": {
            **variables, "unknown": "x"}})
        await wait_until(lambda: _json(dashboard, "/api/dead")["messages"])
        shown = {path: dashboard.get(path)[1].decode() for path in
                 (f"/runs/{run.id}", f"/api/runs/{run.id}", "/dead", "/api/dead",
                  f"/runs/{rejected_id}", "/api/overview")}
    for path, text in shown.items():
        for secret in secrets:
            assert secret not in text, f"{secret} shown on {path}"
    configuration = json.loads(shown[f"/api/runs/{run.id}"])["job_variables"]
    assert configuration["env"] == {"DB_PASSWORD": "****", "TIER": "prod"}
    assert "postgresql://app:****@db/x" in configuration["command"]
    assert "****" in shown["/dead"] and "TIER" in shown["/dead"]


async def test_dead_letters_replayed_and_discarded_through_the_api(
        dashboard: DashboardProcess, vhost: VHost, tmp_path: Path) -> None:
    async with running_worker(vhost.url):
        ids = [str(uuid.uuid4()) for _ in range(3)]
        for run_id in ids:
            await publish_raw(vhost.url, {"id": run_id, "job_variables": {
                "command": probe(tmp_path), "colour": "red"}})
        await publish_raw(vhost.url, b"not json at all")
        await wait_until(lambda: len(_json(dashboard, "/api/dead")["messages"]) == 4)
        letters = {m["run_id"]: m for m in _json(dashboard, "/api/dead")["messages"]}
        assert "undeclared job variable" in letters[ids[0]]["reason"]
        assert letters[None]["routing_key"] == "run.scheduled.default.default"
        token = _csrf(dashboard)

        status, answer = _post(dashboard, "/api/dead/discard",
                               {"keys": [letters[None]["key"]]})
        assert status == 403, answer  # no CSRF token
        status, answer = _post(dashboard, "/api/dead/discard", {"keys": [letters[None]["key"]]},
                               **{"X-CSRF-Token": token})
        assert (status, answer) == (200, {"discard": 1})

        fixed = {"id": ids[0], "job_variables": {"command": probe(tmp_path)}}
        status, answer = _post(dashboard, "/api/dead/replay",
                               {"keys": [letters[ids[0]]["key"]], "body": json.dumps(fixed)},
                               **{"X-CSRF-Token": token})
        assert (status, answer) == (200, {"replay": 1})
        await wait_until(lambda: ids[0] in started_runs(tmp_path))

        # Replayed as it is, in bulk: rejected again, so back among the dead letters.
        status, answer = _post(dashboard, "/api/dead/replay",
                               {"keys": [letters[i]["key"] for i in ids[1:]]},
                               **{"X-CSRF-Token": token})
        assert (status, answer) == (200, {"replay": 2})
        await wait_until(lambda: sorted(m["run_id"] for m in
                                        _json(dashboard, "/api/dead")["messages"])
                         == sorted(ids[1:]))
        assert ids[1] not in started_runs(tmp_path)
        status, page = dashboard.get("/dead")
        assert page.decode().count("<strong>replay</strong>") == 3
        assert page.decode().count("<strong>discard</strong>") == 1


async def test_submit_through_the_api_runs_it(dashboard: DashboardProcess, vhost: VHost,
                                              tmp_path: Path) -> None:
    async with running_worker(vhost.url):
        token = _csrf(dashboard)
        status, answer = _post(dashboard, "/api/submit",
                               {"pool": "default", "queue": "default",
                                "command": probe(tmp_path), "name": "from-the-api",
                                "job_variables": {"env": {"TIER": "test"}}},
                               **{"X-CSRF-Token": token})
        assert status == 200, answer
        await wait_until(lambda: answer["id"] in started_runs(tmp_path))
        assert started_runs(tmp_path)[answer["id"]]["env"]["TIER"] == "test"
        status, answer = _post(dashboard, "/api/submit", {"pool": "no.dots", "command": "x"},
                               **{"X-CSRF-Token": token})
        assert status == 400 and "invalid pool name" in answer["error"]


def test_authentication_and_csrf(guarded: DashboardProcess) -> None:
    status, _ = guarded.get("/")
    assert status == 401
    status, _ = guarded.get("/api/runs", {"Authorization": "Bearer wrong-token-wrong-token"})
    assert status == 401
    assert guarded.get("/api/runs", {"Authorization": f"Bearer {SECRET}"})[0] == 200
    basic = "Basic " + base64.b64encode(f"ops:{SECRET}".encode()).decode()
    assert guarded.get("/", {"Authorization": basic})[0] == 200
    unknown = str(uuid.uuid4())
    # A browser's basic authentication is not enough for an action: the CSRF token is needed.
    status, _ = _post(guarded, f"/api/runs/{unknown}/cancel", {}, Authorization=basic)
    assert status == 403
    token = _csrf(guarded, Authorization=basic)
    status, answer = _post(guarded, f"/api/runs/{unknown}/cancel", {}, Authorization=basic,
                           **{"X-CSRF-Token": token, "Origin": "http://evil.example"})
    assert status == 403
    status, answer = _post(guarded, f"/api/runs/{unknown}/cancel", {}, Authorization=basic,
                           **{"X-CSRF-Token": token})
    assert status == 409 and "not in the ledger" in answer["error"]
    status, answer = _post(guarded, f"/api/runs/{unknown}/cancel", {"pool": "etl"},
                           Authorization=basic, **{"X-CSRF-Token": token})
    assert (status, answer) == (200, {"cancelled": unknown, "pool": "etl"})
    # A script's bearer token is never sent by a browser on its own: no CSRF token needed.
    status, answer = _post(guarded, f"/api/runs/{unknown}/cancel", {},
                           Authorization=f"Bearer {SECRET}")
    assert status == 409
    status, answer = guarded.post(f"/runs/{unknown}/cancel", b"csrf_token=forged",
                                  {"Authorization": basic,
                                   "Content-Type": "application/x-www-form-urlencoded"})
    assert status == 403
    assert SECRET not in guarded.log_path.read_text()


def test_serves_beyond_loopback_only_with_an_auth_file(vhost: VHost, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mq_worker", "dashboard", "--url", vhost.url, "--db",
         f"sqlite:///{tmp_path / 'ledger.db'}", "--http-host", "0.0.0.0", "--http-port", "0"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "only with --auth-file" in result.stderr


async def test_live_view_comes_back_after_the_broker_closed_its_connection(
        dashboard: DashboardProcess, vhost: VHost) -> None:
    await wait_until(lambda: vhost.close_connections("mq_worker dashboard") > 0)
    name = f"back-{uuid.uuid4().hex[:6]}"
    async with running_worker(vhost.url, name=name):
        await wait_until(lambda: any(w["name"] == name and w["state"] == "live" for w in
                                     _json(dashboard, "/api/workers")["workers"]), timeout=20)
    assert dashboard.process.poll() is None


async def test_queue_depths_without_the_management_api(vhost: VHost, tmp_path: Path) -> None:
    dashboard = DashboardProcess(vhost.url, f"sqlite:///{tmp_path / 'ledger.db'}",
                                 "--management-url", "http://127.0.0.1:9/")
    try:
        dashboard.wait_serving()
        async with Publisher(vhost.url) as publisher:  # no worker: the runs wait in the queue
            for _ in range(3):
                await publisher.submit(new_run("true"))
        overview = _json(dashboard, "/api/overview")
        assert overview["queue_source"] == "passive declares"
        queues = {q["name"]: q for q in overview["queues"]}
        assert queues["mq_worker.default.default"]["ready"] == 3
        assert queues["mq_worker.default.default"]["consumers"] == 0
    finally:
        dashboard.stop()


def test_pages_serve_from_the_ledger_while_the_broker_is_away(tmp_path: Path) -> None:
    dashboard = DashboardProcess("amqp://guest:guest@127.0.0.1:9/", f"sqlite:///{tmp_path}/l.db",
                                 "--management-url", "http://127.0.0.1:9/")
    try:
        dashboard.wait_serving()
        assert dashboard.get("/runs")[0] == 200
        assert dashboard.get("/")[0] == 200
        status, page = dashboard.get("/dead")
        assert status == 200 and b"cannot be read now" in page
        status, body = dashboard.get("/api/dead")
        assert status == 503 and "cannot be read now" in json.loads(body)["error"]
        assert dashboard.process.poll() is None
    finally:
        dashboard.stop()
