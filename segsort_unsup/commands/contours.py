"""``segsort-unsup contours``: edge-probability maps for a folder of images."""

from __future__ import annotations

import click

from ..contours.registry import DEFAULT_MODEL, MODELS
from ..io.images import DEFAULT_MAX_PIXELS
from .options import (executor_options, finish, float_list, output_option,
                      overwrite_option, shard_size_option, threads_option)

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


def _tile_side(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    if value == "auto":
        return None
    try:
        side = int(value)
    except ValueError:
        side = 0
    if side < 320:
        raise click.BadParameter(f"{value!r}: give auto or a side in pixels >= 320, e.g. 1024")
    return side


@click.command()
@click.argument("inputs", metavar="INPUT")
@output_option("Contours store (a folder) to write or resume.")
@click.option("--model", type=click.Choice(list(MODELS)), default=DEFAULT_MODEL, show_default=True,
              help="Contour model (see `segsort-unsup weights list`).")
@click.option("--weights", "weights_path", type=click.Path(dir_okay=False),
              help="Weights file to use instead of the cached one of --model (any supported format).")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default="auto", show_default=True,
              help="auto: bf16 on CPUs with AMX/AVX512-BF16 and on CUDA, else fp32.")
@click.option("--scales", default="1", show_default=True, callback=float_list(low=0.05, high=8.0),
              help="Comma-separated image scales whose edge maps are averaged, e.g. 0.5,1,1.5.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Same-size images per forward pass (default: 1 on CPU, where batches only add memory "
                   "traffic; 8 on CUDA).")
@click.option("--max-side", type=click.IntRange(min=320), default=2048, show_default=True,
              help="Images with a longer side are processed in overlapping tiles; smaller ones run whole.")
@click.option("--tile-side", default="auto", show_default=True, callback=_tile_side, metavar="auto|SIDE",
              help="Side of those tiles (at most --max-side). auto: the largest whose forward pass needs at most "
                   "512 MiB for the model and precision (smaller tiles: less memory, a little more compute).")
@click.option("--no-tile", is_flag=True, help="Refuse images above --max-side instead of tiling them.")
@click.option("--max-pixels", type=click.IntRange(min=0), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Refuse images with more pixels (after --resize-to), read from the header before decoding; "
                   "0: no limit. Memory needed: about 1 GiB + 8 bytes per pixel of the largest tiled image.")
@click.option("--resize-to", type=click.IntRange(min=32), default=None, metavar="SIDE",
              help="Scale images whose longer side is above SIDE down to SIDE (maps are stored at that size).")
@threads_option
@click.option("--png-dir", type=click.Path(file_okay=False),
              help="Also write 8-bit edge PNGs here (<key>.png).")
@click.option("--nms-png", is_flag=True, help="With --png-dir: also write NMS-thinned edges (nms/<key>.png).")
@executor_options
@overwrite_option
@shard_size_option
def contours(inputs, output, model, weights_path, precision, scales, device, batch_size, max_side, tile_side, no_tile,
             max_pixels, resize_to, threads, png_dir, nms_png, executor, workers, scheduler, overwrite, shard_size):
    """Edge probability + orientation for every image in INPUT (folder, glob, list file or image).

    Resumable: re-running skips images already in OUTPUT. Bad images are reported and skipped;
    the exit code is 1 if any image failed.
    """
    from ..contours.stage import ContoursConfig, run
    from ..io.images import excluding_outputs
    from ..parallel import make_executor

    if nms_png and png_dir is None:
        raise click.UsageError("--nms-png needs --png-dir")
    config = ContoursConfig(model=model, precision=precision, scales=scales, device=device, batch_size=batch_size,
                            max_side=max_side, tile_side=tile_side, tile=not no_tile, max_pixels=max_pixels,
                            resize_to=resize_to, threads=threads, shard_size=shard_size,
                            weights=weights_path, png_dir=png_dir, nms_png=nms_png)
    with excluding_outputs(output, png_dir), make_executor(executor, workers=workers, scheduler=scheduler) as pool:
        summary = run(config, inputs, output, executor=pool, overwrite=overwrite)
    finish(summary)
