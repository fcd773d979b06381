"""`mq-worker events`: tail lifecycle events; the one-line format the other commands share."""

from __future__ import annotations

import contextlib
import sys
from uuid import UUID

import click

from mq_worker import logs
from mq_worker.cli.common import (
    URL_HELP,
    client_settings,
    color_option,
    color_wanted,
    quiet_client_logging,
    run,
)
from mq_worker.events import Event, EventType
from mq_worker.topology import EVENT_TYPE_PREFIX as _PREFIX
from mq_worker.topology import PING

_COLORS = {
    "pending": "blue", "submitted": "cyan", "completed": "green", "crashed": "red",
    "cancelled": "yellow", "rejected": "magenta", "lost": "red", "retrying": "yellow",
}
_DETAILS = ("status_code", "reason", "message", "infrastructure_pid", "late_by_seconds",
            "next_start_time", "free_slots", "in_flight")


def format_event(event: Event, *, color: bool = False) -> str:
    """One readable line for an event."""
    short = event.type.removeprefix(_PREFIX)
    kind = short.rsplit(".", 1)[-1]
    label = f"{short:<17}"
    if color:
        label = click.style(label, fg=_COLORS.get(kind), bold=True)
    when = event.time.astimezone().strftime("%H:%M:%S.%f")[:-3]
    data = event.data
    parts = [when, label, event.subject or "-"]
    if data.get("run_name"):
        parts.append(f"name={data['run_name']}")
    if short.startswith("run."):
        parts.append(f"worker={data.get('worker')}")
        if data.get("attempt", 1) != 1 or kind == "retrying":
            parts.append(f"attempt={data.get('attempt')}")
    for key in _DETAILS:
        value = data.get(key)
        if value not in (None, [], ""):
            if key == "in_flight":
                value = len(value)
            parts.append(f"{key}={value}")
    return "  ".join(str(p) for p in parts)


def event_type_pattern(text: str) -> str:
    """A full routing-key pattern from a short or full event type ('run.completed',
    'mq_worker.run.completed', 'run.*'); click.BadParameter for an unknown type."""
    full = text if text.startswith(_PREFIX) or text == "#" else _PREFIX + text
    if "*" in full or "#" in full or full in set(EventType):
        return full
    known = ", ".join(t.removeprefix(_PREFIX) for t in EventType)
    raise click.BadParameter(f"unknown event type {text!r}; known: {known} (or a pattern "
                             "such as run.*)", param_hint="'--type'")


@click.command()
@click.option("--url", "urls", multiple=True, help=URL_HELP)
@click.option("--run", "run_id", type=click.UUID, help="Only this run's events.")
@click.option("--type", "types", multiple=True,
              help="Only these event types: run.completed, worker.*, ... (the mq_worker. "
                   "prefix is optional); repeatable.")
@click.option("--json", "as_json", is_flag=True, help="One CloudEvent JSON per line.")
@color_option
def events(urls: tuple[str, ...], run_id: UUID | None, types: tuple[str, ...],
           as_json: bool, color: bool | None) -> None:
    """Tail lifecycle events as they are published, until interrupted."""
    logs.configure("console", "WARNING")
    quiet_client_logging()
    settings = client_settings(urls)
    patterns = [event_type_pattern(t) for t in types]
    colored = color_wanted(color, sys.stdout)

    async def _tail() -> None:
        from mq_worker.subscriber import EventSubscriber

        async with EventSubscriber(settings.url, tls=settings.tls, types=patterns or None,
                                   run_id=run_id) as subscription:
            async for event in subscription:
                if event.type == PING:  # a request to workers (`status`), not an event
                    continue
                line = event.model_dump_json() if as_json else format_event(event, color=colored)
                click.echo(line)

    with contextlib.suppress(KeyboardInterrupt):
        run(_tail)
