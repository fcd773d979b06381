"""Job configuration: a base job template plus job variables, prepared for one run.

A base job template has two parts, as in a polling worker's work pool:

* `job_configuration`: the configuration with `{{ variable }}` placeholders;
* `variables`: a JSON Schema object declaring every variable, with defaults.

A run's job variables are checked against `variables` (an undeclared variable
or a value the schema refuses rejects the run), merged over the defaults and
substituted into `job_configuration`. A placeholder that is a whole value keeps
the value's type; a placeholder inside a string is replaced by the value's text.
"""

from __future__ import annotations

import json
import re
import shlex
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import jsonschema
import jsonschema.exceptions
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mq_worker.errors import ConfigurationError, InvalidMessage
from mq_worker.messages import RunMessage

# Runs of one deployment share their job variables: their rendering is kept, bounded.
_RENDER_CACHE_SIZE = 256
_RENDER_CACHE_MAX_KEY = 4096
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Missing:
    """Marks a whole-value placeholder without a value: its key is left out."""


_MISSING = _Missing()


def placeholders(template: Any) -> set[str]:
    """Every variable name used by a placeholder anywhere in `template`."""
    if isinstance(template, str):
        return set(_PLACEHOLDER.findall(template))
    if isinstance(template, dict):
        return set().union(*(placeholders(v) for v in template.values()))
    if isinstance(template, list):
        return set().union(*(placeholders(v) for v in template))
    return set()


def apply_values(template: Any, values: Mapping[str, Any]) -> Any:
    """Substitute `values` into `template` (see the module docstring)."""
    if isinstance(template, str):
        whole = _PLACEHOLDER.fullmatch(template.strip())
        if whole:
            value = values.get(whole.group(1))
            return _MISSING if value is None else value
        return _PLACEHOLDER.sub(lambda m: _as_text(values.get(m.group(1))), template)
    if isinstance(template, dict):
        rendered = {k: apply_values(v, values) for k, v in template.items()}
        return {k: v for k, v in rendered.items() if v is not _MISSING}
    if isinstance(template, list):
        return [v for v in (apply_values(i, values) for i in template) if v is not _MISSING]
    return template


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value)


