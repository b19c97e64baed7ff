"""``segsort-unsup run``: the stages of a pipeline TOML file, in order, resuming what exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .options import finish, overwrite_option


def artefacts(pipeline: Any) -> list[tuple[str, Path]]:
    """What a pipeline run leaves to look at, that exists now: galleries, models, pictures, stores."""
    from ..io.store import is_store

    found: list[tuple[str, Path]] = []
    for section in pipeline.sections:
        out = section.output
        if section.stage.name == "discover" and (out / "gallery" / "gallery.html").is_file():
            found.append((f"gallery ({section.name})", out / "gallery" / "gallery.html"))
        if section.stage.name == "train" and (out / "model.pt").is_file():
            found.append((f"model ({section.name})", out / "model.pt"))
        png_dir = getattr(section.config, "png_dir", None)
        if png_dir and Path(png_dir).is_dir():
            found.append((f"pictures ({section.name})", Path(png_dir)))
    order = {"gallery": 0, "model": 1, "pictures": 2}
    found.sort(key=lambda pair: order[pair[0].split(" ")[0]])
    for section in pipeline.sections:
        if is_store(section.output):
            found.append((f"store ({section.name})", section.output))
        elif section.stage.name in ("evaluate", "semantic") and section.output.is_dir():
            found.append((f"results ({section.name})", section.output))
    return found


def print_artefacts(pipeline: Any) -> None:
    """One line per artefact (a gallery as a file:// URL, to click), on stdout."""
    found = artefacts(pipeline)
    if not found:
        return
    click.echo("artefacts:")
    width = max(len(name) for name, _ in found)
    for name, path in found:
        shown = path.resolve().as_uri() if path.suffix == ".html" else str(path)
        click.echo(f"  {name:<{width}}  {shown}")


def _named_inputs(inputs: tuple[str, ...]) -> dict[str, str]:
    named = {}
    for value in inputs:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = "input", value
        if not name or not path:
            raise click.BadParameter(f"{value!r}: give PATH or NAME=PATH", param_hint="--input")
        named[name] = path
    return named


@click.command()
@click.argument("pipeline_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--from", "from_stage", default=None, metavar="STAGE", help="Start at this stage (upstream outputs must exist).")
@click.option("--until", "until_stage", default=None, metavar="STAGE", help="Stop after this stage.")
@click.option("--input", "inputs", multiple=True, metavar="[NAME=]PATH",
              help="Replace the pipeline's input, or its named input NAME (e.g. images=MY/PHOTOS); repeatable.")
@click.option("-o", "--output", default=None, type=click.Path(file_okay=False),
              help="Output folder instead of the file's [pipeline] output.")
@overwrite_option
def run(pipeline_file: Path, from_stage: str | None, until_stage: str | None, inputs: tuple[str, ...],
        output: str | None, overwrite: bool) -> None:
    """Run the stages configured in PIPELINE_FILE in order (see pipelines/*.toml).

    Each stage resumes its store, so running again after a crash continues where it stopped; a
    stage whose settings changed is recomputed with everything after it. --overwrite recomputes all.
    --from/--until take a stage (train) or a section (train.sup). Ends by listing what the run
    left to look at: the gallery, the model, pictures and stores.
    """
    from ..pipeline import load_pipeline, run_pipeline

    named = _named_inputs(inputs)
    pipeline = load_pipeline(pipeline_file, output=output, inputs=named)
    if "input" in named and not any("input" in s.sources for s in pipeline.sections):
        others = sorted(set(pipeline.inputs) - {"input"})
        raise click.BadParameter(f"{pipeline_file} reads no default input; give a named one: "
                                 + (", ".join(f"--input {n}=PATH" for n in others) or "none declared"),
                                 param_hint="--input")
    try:
        summaries = run_pipeline(pipeline, overwrite=overwrite, from_stage=from_stage, until_stage=until_stage)
        finish(*summaries)
    finally:
        print_artefacts(pipeline)
