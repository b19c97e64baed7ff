"""Options shared by several commands, defined once, and the end-of-command summary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from ..stages import StageSummary

overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace an existing output store instead of resuming it."
)
shard_size_option = click.option(
    "--shard-size", type=click.IntRange(min=1), default=64, show_default=True,
    help="Items per HDF5 shard (a killed run redoes at most this many).",
)
seed_option = click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of every random choice (same seed, same result).",
)


class BackboneChoice(click.Choice):
    """``--backbone``: the backbone registry's names, read when first needed (the registry imports torch)."""

    def __init__(self) -> None:
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        from ..embed.backbones import BACKBONES

        return tuple(BACKBONES)

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns; the registry is the source
        pass


def output_option(help: str) -> Callable:  # noqa: A002 - click's spelling
    """``-o/--output``: one spelling across commands."""
    return click.option("-o", "--output", required=True, type=click.Path(file_okay=True, path_type=Path), help=help)


def executor_options(func: Callable) -> Callable:
    """``--executor``, ``--workers``, ``--scheduler``: where per-image work runs."""
    func = click.option("--scheduler", default=None, metavar="tcp://HOST:8786",
                        help="Dask scheduler address (with --executor dask).")(func)
    func = click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                        help="Worker processes (local) or Dask workers (dask-local).")(func)
    func = click.option("--executor", type=click.Choice(["local", "dask", "dask-local"]), default="local",
                        show_default=True,
                        help="local: this process or --workers processes; dask: a Dask cluster at --scheduler; "
                             "dask-local: a Dask LocalCluster of --workers processes "
                             "(dask needs: pip install 'segsort-unsup[dask]').")(func)
    return func


def float_list(*, low: float | None = None, high: float | None = None, example: str = "0.5,1,1.5",
               allow_empty: bool = False) -> Callable:
    """A click callback parsing ``"0.5,1,1.5"`` -> ``(0.5, 1.0, 1.5)`` with bounds."""

    def parse(ctx: click.Context | None, param: click.Parameter | None, value: str | None) -> tuple[float, ...]:
        if not value:
            if allow_empty:
                return ()
            raise click.BadParameter(f"give one or more comma-separated numbers, e.g. {example}")
        try:
            values = tuple(float(part) for part in value.split(",") if part.strip())
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers (e.g. {example})") from None
        if not values and not allow_empty:
            raise click.BadParameter(f"give one or more comma-separated numbers, e.g. {example}")
        if any((low is not None and v < low) or (high is not None and v > high) or v != v for v in values):
            bounds = f"between {low:g} and {high:g}" if high is not None else f">= {low:g}"
            raise click.BadParameter(f"{value!r}: every value must be {bounds}")
        return values

    return parse


def finish(*summaries: StageSummary) -> None:
    """Print each summary line; exit 1 if any item failed (the rest are saved)."""
    failed = False
    for summary in summaries:
        click.echo(summary.line(), err=True)
        if not summary.ok:
            failed = True
            shown = summary.failed[:5]
            for key, reason in shown:
                click.echo(f"  failed: {key}: {reason}", err=True)
            if len(summary.failed) > len(shown):
                click.echo(f"  ... and {len(summary.failed) - len(shown)} more (see failures.tsv in the output)",
                           err=True)
    if failed:
        raise click.exceptions.Exit(1)
