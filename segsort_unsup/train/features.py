"""The ``features`` stage: the frozen trunk's features of every image of a segments store.

``segsort-unsup features SEGMENTS -o FEATURES`` writes a store of kind ``features`` (schema in
:mod:`segsort_unsup.io.store`): one item per (image, scale, flip), keyed ``<key>@<scale>[f]``,
holding ``features`` float16 (C, h, w), the trunk's stride-8 map of the rescaled (and mirrored)
photo at ``feature_layer``, and ``segments`` int32 (h, w), the image's grouping (the ucm cut,
or the stored level ``cut``) on that grid by nearest neighbour. Attrs: ``image``, ``scale``,
``flip``, ``source``.

It is what ``train`` reads in cached mode: ``train --features-dir DIR`` uses (and completes)
such a store, so several runs with the same trunk (the unsupervised model and its supervised
counterpart) compute the features once. Class labels are not stored: supervised runs map them
to each grid as they read a map. Like every store it resumes where a killed run stopped; an
image added to the segments store adds its maps, other settings or segments recompute the store.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from ..config import PRECISIONS, SEED_MAX, StageConfig, run_only, setting
from ..errors import InputError, SegsortError
from ..io.atomic import sha256_file
from ..io.store import Item, StoreReader
from ..log import get_logger, progress
from ..parallel import Executor, check_stop
from ..stages import Stage, StageRun, StageSummary

if TYPE_CHECKING:  # .data imports torch: `segsort-unsup --help` lists this stage without it
    from .data import Sample

log = get_logger("features")

def backbone_names() -> tuple[str, ...]:
    """The backbone registry's names (read when first needed: the registry imports torch)."""
    from ..embed.backbones import BACKBONES

    return tuple(BACKBONES)


