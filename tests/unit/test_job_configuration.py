"""Base job templates and job variables (no broker needed)."""

from __future__ import annotations

import json
import shlex
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mq_worker.job_configuration
from mq_worker.errors import ConfigurationError, InvalidMessage
from mq_worker.job_configuration import BaseJobTemplate, RunContext, apply_values, placeholders
from mq_worker.messages import RunMessage, parse_run
from mq_worker.workers.base import BaseWorker
from mq_worker.workers.process import ProcessJobConfiguration, ProcessWorker

CONTEXT = RunContext(pool="p", queue="q", worker="w", base_env={"HOME": "/root", "KEEP": "1"})


def default_template() -> BaseJobTemplate:
    return BaseJobTemplate.from_dict(ProcessWorker.get_default_base_job_template())


def test_whole_value_placeholder_keeps_its_type_and_embedded_ones_become_text() -> None:
    template = {"a": "{{ n }}", "b": "x-{{ n }}-{{ s }}", "c": ["{{ flag }}", "{{ none }}"],
                "d": {"e": "{{ obj }}"}, "f": "{{ missing }}"}
    values = {"n": 3, "s": "str", "flag": True, "none": None, "obj": {"k": [1]}}
    assert apply_values(template, values) == {
        "a": 3, "b": "x-3-str", "c": [True], "d": {"e": {"k": [1]}}}
    assert placeholders(template) == {"n", "s", "flag", "none", "obj", "missing"}


def test_default_template_declares_every_process_variable_with_defaults() -> None:
    template = default_template()
    assert template.names == {"command", "env", "labels", "name", "working_dir",
                              "stream_output", "grace_seconds", "timeout_seconds", "retries",
                              "retry_delay_seconds", "retry_jitter_factor", "retry_on"}
    assert template.defaults["stream_output"] is True
    assert template.defaults["grace_seconds"] == 30.0
    assert ProcessWorker.get_default_base_job_template(grace_seconds=7)["variables"][
        "properties"]["grace_seconds"]["default"] == 7


def test_undeclared_and_invalid_variables_are_refused() -> None:
    template = default_template()
    with pytest.raises(InvalidMessage, match="undeclared job variable"):
        template.resolve_variables({"command": "true", "image": "x"})
    with pytest.raises(InvalidMessage, match="grace_seconds"):
        template.resolve_variables({"grace_seconds": -1})
    with pytest.raises(InvalidMessage, match="env"):
        template.resolve_variables({"env": {"A": 1}})


def test_prepare_for_run_merges_env_drops_none_and_sets_labels_and_name() -> None:
    run = RunMessage(id=uuid.uuid4(), name="nightly",
                     flow={"id": "f1", "name": "etl"},  # type: ignore[arg-type]
                     job_variables={"command": "echo hi", "env": {"KEEP": None, "NEW": "2"}})
    config = ProcessJobConfiguration.from_template_and_values(
        default_template(), run.merged_job_variables())
    config.prepare_for_run(run, CONTEXT)
    assert config.env["NEW"] == "2" and config.env["HOME"] == "/root"
    assert "KEEP" not in config.env
    assert config.env["MQ_WORKER_RUN_ID"] == str(run.id)
    assert config.env["MQ_WORKER_POOL"] == "p" and config.env["MQ_WORKER_QUEUE"] == "q"
    assert config.labels["mq_worker.flow-name"] == "etl"
    assert config.name == "nightly"
    assert config.argv() == ["echo", "hi"]


def test_command_is_split_with_shlex_never_a_shell() -> None:
    config = ProcessJobConfiguration(command="printf '%s\\n' 'a b' \"$HOME\" ; rm -rf /")
    assert config.argv() == ["printf", "%s\\n", "a b", "$HOME", ";", "rm", "-rf", "/"]
    with pytest.raises(InvalidMessage, match="cannot be split"):
        ProcessJobConfiguration(command="echo 'unterminated").argv()


# Characters where a shell-like split and a plain one could differ: quotes, escapes,
# whitespace shlex splits at and whitespace it does not, NUL, a comment sign.
_COMMAND_TEXT = st.text(
    alphabet=st.sampled_from(list("ab/-=$#;' \"\\ \t\r\n\x0b\x0c\x00\xa0\u2003é")), max_size=30)


