"""The `mq-worker` command line: one module per command, each registered here in one line.

A command group from another module registers the same way: `main.add_command(group)`.
"""

from __future__ import annotations

import click

from mq_worker.cli.cancel import cancel
from mq_worker.cli.common import parse_duration
from mq_worker.cli.events import events, format_event
from mq_worker.cli.schema import schema
from mq_worker.cli.start import start
from mq_worker.cli.status import status
from mq_worker.cli.submit import parse_time, submit

__all__ = ["format_event", "main", "parse_duration", "parse_time"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mq-worker")
def main() -> None:
    """A worker that runs jobs pushed over RabbitMQ as local processes."""


main.add_command(start)
main.add_command(submit)
main.add_command(cancel)
main.add_command(events)
main.add_command(status)
main.add_command(schema)
