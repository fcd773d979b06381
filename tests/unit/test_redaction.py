"""Secrets in job variables are masked before they leave a worker or reach a page (no broker)."""

from __future__ import annotations

from typing import Any

import pytest

from mq_worker.redaction import MASK, mask_text, masked_job_variables


@pytest.mark.parametrize(("text", "shown"), [
    ("psql postgresql://app:pw@db:5432/x", "psql postgresql://app:****@db:5432/x"),
    ("redis://:p%40ss@cache:6379/0", "redis://:****@cache:6379/0"),
    ("AMQPS://u:p@rabbit/", "AMQPS://u:****@rabbit/"),
    ("etl --password=hunter2 --day 1", "etl --password=**** --day 1"),
    ("etl --api-key abc123 --day 1", "etl --api-key **** --day 1"),
    ("etl -token=t0k", "etl -token=****"),
    ("etl --day 2026-11-28 https://example.com/x", "etl --day 2026-11-28 https://example.com/x"),
])
def test_text_masks_url_passwords_and_secret_options(text: str, shown: str) -> None:
    assert mask_text(text) == shown


def test_job_variables_mask_secret_names_everywhere_and_keep_the_rest() -> None:
    variables: dict[str, Any] = {
        "command": "sync --db-password=s3 https://u:pw@h/",
        "env": {"DB_PASSWORD": "s1", "api_token": "s2", "AWS_SECRET_ACCESS_KEY": "s4",
                "TIER": "prod", "UNSET_TOKEN": None, "EMPTY_SECRET": ""},
        "labels": {"owner": "ops"},
        "grace_seconds": 30,
        "nested": [{"private_key": "s5"}],
    }
    shown = masked_job_variables(variables)
    assert shown == {
        "command": "sync --db-password=**** https://u:****@h/",
        "env": {"DB_PASSWORD": MASK, "api_token": MASK, "AWS_SECRET_ACCESS_KEY": MASK,
                "TIER": "prod", "UNSET_TOKEN": None, "EMPTY_SECRET": ""},
        "labels": {"owner": "ops"},
        "grace_seconds": 30,
        "nested": [{"private_key": MASK}],
    }
    assert variables["env"]["DB_PASSWORD"] == "s1"  # the worker's own copy is untouched


def test_defaults_masked_once_then_merged_show_what_the_merged_variables_masked_show() -> None:
    # The life of a run masks the template's defaults once and each run's variables on
    # their own: a key's mask depends on that key and its value alone.
    defaults: dict[str, Any] = {"command": None, "env": {"API_TOKEN": "d1", "TIER": "dev"},
                                "grace_seconds": 30.0, "stream_output": True, "labels": {}}
    run: dict[str, Any] = {"command": "etl --token=t1", "env": {"TIER": "prod"},
                           "db_password": "s1", "stream_output": False}
    merged_then_masked = masked_job_variables({**defaults, **run})
    assert {**masked_job_variables(defaults), **masked_job_variables(run)} == merged_then_masked
    assert list(merged_then_masked) == list({**masked_job_variables(defaults),
                                             **masked_job_variables(run)})
    assert merged_then_masked["db_password"] == MASK
    assert merged_then_masked["command"] == "etl --token=****"


@pytest.mark.parametrize("value", [None, True, 0, 3, 2.5, "", "plain", [1, "a", None], {"k": 1}])
def test_values_without_secrets_are_shown_as_they_are(value: Any) -> None:
    assert masked_job_variables({"x": value}) == {"x": value}
