"""``segsort-unsup ucm``: contour maps -> OWT-UCM segment hierarchies (segments store)."""

from __future__ import annotations

import click

from .options import finish, overwrite_option, shard_size_option, workers_option


def _parse_levels(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...]:
    if not value:
        return ()
    try:
        levels = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as 0.3,0.5,0.7, got {value!r}") from None
    if any(not (v >= 0) for v in levels):
        raise click.BadParameter("levels must be >= 0")
    return levels


@click.command("ucm")
@click.argument("source", type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Segments store folder to create or resume.")
@click.option("--threshold", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Cut stored as `labels` (boundaries weaker than this are removed).")
@click.option("--levels", callback=_parse_levels, default="", metavar="T1,T2,...",
              help="More cuts stored as `labels_levels`, e.g. 0.3,0.5,0.7.")
@click.option("--no-owt", is_flag=True, help="Skip the oriented watershed transform (plain mean boundary strength).")
@workers_option
@shard_size_option
@click.option("--png-dir", type=click.Path(file_okay=False),
              help="Also write ucm PNGs, label PNGs and an overview picture per image here.")
@click.option("--mat-dir", type=click.Path(file_okay=False),
              help="Also write BSDS-compatible .mat files (variable ucm2) here.")
@overwrite_option
def ucm(source, output, threshold, levels, no_owt, workers, shard_size, png_dir, mat_dir, overwrite):
    """Hierarchical segments (OWT-UCM) from contour maps.

    SOURCE is a contours store written by `segsort-unsup contours`, or edge-probability
    images (a folder, glob, list file or one PNG). A killed run resumes where it stopped.
    """
    from ..ucm.stage import UcmConfig, run_ucm

    config = UcmConfig(threshold=threshold, levels=levels, oriented=not no_owt)
    summary = run_ucm(config, source, output, workers=workers, overwrite=overwrite,
                      png_dir=png_dir, mat_dir=mat_dir, shard_size=shard_size)
    finish(summary)
