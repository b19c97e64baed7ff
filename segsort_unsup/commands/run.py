"""``segsort-unsup run``: the stages of a pipeline TOML file, in order, resuming what exists."""

from __future__ import annotations

from pathlib import Path

import click

from .options import finish, overwrite_option


@click.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--from", "from_stage", default=None, metavar="STAGE", help="Start at this stage (upstream outputs must exist).")
@click.option("--until", "until_stage", default=None, metavar="STAGE", help="Stop after this stage.")
@overwrite_option
def run(pipeline_file: Path, from_stage: str | None, until_stage: str | None, overwrite: bool) -> None:
    """Run the stages configured in PIPELINE_FILE in order (see pipelines/*.toml).

    Each stage resumes its store, so running again after a crash continues where it stopped; a
    stage whose settings changed is recomputed with everything after it. --overwrite recomputes all.
    """
    from ..pipeline import load_pipeline, run_pipeline

    summaries = run_pipeline(load_pipeline(pipeline_file), overwrite=overwrite, from_stage=from_stage,
                             until_stage=until_stage)
    finish(*summaries)
