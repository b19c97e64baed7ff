"""``segsort-unsup ucm``: contour maps -> OWT-UCM segment hierarchies (segments store)."""

from __future__ import annotations

import click

from .options import executor_options, finish, float_list, output_option, overwrite_option, shard_size_option


@click.command("ucm")
@click.argument("source", type=click.Path(exists=True))
@output_option("Segments store folder to create or resume.")
@click.option("--threshold", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Cut stored as `labels` (boundaries weaker than this are removed).")
@click.option("--levels", callback=float_list(low=0.0, example="0.3,0.5,0.7", allow_empty=True), default="",
              metavar="T1,T2,...", help="More cuts stored as `labels_levels`, e.g. 0.3,0.5,0.7.")
@click.option("--no-owt", is_flag=True, help="Skip the oriented watershed transform (plain mean boundary strength).")
@click.option("--ucm2-dtype", type=click.Choice(["float32", "uint16"]), default=None,
              help="Stored ucm2 type; default float32, uint16-quantised (65535 steps of the largest altitude) "
                   "above 16.8 Mpx. The tree and labels are exact either way.")
@executor_options
@shard_size_option
@click.option("--png-dir", type=click.Path(file_okay=False),
              help="Also write ucm PNGs, label PNGs and an overview picture per image here.")
@click.option("--mat-dir", type=click.Path(file_okay=False),
              help="Also write BSDS-compatible .mat files (variable ucm2) here.")
@overwrite_option
def ucm(source, output, threshold, levels, no_owt, ucm2_dtype, executor, workers, scheduler, shard_size, png_dir,
        mat_dir, overwrite):
    """Hierarchical segments (OWT-UCM) from contour maps.

    SOURCE is a contours store written by `segsort-unsup contours`, or edge-probability
    images (a folder, glob, list file or one PNG). A killed run resumes where it stopped.
    """
    from ..io.images import excluding_outputs
    from ..parallel import make_executor
    from ..ucm.stage import UcmConfig, run

    config = UcmConfig(threshold=threshold, levels=levels, oriented=not no_owt, ucm2_dtype=ucm2_dtype,
                       shard_size=shard_size,
                       png_dir=png_dir, mat_dir=mat_dir)
    with excluding_outputs(output, png_dir, mat_dir), \
            make_executor(executor, workers=workers, scheduler=scheduler) as pool:
        summary = run(config, source, output, executor=pool, overwrite=overwrite)
    finish(summary)