@dataclass(frozen=True)
class FeaturesConfig(StageConfig):
    """Settings of the features stage (see the module doc)."""

    stage = "features"

    backbone: str = setting("vgg16-hed", help="Trunk from the backbone registry (as train's).",
                            choices=backbone_names)
    backbone_weights: str | None = setting(None, help="Local weights for the trunk.")
    feature_layer: str = setting("conv4_3", help="Trunk layer feeding the head (conv4_3 or conv5_3 for the VGG16 "
                                                 "trunks; other backbones: see the backbone registry).")
    cache_layer: str | None = setting(None, help="Store the maps at this trunk layer instead (train --train-blocks "
                                                 "N reads the input of its first trained block, e.g. pool3).")
    feature_scales: tuple[float, ...] = setting((0.75, 1.0, 1.25), help="Image scales whose features are stored.",
                                                low=0.05)
    flip: bool = setting(True, help="Also the mirrored maps (--no-flip: none).")
    cut: float | None = setting(None, help="Stored ucm level to use as the grouping (default: the store's "
                                           "threshold).")
    precision: str = setting("auto", help="auto: bf16 where the CPU or GPU has it, else fp32 (it must match "
                                          "train's).", choices=PRECISIONS)
    seed: int = setting(0, help="Seed of a randomly initialised trunk (backbone scratch; as train's seed).",
                        low=0, high=SEED_MAX)
    images: str | None = run_only(None, help="Folder of the photos when they moved (looked up as <DIR>/<key>.<ext> "
                                             "or by basename).")
    device: str = run_only("auto", help="auto, cpu, cuda or cuda:N.")
    threads: int | None = run_only(None, help="Torch CPU threads (default: all cores).", low=1)

    def validate(self) -> None:
        from ..embed.backbones import check_feature_layer

        try:
            check_feature_layer(self.backbone, self.feature_layer)
        except InputError as exc:
            raise self.bad_value("feature_layer", str(exc)) from None
        if not self.feature_scales or not all(math.isfinite(s) and s > 0 for s in self.feature_scales):
            raise self.bad_value("feature_scales", "give one or more positive, finite scales")
        if self.precision not in PRECISIONS:
            raise self.bad_value("precision", f"choose one of {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class FeatureJob:
    """One (image, scale, flip) feature map to compute."""

    key: str
    sample: Sample
    scale: float
    flip: bool


def feature_key(key: str, scale: float, flip: bool) -> str:
    """The store key of an image's map at ``scale`` (``f``: mirrored)."""
    return f"{key}@{scale:g}{'f' if flip else ''}"


def feature_jobs(samples: list[Sample], scales: tuple[float, ...], *, flip: bool) -> list[FeatureJob]:
    """Every (image, scale, flip) map of ``samples``."""
    flips = (False, True) if flip else (False,)
    return [FeatureJob(feature_key(s.key, sc, f), s, sc, f) for s in samples for sc in scales for f in flips]


def compute_features(model: Any, job: FeatureJob, *, grouping: tuple[str, int | None], device: Any,
                     precision: str) -> Item:
    """The frozen trunk's features of one rescaled (flipped) image and its grouping on that grid."""
    import torch

    from ..runtime import autocast
    from ..embed.losses import segments_to_grid
    from .data import load_sample

    rgb, seg, _ = load_sample(replace(job.sample, label=None), grouping=grouping)
    h, w = seg.shape
    nh, nw = max(1, round(h * job.scale)), max(1, round(w * job.scale))
    img = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nh, nw) != (h, w) else rgb
    if job.flip:
        img, seg = img[:, ::-1], seg[:, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()[None].to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(device, precision):
        feats = model.features(x)
    feats = feats.float()[0].to(torch.float16).cpu().contiguous().numpy()
    grid = feats.shape[1:]
    arrays = {"features": feats,
              "segments": segments_to_grid(torch.from_numpy(np.ascontiguousarray(seg))[None], grid)[0].numpy()}
    return Item(job.key, arrays, {"image": job.sample.key, "scale": float(job.scale), "flip": bool(job.flip),
                                  "source": job.sample.image})


def feature_identity(config: FeaturesConfig, *, precision: str, segments_identity: str) -> dict[str, Any]:
    """What a features store is: trunk, its weights, layer, views, grouping, precision, segments."""
    return {"stage": "features", "backbone": config.backbone, "feature_layer": config.feature_layer,
            "feature_scales": list(config.feature_scales), "flip": config.flip, "cut": config.cut,
            "precision": precision, "segments_identity": segments_identity,
            "backbone_weights_sha256": sha256_file(config.backbone_weights) if config.backbone_weights else "",
            **({"seed": config.seed} if config.backbone == "scratch" else {}),
            **({"cache_layer": config.cache_layer} if config.cache_layer else {})}


def run(config: FeaturesConfig, inputs: str | os.PathLike, output: str | os.PathLike, *,
        executor: Executor | None = None, overwrite: bool | str = False) -> StageSummary:
    """Compute the features store ``output`` of the segments store ``inputs`` (resumes)."""
    import torch

    from ..runtime import resolve_device, resolve_precision
    from .data import list_samples

    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    samples, dropped = list_samples(inputs, images=config.images)
    for key, reason in dropped:
        log.warning("features: %s: %s: skipped", key, reason)
    summary = compute(config, samples, Path(inputs), Path(output), device=device, precision=precision,
                      overwrite=overwrite)
    summary.failed[:0] = dropped
    return summary


def compute(config: FeaturesConfig, samples: list[Sample], segments: Path, store: Path, *, device: Any,
            precision: str, overwrite: bool | str = "changed") -> StageSummary:
    """The maps of ``samples`` not yet in ``store`` (``precision`` resolved); a bad image is skipped
    with one line, any other error surfaces."""
    from .data import grouping_names

    with StoreReader(segments, kind="segments") as reader:
        grouping = grouping_names(reader, config.cut)
        identity = feature_identity(config, precision=precision, segments_identity=reader.config_hash)
    jobs = feature_jobs(samples, config.feature_scales, flip=config.flip)
    # small shards: each map costs about a second on a CPU, and a killed pass keeps all but the last few
    with StageRun("features", store, kind="features", identity=identity, overwrite=overwrite, shard_size=4) as run:
        todo = run.todo(jobs)
        if todo:
            trunk = _trunk(config, device, precision)
            bad: set[str] = set()
            for job in progress(todo, desc="features", unit="map"):
                check_stop()
                if job.sample.key in bad:
                    continue
                try:
                    run.add(compute_features(trunk, job, grouping=grouping, device=device, precision=precision))
                except (SegsortError, OSError) as exc:  # a bad image is skipped; a bug surfaces
                    bad.add(job.sample.key)
                    run.fail(job.key, exc)
    return run.summary


def _trunk(config: FeaturesConfig, device: Any, precision: str):
    """The network whose ``features`` are stored, frozen, in eval mode, laid out for ``precision``."""
    import torch

    from ..embed.model import build_model
    from ..runtime import cpu_fusion_dtype

    with torch.random.fork_rng(devices=[]):  # a random trunk is train's (same seed, drawn first)
        torch.manual_seed(config.seed)
        model = build_model({"backbone": config.backbone, "feature_layer": config.feature_layer},
                            backbone_weights=config.backbone_weights).to(device)
    model.freeze_backbone()
    if precision != "fp32":
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    fused_dtype = cpu_fusion_dtype(precision)
    if device.type == "cpu" and fused_dtype is not None:  # as the embed stage: fp16 is not fused
        model.backbone.fuse_for_cpu(fused_dtype)
    return model.from_layer(config.cache_layer) if config.cache_layer else model


STAGE = Stage("features", FeaturesConfig, run, sources=("ucm",), output="features",
              input_paths=("backbone_weights", "images"), optional=True, arguments=("segments",), executor=False,
              help="frozen-trunk features of every image (what cached-mode train reads)")
