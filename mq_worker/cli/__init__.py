"""The `mq-worker` command line: one module per command, each registered here in one line.

A command or group from another module registers the same way:

    from mq_worker.cli.ledger import ledger
    main.add_command(ledger)

Shared helpers (failing with a clean message, running the event loop quietly, client
settings from the environment, colours, durations) are in `mq_worker.cli.common`.
"""

from __future__ import annotations

import click

from mq_worker.cli.common import (
    URL_HELP,
    client_settings,
    fail,
    first_leaf,
    parse_duration,
    run,
    validation_message,
)
from mq_worker.cli.events import format_event
from mq_worker.cli.submit import exit_code, parse_time

# The names these helpers had when the command line was one module.
_URL_HELP = URL_HELP
_fail = fail
_run = run
_client_settings = client_settings
_validation_message = validation_message
_first_leaf = first_leaf
_exit_code = exit_code

__all__ = ["format_event", "main", "parse_duration", "parse_time"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mq-worker")
def main() -> None:
    """A worker that runs jobs pushed over RabbitMQ as local processes.

    The commands that talk to the broker read MQ_WORKER_URL (and the TLS variables);
    `mq-worker COMMAND --help` tells what else. NO_COLOR turns colours off.
    """


def _register() -> None:
    from mq_worker.cli.cancel import cancel
    from mq_worker.cli.events import events
    from mq_worker.cli.schema import schema
    from mq_worker.cli.start import start
    from mq_worker.cli.status import status
    from mq_worker.cli.submit import submit

    for command in (start, submit, cancel, events, status, schema):
        main.add_command(command)
    from mq_worker.ledger import commands as ledger_commands

    ledger_commands.register(main)
    from mq_worker.dashboard.commands import dashboard

    main.add_command(dashboard)
    from mq_worker import pool_cli

    pool_cli.register(main)  # limit, pause, resume


_register()
