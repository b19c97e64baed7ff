"""``segsort-unsup features``: the frozen trunk's features of a segments store's images (cached-mode train's input)."""

from __future__ import annotations

import os

import click

from .options import BackboneChoice, finish, float_list, output_option, overwrite_option


@click.command("features")
@click.argument("segments", type=click.Path(exists=True, file_okay=False))
@output_option("Features store (pass it to `train --features-dir`; re-running resumes).")
@click.option("--images", type=click.Path(exists=True, file_okay=False),
              help="Folder of the photos when they moved (looked up as <DIR>/<key>.<ext> or by basename).")
@click.option("--cut", type=float, default=None, help="Stored ucm level to use as the grouping (default: the "
              "store's threshold).")
@click.option("--backbone", type=BackboneChoice(), default="vgg16-hed", show_default=True,
              help="Trunk from the backbone registry (as train's).")
@click.option("--backbone-weights", type=click.Path(exists=True, dir_okay=False), help="Local weights for the trunk.")
@click.option("--feature-layer", default=None,
              help="Trunk layer feeding the head (default: the backbone's first: conv4_3 for the VGG16 trunks).")
@click.option("--cache-layer", default=None,
              help="Store the maps at this trunk layer instead (train --train-blocks N reads the input of its "
                   "first trained block, e.g. pool3).")
@click.option("--feature-scales", callback=float_list(low=0.05, example="0.75,1,1.25"), default="0.75,1,1.25",
              show_default=True, help="Image scales whose features are stored.")
@click.option("--no-flip", is_flag=True, help="No mirrored maps.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 where the CPU or GPU has it, else fp32 (it must match train's).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch CPU threads (default: all cores).")
@overwrite_option
def features(segments, output, images, cut, backbone, backbone_weights, feature_layer, cache_layer, feature_scales,
             no_flip, precision, device, threads, overwrite):
    """Compute the trunk features of every image of SEGMENTS at each scale and flip.

    `train --mode cached` computes them itself when needed; running this first lets several
    training runs share one store (`--features-dir`).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool
    from ..embed.backbones import check_feature_layer
    from ..train.features import FeaturesConfig, run

    config = FeaturesConfig(images=images, cut=cut, backbone=backbone, backbone_weights=backbone_weights,
                            feature_layer=check_feature_layer(backbone, feature_layer), cache_layer=cache_layer,
                            feature_scales=feature_scales, flip=not no_flip,
                            precision=precision, device=device, threads=threads)
    finish(run(config, segments, output, overwrite=overwrite))
