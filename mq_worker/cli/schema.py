"""`mq-worker schema`: the JSON Schemas and the AsyncAPI document of the wire contract."""

from __future__ import annotations

import json

import click

from mq_worker.cli.common import fail


@click.command()
@click.argument("name", required=False)
@click.option("--asyncapi", "as_asyncapi", is_flag=True,
              help="Print the whole AsyncAPI 3.0 document (YAML).")
@click.option("--list", "as_list", is_flag=True, help="List the schema names.")
def schema(name: str | None, as_asyncapi: bool, as_list: bool) -> None:
    """Print the JSON Schemas of the wire messages (all, or NAME: run, cancel, event, or an
    event type such as run.completed)."""
    from mq_worker import schema as contract

    if as_asyncapi:
        click.echo(contract.asyncapi_yaml(), nl=False)
    elif as_list:
        click.echo("\n".join(contract.schema_names()))
    elif name is None:
        click.echo(json.dumps(contract.json_schemas(), indent=2))
    else:
        try:
            click.echo(json.dumps(contract.json_schema(name), indent=2))
        except KeyError:
            fail(f"no schema named {name!r}; known: {', '.join(contract.schema_names())}", 2)