@given(_COMMAND_TEXT)
def test_any_command_is_split_as_shlex_splits_it(command: str) -> None:
    try:
        expected = shlex.split(command)
    except ValueError:
        with pytest.raises(InvalidMessage, match="cannot be split"):
            ProcessJobConfiguration(command=command).argv()
        return
    if not command.strip() or not expected or any("\x00" in arg for arg in expected):
        with pytest.raises(InvalidMessage):
            ProcessJobConfiguration(command=command).argv()
        return
    assert ProcessJobConfiguration(command=command).argv() == expected


def test_a_command_without_quotes_or_escapes_is_split_without_shlex(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    split = shlex.split

    def counted(text: str) -> list[str]:
        calls.append(text)
        return split(text)

    monkeypatch.setattr(mq_worker.job_configuration.shlex, "split", counted)
    config = ProcessJobConfiguration(command=" /usr/bin/probe\t/tmp/run.log  --level=3 \n")
    assert config.argv() == ["/usr/bin/probe", "/tmp/run.log", "--level=3"]
    assert calls == []  # shlex costs ~70 µs for a command like this, on each run's start
    assert ProcessJobConfiguration(command="echo 'a b'").argv() == ["echo", "a b"]
    assert calls == ["echo 'a b'"]


def test_custom_template_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "template.json"
    path.write_text(json.dumps({
        "job_configuration": {"command": "/opt/flows/run {{ flow_name }} --retries {{ retries }}",
                              "env": {"RETRIES": "{{ retries }}"}, "grace_seconds": "{{ grace }}"},
        "variables": {"type": "object", "properties": {
            "flow_name": {"type": "string", "pattern": "^[a-z]+$"},
            "retries": {"type": "integer", "default": 2},
            "grace": {"type": "number", "default": 5}},
            "required": ["flow_name"]},
    }))
    template = BaseJobTemplate.from_file(path)
    config = ProcessJobConfiguration.from_template_and_values(template, {"flow_name": "etl"})
    assert config.command == "/opt/flows/run etl --retries 2"
    assert config.env == {"RETRIES": "2"} and config.grace_seconds == 5
    with pytest.raises(InvalidMessage, match="flow_name"):
        ProcessJobConfiguration.from_template_and_values(template, {"flow_name": "a; rm"})
    with pytest.raises(InvalidMessage, match="required"):
        ProcessJobConfiguration.from_template_and_values(template, {})
    with pytest.raises(InvalidMessage, match="undeclared"):
        ProcessJobConfiguration.from_template_and_values(template, {"command": "sh"})


def test_templates_with_undeclared_placeholders_or_bad_schemas_fail_at_load() -> None:
    with pytest.raises(ConfigurationError, match="undeclared variables: x"):
        BaseJobTemplate({"command": "{{ x }}"}, {"type": "object", "properties": {}})
    with pytest.raises(ConfigurationError, match="not a valid JSON Schema"):
        BaseJobTemplate({}, {"type": 12})
    with pytest.raises(ConfigurationError, match="lacks 'variables'"):
        BaseJobTemplate.from_dict({"job_configuration": {}})


def test_naive_scheduled_start_time_is_utc() -> None:
    run = parse_run(json.dumps({"id": str(uuid.uuid4()),
                                "scheduled_start_time": "2030-01-02T03:04:05"}).encode())
    assert run.scheduled_start_time is not None
    assert run.scheduled_start_time.isoformat() == "2030-01-02T03:04:05+00:00"
    offset = parse_run(json.dumps({"id": str(uuid.uuid4()),
                                   "scheduled_start_time": "2030-01-02T05:04:05+02:00"}).encode())
    assert offset.scheduled_start_time == run.scheduled_start_time


def test_process_worker_is_registered_under_its_entry_point() -> None:
    assert "process" in BaseWorker.get_all_available_worker_types()
    assert BaseWorker.get_worker_class_from_type("process") is ProcessWorker
    assert BaseWorker.get_worker_class_from_type("nope") is None
