"""``segsort-unsup run``: the stages of a pipeline TOML file, in order, resuming what exists."""

from __future__ import annotations

from pathlib import Path

import click

from .options import overwrite_option


@click.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False, path_type=Path))
@overwrite_option
def run(pipeline_file: Path, overwrite: bool) -> None:
    """Run contours -> ucm (-> evaluate) as configured in PIPELINE_FILE (see pipelines/*.toml).

    Each stage resumes its store, so running again after a crash continues where it stopped.
    """
    from ..pipeline import load_pipeline, run_pipeline

    summaries = run_pipeline(load_pipeline(pipeline_file), overwrite=overwrite)
    failed = False
    for summary in summaries:
        click.echo(summary.line(), err=True)
        failed |= not summary.ok
    if failed:
        raise click.exceptions.Exit(1)
