"""``segsort-unsup embed``: a trained model + images -> segments and prototypes (prototypes store)."""

from __future__ import annotations

import click

from .options import (executor_options, finish, float_list, one_or_several, output_option,
                      overwrite_option, shard_size_option, threads_option)


@click.command("embed")
@click.argument("model", type=click.Path(exists=True))
@click.argument("input", type=str)
@output_option("Prototypes store folder to create or resume.")
@click.option("--labels", type=click.Path(exists=True), multiple=True,
              help="Folder (or list file) of label PNGs (same names as the images): store each segment's "
                   "majority class (the labelled set for `transfer`). Repeat for labels split over folders.")
@click.option("--ignore-label", type=int, default=255, show_default=True,
              help="Label of pixels to drop (with --labels), e.g. 11 for CamVid.")
@click.option("--features", type=click.Choice(["head", "trunk"]), default="head", show_default=True,
              help="head: the model's embeddings; trunk: L2-normalised trunk features (raw-feature baseline).")
@click.option("--scales", callback=float_list(low=0.1, high=4.0, example="0.75,1,1.25"), default="1",
              show_default=True, metavar="S1,S2,...", help="Image scales; every view's segments vote.")
@click.option("--flip", is_flag=True, help="Also the mirrored image of every scale.")
@click.option("--window", type=click.IntRange(min=64), default=480, show_default=True,
              help="Sliding-window side for larger images (multiple of 8).")
@click.option("--window-stride", type=click.IntRange(min=8), default=320, show_default=True)
@click.option("--grid", type=(int, int), default=(5, 5), show_default=True, metavar="ROWS COLS",
              help="Initial k-means cells.")
@click.option("--iterations", type=click.IntRange(min=0), default=10, show_default=True,
              help="k-means iterations.")
@click.option("--units", default=None, metavar="gridN|ucm:T",
              help="Segment units: gridN = pixel sorting from N x N cells (default: --grid, 5 x 5 as released); "
                   "ucm:T = the regions of --segments at its stored cut T, one prototype each.")
@click.option("--segments", type=click.Path(exists=True, file_okay=False), default=None,
              help="Segments store of these images (`segsort-unsup ucm`), for --units ucm:T.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 on CPUs with AMX/AVX512-BF16 and on CUDA, else fp32.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1...")
@threads_option
@executor_options
@shard_size_option
@overwrite_option
def embed(model, input, output, labels, ignore_label, features, scales, flip, window, window_stride, grid,  # noqa: A002
          iterations, units, segments, precision, device, threads, executor, workers, scheduler, shard_size, overwrite):
    """Segments and one prototype per segment for every image.

    MODEL is a model.pt (or a train run folder holding one); INPUT a folder, glob, list file or
    image. A killed run resumes where it stopped.
    """
    from ..embed.stage import EmbedConfig, run
    from ..io.images import excluding_outputs
    from ..parallel import make_executor

    config = EmbedConfig(features=features, scales=scales, flip=flip, window=window, window_stride=window_stride,
                         grid=grid, iterations=iterations, units=units, segments=segments, precision=precision,
                         labels=one_or_several(labels),
                         ignore_label=ignore_label, device=device, threads=threads, shard_size=shard_size)
    with excluding_outputs(output), make_executor(executor, workers=workers, scheduler=scheduler) as pool:
        summary = run(config, [model, input], output, executor=pool, overwrite=overwrite)
    finish(summary)
