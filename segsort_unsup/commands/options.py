"""Options shared by several commands, defined once."""

from __future__ import annotations

import click

from ..stage import StageSummary

overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace an existing output store instead of resuming it."
)
workers_option = click.option(
    "--workers", type=click.IntRange(min=1), default=1, show_default=True,
    help="Worker processes for per-image work.",
)
shard_size_option = click.option(
    "--shard-size", type=click.IntRange(min=1), default=64, show_default=True,
    help="Items per HDF5 shard (a killed run redoes at most this many).",
)


def finish(summary: StageSummary) -> None:
    """Print the summary line; exit 1 if any item failed (the rest are saved)."""
    click.echo(summary.line(), err=True)
    if not summary.ok:
        shown = summary.failed[:5]
        for key, reason in shown:
            click.echo(f"  failed: {key}: {reason}", err=True)
        if len(summary.failed) > len(shown):
            click.echo(f"  ... and {len(summary.failed) - len(shown)} more (see failures.tsv in the output)", err=True)
        raise click.exceptions.Exit(1)
