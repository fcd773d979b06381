"""`start`'s options, generated from the settings model so that they cannot drift from it.

Every field `x_y` of WorkerSettings is an option `--x-y` whose help is the field's
description, followed by its default and its environment variable `MQ_WORKER_X_Y`. A
list field is repeatable; a Literal is a choice; a bool is `--x/--no-x`. The option has no
click default: what is not given on the command line comes from the environment, then
from the model's default.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import click
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from mq_worker.settings import ENV_PREFIX, WorkerSettings

_CASE_INSENSITIVE = {"log_level"}


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _base(annotation: Any) -> Any:
    """The type inside Annotated[...] and Optional[...]."""
    annotation = _without_none(annotation)
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return _without_none(annotation)


def shown_default(field: FieldInfo) -> str:
    extra = field.json_schema_extra
    if isinstance(extra, dict) and "shown_default" in extra:
        return str(extra["shown_default"])
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if value is PydanticUndefined or value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def help_text(name: str, field: FieldInfo) -> str:
    description = (field.description or "").rstrip()
    repeat = " Repeatable." if typing.get_origin(_base(field.annotation)) is list else ""
    return (f"{description}{repeat}  [default: {shown_default(field)}; "
            f"env: {env_name(name)}]")


def _click_type(name: str, annotation: Any) -> tuple[Any, bool]:
    """(click type, multiple) for a field's type."""
    base = _base(annotation)
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        return _click_type(name, item)[0], True
    if typing.get_origin(base) is Literal:
        return click.Choice([str(a) for a in typing.get_args(base)],
                            case_sensitive=name not in _CASE_INSENSITIVE), False
    if base is Path:
        return click.Path(path_type=Path), False
    if base in (int, float, str, bool):
        return base, False
    return str, False


def settings_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a command with one option per WorkerSettings field, in the model's order."""
    for name, field in reversed(list(WorkerSettings.model_fields.items())):
        click_type, multiple = _click_type(name, field.annotation)
        if click_type is bool:
            flag = name.replace("_", "-")
            function = click.option(f"--{flag}/--no-{flag}", name, default=None,
                                    help=help_text(name, field))(function)
            continue
        function = click.option(option_name(name), name, type=click_type, multiple=multiple,
                                default=None, help=help_text(name, field),
                                metavar=_metavar(name, click_type))(function)
    return function


def _metavar(name: str, click_type: Any) -> str | None:
    if isinstance(click_type, click.Choice):
        return None
    if isinstance(click_type, click.Path):
        return "PATH"
    if click_type is float and (name.endswith(("_seconds", "_timeout", "_grace"))):
        return "SECONDS"
    return {int: "INTEGER", float: "NUMBER"}.get(click_type, "TEXT")


def given(options: dict[str, Any]) -> dict[str, Any]:
    """The options given on the command line (not None, not an empty repeat)."""
    return {k: v for k, v in options.items()
            if k in WorkerSettings.model_fields and v not in (None, ())}
