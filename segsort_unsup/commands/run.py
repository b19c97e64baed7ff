"""``segsort-unsup run``: the stages of a pipeline TOML file, in order, resuming what exists."""

from __future__ import annotations

from pathlib import Path

import click

from .options import finish, overwrite_option


@click.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--from", "from_stage", default=None, metavar="STAGE", help="Start at this stage (upstream outputs must exist).")
@click.option("--until", "until_stage", default=None, metavar="STAGE", help="Stop after this stage.")
@click.option("--input", "inputs", multiple=True, metavar="[NAME=]PATH",
              help="Replace the pipeline's input, or its named input NAME (e.g. scored=data/test); repeatable.")
@click.option("-o", "--output", default=None, type=click.Path(file_okay=False),
              help="Output folder instead of the file's [pipeline] output.")
@overwrite_option
def run(pipeline_file: Path, from_stage: str | None, until_stage: str | None, inputs: tuple[str, ...],
        output: str | None, overwrite: bool) -> None:
    """Run the stages configured in PIPELINE_FILE in order (see pipelines/*.toml).

    Each stage resumes its store, so running again after a crash continues where it stopped; a
    stage whose settings changed is recomputed with everything after it. --overwrite recomputes all.
    --from/--until take a stage (train) or a section (train.sup).
    """
    from ..pipeline import load_pipeline, run_pipeline

    named = {}
    for value in inputs:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = "input", value
        if not name or not path:
            raise click.BadParameter(f"{value!r}: give PATH or NAME=PATH", param_hint="--input")
        named[name] = path
    pipeline = load_pipeline(pipeline_file, output=output, inputs=named)
    summaries = run_pipeline(pipeline, overwrite=overwrite, from_stage=from_stage, until_stage=until_stage)
    finish(*summaries)
