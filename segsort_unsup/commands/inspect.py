"""``segsort-unsup inspect``: what a store, run folder or model file holds."""

from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON (for scripts).")
def inspect(path: str, as_json: bool) -> None:
    """Kind, producer, config, items complete and failed (with reasons), datasets, disk size; last metrics of a run."""
    from ..inspect import describe, format_description

    info = describe(path)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        click.echo("\n".join(format_description(info)))
