"""``segsort-unsup train``: a SegSort embedding (model.pt) from a segments store."""

from __future__ import annotations

import os

import click

from .options import BackboneChoice, finish, float_list, one_or_several, output_option, overwrite_option, seed_option


@click.command("train")
@click.argument("segments", type=click.Path(exists=True, file_okay=False))
@output_option("Run folder: config.toml, metrics.jsonl, checkpoints/, model.pt (re-running resumes).")
@click.option("--mode", type=click.Choice(["auto", "full", "cached"]), default="auto", show_default=True,
              help="full: the whole network on photo crops; cached: the trunk frozen, its features cached once, "
                   "only the head (or the last --train-blocks blocks) trains (CPU-practical); "
                   "auto: full on CUDA, cached on CPU.")
@click.option("--images", type=click.Path(exists=True, file_okay=False),
              help="Folder of the photos when they moved (looked up as <DIR>/<key>.<ext> or by basename).")
@click.option("--cut", type=float, default=None, help="Stored ucm level to use as the grouping (default: the "
              "store's threshold; others must be among its --levels).")
@click.option("--supervised", "labels_dir", type=click.Path(exists=True), multiple=True,
              help="Class-label PNG folder (or list file): train the supervised counterpart instead. Repeat "
                   "for labels split over folders.")
@click.option("--ignore-label", type=int, default=255, show_default=True, help="Label of unlabelled pixels.")
@click.option("--backbone", type=BackboneChoice(), default="vgg16-hed", show_default=True,
              help="Trunk from the backbone registry (README: Backbones).")
@click.option("--backbone-weights", type=click.Path(exists=True, dir_okay=False),
              help="Local weights for the backbone (e.g. a torchvision vgg16/resnet50 or dino checkpoint).")
@click.option("--feature-layer", default=None,
              help="Trunk layer feeding the head (default: the backbone's first: conv4_3 for the VGG16 trunks).")
@click.option("--freeze-blocks", type=click.IntRange(min=0), default=0, show_default=True,
              help="Trunk blocks kept frozen in full mode.")
@click.option("--train-blocks", type=click.IntRange(min=0), default=None,
              help="Cached mode: the last N trunk blocks train with the head, on maps cached at the input of "
                   "the first (1 at conv4_3: conv4 from pool3's maps). Default: the head only.")
@click.option("--head", type=click.Choice(["conv3", "conv1"]), default="conv3", show_default=True)
@click.option("--steps", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Optimiser steps; 0 writes the untrained initialisation (trunk + seeded random head) as a baseline.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Global batch (split over torchrun processes).")
@click.option("--crop", type=click.IntRange(min=8), default=320, show_default=True, help="Crop side in pixels.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True,
              help="Trunk learning rate (the head trains at 10x).")
@click.option("--feature-scales", callback=float_list(low=0.05, example="0.75,1,1.25"), default="0.75,1,1.25",
              show_default=True, help="Cached mode: image scales whose features are cached.")
@click.option("--no-flip", is_flag=True, help="No horizontal flips.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 on CPUs with AVX512-BF16/AMX and on CUDA GPUs that have it, fp16 (with loss "
                   "scaling) on older GPUs, else fp32.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Data-loading processes (full mode).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch CPU threads (default: all cores).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--keep", type=click.IntRange(min=1), default=3, show_default=True, help="Checkpoints kept.")
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--features-dir", type=click.Path(file_okay=False),
              help="Cached mode: features store (default RUN_DIR/features; reusable by runs with the same trunk).")
@seed_option
@overwrite_option
def train(segments, output, mode, images, cut, labels_dir, ignore_label, backbone, backbone_weights, feature_layer,
          freeze_blocks, train_blocks, head, steps, batch_size, crop, lr, feature_scales, no_flip, precision, device,
          workers, threads, checkpoint_every, keep, log_every, features_dir, seed, overwrite):
    """Train a SegSort embedding on the segments of SEGMENTS (a store written by `segsort-unsup ucm`).

    Under `torchrun --nproc-per-node N` the same command trains with DDP. Ctrl-C or SIGTERM stops at
    the end of the current step with a checkpoint; re-running the same command resumes it.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its thread pool
    from ..embed.backbones import check_feature_layer
    from ..train.stage import TrainConfig, run

    feature_layer = check_feature_layer(backbone, feature_layer)

    config = TrainConfig(mode=mode, images=images, cut=cut, labels_dir=one_or_several(labels_dir), ignore_label=ignore_label,
                         backbone=backbone, backbone_weights=backbone_weights, feature_layer=feature_layer,
                         freeze_blocks=freeze_blocks, train_blocks=train_blocks, head=head, steps=steps,
                         batch_size=batch_size, crop=crop,
                         lr=lr, feature_scales=feature_scales, flip=not no_flip, precision=precision, device=device,
                         workers=workers, threads=threads, checkpoint_every=checkpoint_every, keep=keep,
                         log_every=log_every, features_dir=features_dir, seed=seed)
    finish(run(config, segments, output, overwrite=overwrite))