class BaseJobTemplate:
    """A validated base job template."""

    def __init__(self, job_configuration: dict[str, Any], variables: dict[str, Any]) -> None:
        if not isinstance(job_configuration, dict) or not isinstance(variables, dict):
            raise ConfigurationError(
                "a base job template needs 'job_configuration' and 'variables' objects"
            )
        try:
            jsonschema.Draft202012Validator.check_schema(variables)
        except jsonschema.exceptions.SchemaError as exc:
            raise ConfigurationError(
                f"'variables' is not a valid JSON Schema: {exc.message}"
            ) from None
        properties = variables.get("properties", {})
        undeclared = placeholders(job_configuration) - set(properties)
        if undeclared:
            raise ConfigurationError(
                "job_configuration uses undeclared variables: " + ", ".join(sorted(undeclared))
            )
        self.job_configuration = job_configuration
        self.variables = variables
        self.names = frozenset(properties)
        self.defaults = {k: v["default"] for k, v in properties.items() if "default" in v}
        self._validator = jsonschema.Draft202012Validator(variables)
        self._rendered: OrderedDict[bytes, dict[str, Any]] = OrderedDict()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        try:
            return cls(data["job_configuration"], data["variables"])
        except KeyError as exc:
            raise ConfigurationError(f"base job template lacks {exc.args[0]!r}") from None

    @classmethod
    def from_file(cls, path: Path) -> Self:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"cannot read base job template {path}: {exc}") from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return {"job_configuration": self.job_configuration, "variables": self.variables}

    def resolve_variables(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The template's defaults with `values` on top; raise InvalidMessage when refused."""
        undeclared = set(values) - self.names
        if undeclared:
            raise InvalidMessage(
                "undeclared job variable(s): " + ", ".join(sorted(undeclared)[:10])
            )
        resolved = {**self.defaults, **values}
        error = jsonschema.exceptions.best_match(self._validator.iter_errors(resolved))
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path) or "job variables"
            raise InvalidMessage(f"job variable {where}: {error.message[:300]}")
        return resolved

    def render(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """`job_configuration` with `values` substituted; raise InvalidMessage when refused."""
        rendered = apply_values(self.job_configuration, self.resolve_variables(values))
        assert isinstance(rendered, dict)
        return rendered

    def _render_shared(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """As `render`, but possibly the cached result itself: the caller must not change it."""
        try:
            key = orjson.dumps(values, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            key = b""
        if len(key) > _RENDER_CACHE_MAX_KEY:
            key = b""
        cached = self._rendered.get(key) if key else None
        if cached is not None:
            self._rendered.move_to_end(key)
            return cached
        rendered = self.render(values)
        if key:
            self._rendered[key] = rendered
            if len(self._rendered) > _RENDER_CACHE_SIZE:
                self._rendered.popitem(last=False)
        return rendered


class RunContext(BaseModel):
    """What a worker knows about a run beyond its message."""

    model_config = ConfigDict(frozen=True)

    pool: str
    queue: str
    worker: str
    base_env: dict[str, str] = Field(default_factory=dict)


class BaseJobConfiguration(BaseModel):
    """Configuration shared by every worker type; subclasses add their infrastructure's fields."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    command: str | None = Field(default=None, description="The command to run, split with shlex.")
    env: dict[str, str | None] = Field(
        default_factory=dict,
        title="Environment Variables",
        description="Environment variables for the run; null removes one.",
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Labels for the run's infrastructure and events."
    )
    name: str | None = Field(default=None, description="Name given to the infrastructure.")

    # Fields that are not variables in the default template.
    template_exclude: ClassVar[frozenset[str]] = frozenset()

    @field_validator("env", mode="before")
    @classmethod
    def _scalars_as_text(cls, env: Any) -> Any:
        """Numbers and booleans (from typed placeholders) become their JSON text."""
        if isinstance(env, dict):
            return {k: json.dumps(v) if isinstance(v, bool | int | float) else v
                    for k, v in env.items()}
        return env

    @field_validator("env")
    @classmethod
    def _valid_env(cls, env: dict[str, str | None]) -> dict[str, str | None]:
        for key, value in env.items():
            if not _ENV_NAME.fullmatch(key):
                raise ValueError(f"invalid environment variable name {key!r}")
            if value is not None and "\x00" in value:
                raise ValueError(f"environment variable {key} contains a NUL byte")
        return env

    @field_validator("command")
    @classmethod
    def _blank_is_none(cls, command: str | None) -> str | None:
        return command if command and command.strip() else None

    @classmethod
    def json_template(cls) -> dict[str, str]:
        """`{field: "{{ field }}"}` for every field: the default `job_configuration`."""
        return {
            name: "{{ " + name + " }}"
            for name in cls.model_fields
            if name not in cls.template_exclude
        }

    @classmethod
    def from_template_and_values(
        cls, template: BaseJobTemplate, values: Mapping[str, Any]
    ) -> Self:
        """Render `template` with `values` and validate the result; InvalidMessage if refused."""
        rendered = template._render_shared(values)  # validation copies what it keeps
        try:
            return cls.model_validate(rendered)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise InvalidMessage(f"job configuration {where}: {first['msg']}") from None

    def prepare_for_run(self, run: RunMessage, context: RunContext) -> None:
        """Fill in what depends on the run: environment, labels, name."""
        run_env = {
            "MQ_WORKER_RUN_ID": run.id_text,
            "MQ_WORKER_RUN_NAME": run.display_name,
            "MQ_WORKER_RUN_ATTEMPT": str(run.attempt),
            "MQ_WORKER_POOL": context.pool,
            "MQ_WORKER_QUEUE": context.queue,
            "MQ_WORKER_WORKER": context.worker,
            "TRACEPARENT": run.traceparent,
        }
        env: dict[str, str | None] = {**context.base_env, **self.env, **run_env}
        self.env = {k: v for k, v in env.items() if v is not None}
        labels = {"mq_worker.run-id": run.id_text, "mq_worker.run-name": run.display_name}
        if run.flow:
            labels.update(_labels("flow", run.flow.id, run.flow.name))
        if run.deployment:
            labels.update(_labels("deployment", run.deployment.id, run.deployment.name))
        self.labels = {**labels, **self.labels}
        self.name = self.name or run.display_name

    def argv(self) -> list[str]:
        """The command split into arguments, never through a shell."""
        if self.command is None:
            raise InvalidMessage("the job has no command")
        try:
            argv = _split(self.command)
        except ValueError as exc:
            raise InvalidMessage(f"command cannot be split: {exc}") from None
        if not argv:
            raise InvalidMessage("the job has no command")
        if any("\x00" in arg for arg in argv):
            raise InvalidMessage("command contains a NUL byte")
        return argv


# Without quotes or escapes, shlex.split splits at these four characters and nowhere else;
# it costs ~10 µs for /bin/true and ~70 µs for a command with two paths, on each run's start.
_SHLEX_SPECIAL = re.compile(r"['\"\\]")
_SHLEX_WHITESPACE = re.compile(r"[ \t\r\n]+")


def _split(command: str) -> list[str]:
    if _SHLEX_SPECIAL.search(command):
        return shlex.split(command)
    return [arg for arg in _SHLEX_WHITESPACE.split(command) if arg]


def _labels(kind: str, id_: str | None, name: str | None) -> dict[str, str]:
    labels = {}
    if id_:
        labels[f"mq_worker.{kind}-id"] = id_
    if name:
        labels[f"mq_worker.{kind}-name"] = name
    return labels


def variables_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema of `model` as a template's `variables`: without titles."""
    schema = model.model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    return schema
