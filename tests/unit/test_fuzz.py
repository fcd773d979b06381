"""Property-based fuzzing of everything a message reaches before a run starts.

Random and malformed bodies, headers and job variables go through message
parsing, signature verification and job configuration. The only exception
allowed out is InvalidMessage (a clean rejection): anything else would make a
worker give the message back again and again instead of dead-lettering it.
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mq_worker.errors import InvalidMessage
from mq_worker.job_configuration import BaseJobTemplate, RunContext
from mq_worker.messages import RunMessage, parse_cancel, parse_run
from mq_worker.signing import SIGNATURE_V2_HEADER, Signer
from mq_worker.workers.process import ProcessJobConfiguration, ProcessWorker, executable_path
from tests.helpers import worker_settings

FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Any character, lone surrogates included.
any_text = st.text(st.characters(exclude_categories=()), max_size=40)
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | any_text
           | st.integers(min_value=-(10**60), max_value=10**60))
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(any_text, children, max_size=4),
    max_leaves=12,
)
uuids = st.uuids().map(str) | any_text
offsets = st.integers(min_value=-1439, max_value=1439).map(
    lambda m: f"{'+' if m >= 0 else '-'}{abs(m) // 60:02d}:{abs(m) % 60:02d}")
times = st.builds(lambda d, o: d.isoformat() + o, st.datetimes(), offsets | st.just(""))
times |= st.sampled_from([
    "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59", "2026-11-28T02:00:00Z",
    "2026-02-30T00:00:00Z", "not a time", "",
]) | st.integers() | st.floats()
JOB_VARIABLE_NAMES = ["command", "env", "labels", "name", "working_dir", "stream_output",
                      "grace_seconds"]
job_variable_values = st.dictionaries(
    st.sampled_from(JOB_VARIABLE_NAMES) | any_text,
    json_values | st.dictionaries(any_text, any_text | st.none(), max_size=4),
    max_size=5,
)
run_fields = st.fixed_dictionaries({}, optional={
    "id": uuids,
    "name": json_values,
    "flow": st.fixed_dictionaries({}, optional={"id": json_values, "name": json_values})
    | json_values,
    "deployment": st.fixed_dictionaries({}, optional={
        "id": json_values, "name": json_values, "job_variables": job_variable_values,
    }) | json_values,
    "job_variables": job_variable_values | json_values,
    "parameters": json_values,
    "tags": st.lists(any_text, max_size=300) | json_values,
    "scheduled_start_time": times,
    "schema_version": json_values,
    "reason": json_values,
})


def _dumps(value: Any) -> bytes:
    """JSON as a careless publisher might write it: NaN, Infinity and lone surrogates included."""
    return json.dumps(value, allow_nan=True).encode()


bodies = (
    st.binary(max_size=200)
    | run_fields.map(_dumps)
    | json_values.map(_dumps)
    | st.tuples(run_fields.map(_dumps), st.integers(0, 300), st.binary(max_size=4)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1]:])
)

TEMPLATES = [
    BaseJobTemplate.from_dict(ProcessWorker.get_default_base_job_template()),
    BaseJobTemplate.from_dict({
        "job_configuration": {
            "command": "/opt/flows/etl --day {{ day }} --n={{ n }}",
            "env": {"DAY": "{{ day }}", "N": "{{ n }}", "FIXED": "x"},
            "working_dir": "{{ dir }}",
            "grace_seconds": "{{ grace }}",
            "labels": {"day": "{{ day }}"},
        },
        "variables": {"type": "object", "properties": {
            "day": {"type": "string", "pattern": "^[0-9-]+$"},
            "n": {},
            "dir": {"type": ["string", "null"]},
            "grace": {"type": "number", "default": 5},
        }},
    }),
]
CONTEXT = RunContext(pool="p", queue="q", worker="w", base_env={"PATH": "/usr/bin:/bin"})


def _serializable(run: RunMessage) -> None:
    """What workers put in events must serialize."""
    orjson.dumps({"name": run.name, "tags": run.tags, "flow": run.flow and run.flow.model_dump(),
                  "deployment": run.deployment and run.deployment.model_dump(
                      exclude={"job_variables"}),
                  "scheduled_start_time": run.scheduled_start_time},
                 option=orjson.OPT_UTC_Z)
    assert run.scheduled_start_time is None or run.scheduled_start_time.utcoffset() is not None


@FUZZ
@given(body=bodies, max_bytes=st.sampled_from([64, 1024, 1024 * 1024]))
def test_parsing_random_bodies_either_succeeds_or_rejects_cleanly(
    body: bytes, max_bytes: int
) -> None:
    for parse in (parse_run, parse_cancel):
        try:
            message = parse(body, max_bytes=max_bytes)
        except InvalidMessage as exc:
            assert exc.reason and "\n" not in exc.reason
            continue
        assert len(body) <= max_bytes
        if isinstance(message, RunMessage):
            _serializable(message)


@FUZZ
@given(start=times)
def test_random_start_times_are_utc_or_rejected_cleanly(start: Any) -> None:
    try:
        run = parse_run(_dumps({"id": str(uuid.uuid4()), "scheduled_start_time": start}))
    except InvalidMessage:
        return
    assert run.scheduled_start_time is not None
    assert run.scheduled_start_time.utcoffset() == timedelta(0)
    assert isinstance(run.scheduled_start_time.timestamp(), float)  # what workers compare


@FUZZ
@given(fields=run_fields, template=st.sampled_from(TEMPLATES))
def test_job_configuration_of_random_runs_either_prepares_or_rejects_cleanly(
    fields: dict[str, Any], template: BaseJobTemplate
) -> None:
    fields["id"] = str(uuid.uuid4())
    try:
        run = parse_run(_dumps(fields))
        configuration = ProcessJobConfiguration.from_template_and_values(
            template, run.merged_job_variables())
        configuration.prepare_for_run(run, CONTEXT)
        argv = configuration.argv()
    except InvalidMessage as exc:
        assert exc.reason
        return
    assert argv and all("\x00" not in a for a in argv)
    assert all(isinstance(v, str) and "\x00" not in v for v in configuration.env.values())
    assert configuration.env["MQ_WORKER_RUN_ID"] == fields["id"]
    assert 0 <= configuration.grace_seconds <= 3600


@FUZZ
@given(values=job_variable_values, template=st.sampled_from(TEMPLATES))
def test_random_job_variables_resolve_render_and_split_or_reject_cleanly(
    values: dict[str, Any], template: BaseJobTemplate
) -> None:
    try:
        resolved = template.resolve_variables(values)
        rendered = template.render(values)
        configuration = ProcessJobConfiguration.from_template_and_values(template, values)
        configuration.argv()
    except InvalidMessage:
        return
    assert set(resolved) <= template.names
    assert isinstance(rendered, dict)


@pytest.fixture(scope="module")
def allow_listed(tmp_path_factory: pytest.TempPathFactory) -> ProcessWorker:
    prefix = tmp_path_factory.mktemp("flows")
    entry = prefix / "etl"
    entry.write_text("#!/bin/sh\n")
    entry.chmod(0o755)
    return ProcessWorker(worker_settings("amqp://guest:guest@127.0.0.1/",
                                         allow_command_prefix=[str(prefix)]))


# Commands and directories made of the pieces that path tricks are made of.
path_pieces = st.sampled_from(["/", "..", ".", "etl", "sh", "bin", "/bin/", "flows", "~", " ",
                               "'", '"', "\\", "$HOME", ";", "\x00", "//", "\n"])
paths = st.lists(path_pieces | any_text, max_size=8).map("".join)


@FUZZ
@given(command=paths, working_dir=st.none() | paths, search=st.none() | paths)
def test_allow_list_check_of_random_commands_allows_only_the_prefix_or_rejects_cleanly(
    allow_listed: ProcessWorker, command: str, working_dir: str | None, search: str | None
) -> None:
    prefix = allow_listed.settings.allow_command_prefix[0]
    values: dict[str, Any] = {"command": command, "working_dir": working_dir}
    if search is not None:
        values["env"] = {"PATH": search}
    run = parse_run(_dumps({"id": str(uuid.uuid4())}))
    try:
        configuration = ProcessJobConfiguration.from_template_and_values(
            allow_listed.template, values)
        configuration.prepare_for_run(run, CONTEXT)
        allow_listed.check_configuration(configuration)
    except InvalidMessage:
        return
    assert working_dir is None or "\x00" not in working_dir
    executable = executable_path(configuration.argv()[0], configuration.env,
                                 configuration.working_dir or str(Path.cwd()))
    assert executable is not None
    assert executable.startswith(str(Path(prefix).resolve()) + "/")


signature_values = (
    st.none() | st.integers() | st.floats() | st.booleans() | any_text | st.binary(max_size=80)
    | st.lists(any_text, max_size=3) | st.dictionaries(any_text, any_text, max_size=3)
    | any_text.map(lambda s: "t=1,sha256=" + s)
    | st.binary(max_size=70).map(lambda b: b"t=1,sha256=" + b)
    | st.binary(max_size=70).map(lambda b: bytearray(b"t=1,sha256=" + b))
)
KEYS = [b"k" * 16, b"another key of 32 bytes, rotated"]
ISSUED = 1_764_450_000


def _v2(signer: Signer, body: bytes) -> str:
    return signer.headers(body, kind="run", pool="p", issued_at=ISSUED)[SIGNATURE_V2_HEADER]


@FUZZ
@given(body=st.binary(max_size=300), value=signature_values,
       extra=st.dictionaries(any_text, json_values, max_size=3), present=st.booleans())
def test_signature_check_of_random_headers_accepts_only_a_valid_signature(
    body: bytes, value: Any, extra: dict[str, Any], present: bool
) -> None:
    signer = Signer(KEYS)
    headers = {k: v for k, v in extra.items() if k != SIGNATURE_V2_HEADER}
    if present:
        headers[SIGNATURE_V2_HEADER] = value
    text = value.decode(errors="replace") if isinstance(value, bytes | bytearray) else value
    genuine = present and isinstance(text, str) and text in {
        _v2(Signer([k]), body) for k in KEYS}
    try:
        signer.verify(body, headers, kind="run", pool="p", now=ISSUED)
    except InvalidMessage as exc:
        assert exc.reason.startswith(("unsigned message", "forged message"))
        assert not genuine
        return
    assert genuine


@FUZZ
@given(body=st.binary(max_size=300), flip=st.integers(min_value=0))
def test_any_change_to_a_signed_body_or_signature_is_refused(body: bytes, flip: int) -> None:
    signer = Signer(KEYS)
    signature = _v2(signer, body)

    def verify(value: Any, raw: bytes = body, kind: Any = "run", pool: str = "p") -> None:
        signer.verify(raw, {SIGNATURE_V2_HEADER: value}, kind=kind, pool=pool, now=ISSUED)

    verify(signature)
    verify(signature.encode())
    verify(bytearray(signature.encode()))  # AMQP byte array
    Signer(KEYS[::-1]).verify(body, {SIGNATURE_V2_HEADER: signature}, kind="run", pool="p",
                              now=ISSUED)  # rotation: any key verifies
    for kind, pool in (("cancel", "p"), ("run", "q")):  # bound to the kind and the pool
        with pytest.raises(InvalidMessage, match="forged"):
            verify(signature, kind=kind, pool=pool)
    with pytest.raises(InvalidMessage, match="forged"):  # and to the issued-at time
        verify(signature.replace(f"t={ISSUED}", f"t={ISSUED + 1}"))
    assume(body)
    index = flip % len(body)
    tampered = body[:index] + bytes([body[index] ^ 1]) + body[index + 1:]
    with pytest.raises(InvalidMessage, match="forged"):
        verify(signature, raw=tampered)
    digits = signature.split("sha256=")[1]
    position = flip % len(digits)
    other = "0" if digits[position] != "0" else "1"
    forged = f"t={ISSUED},sha256=" + digits[:position] + other + digits[position + 1:]
    with pytest.raises(InvalidMessage, match="forged"):
        verify(forged)


def test_nan_and_infinite_job_variables_are_rejected_not_run() -> None:
    template = TEMPLATES[0]
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(InvalidMessage, match="grace_seconds"):
            ProcessJobConfiguration.from_template_and_values(
                template, {"command": "true", "grace_seconds": value})
