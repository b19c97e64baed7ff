"""The embed stage: a trained model + images -> a prototypes store (segments and one prototype each).

Per image (as the reference's ``pyscripts/inference/extract_prototypes.py`` and
``inference_segsort_msc.py``):

1. **Embeddings at full resolution.** The network runs on the image (or, when a side exceeds
   ``window``, on ``window``-sized windows whose ends are spread evenly with at most
   ``window_stride`` between them, as the reference); each window's stride-8 embedding is
   upsampled bilinearly x8 (half-pixel centres), cropped to the window and re-normalised;
   overlapping windows are summed and normalised again. Images smaller than a window are not padded
   (the reference pads to 512 x 512 with zeros; padding would change the borders' embeddings).
2. **Pixel sorting at full resolution**, as the reference's inference does (it resizes the
   embedding to the input size before k-means): :func:`~segsort_unsup.embed.sorting.pixel_sort`,
   spherical k-means on ``[embedding, (y/H, x/W)]``, ``grid`` initial cells, ``iterations``.
3. **Prototypes**: the normalised mean embedding of each segment. With ``labels`` (a folder of
   label PNGs, the labelled set), ignore-label pixels are dropped before k-means (segment id -1),
   each segment takes its majority class and its pixels of other classes are left out of its
   prototype (the reference's ``extract_trained_prototypes``).

Views: with several ``scales`` and/or ``flip``, each view (image resized by a scale, optionally
mirrored) is embedded, its embedding brought back to the image's size and orientation
(bilinear, re-normalised), and sorted on its own; all views' prototypes are kept. ``segments``
is the first view's map and ``views`` (V x H x W) every view's map with store-wide ids, so
:mod:`~segsort_unsup.embed.transfer` sums each pixel's kNN votes over views (the reference sums
votes over scales and flips). The reference sorts each view at the view's resolution; here every
view is sorted at the image's resolution, so all views share the pixel grid.

``features="trunk"`` skips the head: the L2-normalised trunk features (``conv4_3`` or dilated
``conv5_3``, as the model's ``feature_layer``) are the embedding (the raw-feature baseline).

Store contract (``kind="prototypes"``; schema in :mod:`segsort_unsup.io.store`), per image key:
``prototypes`` (K, D) float32 unit rows; ``segments`` (H, W) int32 ids 0..K0-1 (-1: dropped
ignore-label pixels); ``area`` (K,) int64 pixels per segment; ``bbox`` (K, 4) int32 ``y0, x0,
y1, x1`` (exclusive); with labels ``label`` (K,) int32; with several views ``views`` (V, H, W)
int32. Attrs: ``source``, ``height``, ``width``, ``views``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import StageConfig, run_only
from ..errors import BadImageError, InputError
from ..io.images import list_images, read_image
from ..io.sources import FileSources
from ..io.store import Item
from ..log import get_logger
from ..parallel import Executor, InProcess, inference_threads, use_torch_threads
from ..stages import Stage, StageRun, StageSummary

log = get_logger("embed")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FEATURES = ("head", "trunk")
MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class EmbedConfig(StageConfig):
    """Settings of the embed stage (see the module doc).

    features : ``head`` (the model's embeddings) or ``trunk`` (normalised trunk features).
    scales, flip : views whose segments all enter the store (votes are summed over them).
    window, window_stride : sliding windows for images with a side above ``window``.
    grid, iterations, location_weight : pixel sorting (5 x 5, 10, 1 in the reference).
    labels : folder of label PNGs (the labelled set); ``ignore_label`` pixels are dropped.
    sort_stride : 1 (the reference) sorts every pixel; s > 1 runs the k-means on the embedding
        average-pooled s x s (a cell is used when all its pixels are valid), then gives every
        full-resolution pixel the cluster of largest cosine (one more E-step): s^2 times less
        k-means work, for wide features (``trunk``: 512 dims) on CPU.
    """

    stage = "embed"

    features: str = "head"
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    window: int = 480
    window_stride: int = 320
    grid: tuple[int, ...] = (5, 5)
    iterations: int = 10
    location_weight: float = 1.0
    sort_stride: int = 1
    precision: str = "auto"
    labels: str | None = None
    ignore_label: int = 255
    device: str = run_only("auto")
    threads: int | None = run_only(None)
    shard_size: int = run_only(64)

    def validate(self) -> None:
        if self.features not in FEATURES:
            raise self.bad_value("features", f"choose one of {', '.join(FEATURES)}")
        if self.precision not in PRECISIONS:
            raise self.bad_value("precision", f"choose one of {', '.join(PRECISIONS)}")
        if not self.scales or any(not (0.1 <= s <= 4.0) for s in self.scales):
            raise self.bad_value("scales", "give one or more scale factors between 0.1 and 4, e.g. [0.75, 1.0, 1.25]")
        if self.window < 64 or self.window % 8:
            raise self.bad_value("window", "must be a multiple of 8, at least 64 (e.g. 480)")
        if not 8 <= self.window_stride <= self.window:
            raise self.bad_value("window_stride", f"must be in 8..window ({self.window})")
        if len(self.grid) != 2 or any(g < 1 for g in self.grid):
            raise self.bad_value("grid", "two positive integers (rows, columns), e.g. [5, 5]")
        if self.iterations < 0:
            raise self.bad_value("iterations", "must be >= 0")
        if self.sort_stride < 1:
            raise self.bad_value("sort_stride", "must be >= 1")
        if not self.location_weight >= 0:
            raise self.bad_value("location_weight", "must be >= 0")
        for key in ("threads", "shard_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise self.bad_value(key, "must be >= 1")

    @property
    def views(self) -> list[tuple[float, bool]]:
        """(scale, mirrored) of every view, in store order."""
        return [(s, f) for f in ((False, True) if self.flip else (False,)) for s in self.scales]


# --------------------------------------------------------------------------------------------
# Embedding and prototypes (plain functions: arrays in, arrays out)
# --------------------------------------------------------------------------------------------
def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``min(window, length)`` covering ``0..length``: the ends are
    spread evenly from ``window`` to ``length`` with gaps of at most ``stride`` (the reference's
    ``np.linspace`` of patch ends)."""
    if length <= window:
        return [0]
    n = math.ceil((length - window) / stride) + 1
    ends = np.linspace(window, length, n).round().astype(int)
    return [int(e) - window for e in ends]


def embed_image(model, rgb: np.ndarray, *, features: str = "head", window: int = 480, window_stride: int = 320,
                precision: str = "fp32", device: Any = "cpu"):
    """Unit-norm pixel embeddings of one image at full resolution.

    Parameters
    ----------
    model : SegSortNet
    rgb : (H, W, 3) uint8 or float array, RGB 0..255.
    features : ``head`` or ``trunk`` (normalised trunk features, skipping the head).
    precision : ``fp32``, ``bf16`` or ``fp16`` (autocast; channels_last on CPU).

    Returns
    -------
    (D, H, W) float32 torch tensor, unit norm per pixel.
    """
    import torch
    import torch.nn.functional as F

    from ..runtime import autocast

    if features not in FEATURES:
        raise InputError(f"features {features!r}: choose one of {', '.join(FEATURES)}")
    h, w = rgb.shape[:2]
    dev = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None].to(dev)
    lowp = precision in ("bf16", "fp16")
    if lowp and dev.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    total = None
    for y0 in window_starts(h, window, window_stride):
        for x0 in window_starts(w, window, window_stride):
            crop = x[:, :, y0:y0 + window, x0:x0 + window]
            ch, cw = crop.shape[-2:]
            with torch.no_grad(), autocast(dev, precision):
                out = model(crop) if features == "head" else model.features(crop)
            out = F.normalize(out.float(), dim=1)
            out = F.interpolate(out, scale_factor=8, mode="bilinear", align_corners=False)[:, :, :ch, :cw]
            out = F.normalize(out, dim=1)
            if ch == h and cw == w:
                return out[0]
            if total is None:
                total = out.new_zeros(1, out.shape[1], h, w)
            total[:, :, y0:y0 + ch, x0:x0 + cw] += out
    return F.normalize(total, dim=1)[0]


def segment_table(embedding, segments: np.ndarray, labels: np.ndarray | None = None
                  ) -> dict[str, np.ndarray]:
    """Prototypes, areas, boxes (and majority classes) of a segment map.

    embedding : (D, H, W) tensor, unit rows. segments : (H, W) ids 0..K-1, -1 = left out.
    labels : (H, W) classes (used where ``segments >= 0``): each segment takes its majority class
    (ties: the lowest class) and its prototype uses only the pixels of that class.
    """
    import torch
    import torch.nn.functional as F

    seg = np.asarray(segments)
    k = int(seg.max()) + 1 if seg.size and seg.max() >= 0 else 0
    d = embedding.shape[0]
    flat = seg.reshape(-1)
    keep = flat >= 0
    ids = flat[keep].astype(np.int64)
    area = np.bincount(ids, minlength=k).astype(np.int64)
    ys, xs = np.divmod(np.flatnonzero(keep), seg.shape[1])
    bbox = np.zeros((k, 4), np.int32)
    if k:
        bbox[:, 0] = np.full(k, seg.shape[0]); bbox[:, 1] = np.full(k, seg.shape[1])  # noqa: E702
        np.minimum.at(bbox[:, 0], ids, ys)
        np.minimum.at(bbox[:, 1], ids, xs)
        np.maximum.at(bbox[:, 2], ids, ys + 1)
        np.maximum.at(bbox[:, 3], ids, xs + 1)
    out: dict[str, np.ndarray] = {"area": area, "bbox": bbox}
    members = ids
    pix = torch.from_numpy(np.flatnonzero(keep))
    if labels is not None:
        lab = np.asarray(labels).reshape(-1)[keep].astype(np.int64)
        n_cls = int(lab.max()) + 1 if lab.size else 1
        counts = np.zeros((k, n_cls), np.int64)
        np.add.at(counts, (ids, lab), 1)
        majority = counts.argmax(axis=1).astype(np.int32)
        own = majority[ids] == lab
        members = ids[own]
        pix = pix[torch.from_numpy(own)]
        out["label"] = majority
    emb = embedding.reshape(d, -1).float()[:, pix].T  # (P, D)
    sums = torch.zeros(k, d, dtype=torch.float32).index_add_(0, torch.from_numpy(members), emb.cpu())
    out["prototypes"] = F.normalize(sums, dim=1).numpy().astype(np.float32)
    return out


def sort_pixels(embedding, *, valid=None, grid: tuple[int, int] = (5, 5), iterations: int = 10,
                location_weight: float = 1.0, stride: int = 1) -> np.ndarray:
    """Pixel sorting of one ``(D, H, W)`` embedding -> ``(H, W)`` int32 segment ids (-1: not valid).

    ``stride=1`` is :func:`~segsort_unsup.embed.sorting.pixel_sort` on every pixel (the
    reference). ``stride=s`` sorts the ``s x s`` average-pooled embedding (cells with an invalid
    pixel left out), then assigns every valid full-resolution pixel to the cluster whose
    normalised mean ``[embedding, location]`` feature has the largest cosine; ids are renumbered
    in raster order of first appearance.
    """
    import torch
    import torch.nn.functional as F

    from .sorting import consecutive_labels, location_features, pixel_sort

    d, h, w = embedding.shape
    if stride == 1 or min(h, w) < 2 * stride:
        return pixel_sort(embedding[None], valid=valid, grid=grid, iterations=iterations,
                          location_weight=location_weight)[0].cpu().numpy().astype(np.int32)
    emb = embedding.float()
    pooled = F.normalize(F.avg_pool2d(emb[None], stride, ceil_mode=True), dim=1)
    ph, pw = pooled.shape[-2:]
    pvalid = None
    if valid is not None:
        pvalid = -F.max_pool2d(-valid.float()[None], stride, ceil_mode=True)[0] > 0.5  # all pixels valid
    locs = location_features(h, w)
    ploc = F.avg_pool2d(locs[None], stride, ceil_mode=True)[0]
    small = pixel_sort(pooled, valid=pvalid, grid=grid, iterations=iterations, locations=ploc,
                       location_weight=location_weight)[0]
    x_small = F.normalize(torch.cat([pooled[0], ploc * location_weight]), dim=0).reshape(d + 2, -1)
    lab = small.reshape(-1)
    keep = lab >= 0
    k = int(lab.max()) + 1
    sums = torch.zeros(k, d + 2).index_add_(0, lab[keep], x_small[:, keep].T)
    centres = F.normalize(sums, dim=1)
    x = F.normalize(torch.cat([emb, locs * location_weight]), dim=0).reshape(d + 2, -1)
    labels = (centres @ x).argmax(dim=0)
    if valid is not None:
        labels = torch.where(valid.reshape(-1), labels, -1)
    return consecutive_labels(labels[None])[0].reshape(h, w).numpy().astype(np.int32)


def _resize_rgb(rgb: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    if scale == 1.0:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)


def image_prototypes(model, rgb: np.ndarray, config: EmbedConfig, *, labels: np.ndarray | None = None,
                     precision: str = "fp32", device: Any = "cpu") -> dict[str, np.ndarray]:
    """Every view's segments and prototypes of one image: the arrays of one store item."""
    import torch
    import torch.nn.functional as F

    h, w = rgb.shape[:2]
    valid = None
    if labels is not None:
        if labels.shape != (h, w):
            raise InputError(f"label map is {labels.shape[0]}x{labels.shape[1]} but the image is {h}x{w}")
        valid = torch.from_numpy(labels != config.ignore_label)[None]
    tables, maps, offset = [], [], 0
    for scale, mirrored in config.views:
        view = _resize_rgb(rgb, scale)
        if mirrored:
            view = np.ascontiguousarray(view[:, ::-1])
        emb = embed_image(model, view, features=config.features, window=config.window,
                          window_stride=config.window_stride, precision=precision, device=device)
        if mirrored:
            emb = emb.flip(-1)
        if emb.shape[-2:] != (h, w):
            emb = F.normalize(F.interpolate(emb[None], size=(h, w), mode="bilinear", align_corners=False)[0], dim=0)
        seg = sort_pixels(emb, valid=valid, grid=tuple(config.grid), iterations=config.iterations,
                          location_weight=config.location_weight, stride=config.sort_stride)
        table = segment_table(emb.cpu(), seg, None if labels is None else labels)
        tables.append(table)
        maps.append(np.where(seg >= 0, seg + offset, -1).astype(np.int32))
        offset += len(table["prototypes"])
    arrays = {name: np.concatenate([t[name] for t in tables]) for name in tables[0]}
    arrays["segments"] = maps[0]
    if len(maps) > 1:
        arrays["views"] = np.stack(maps)
    return arrays


# --------------------------------------------------------------------------------------------
# Model loading (once per worker process)
# --------------------------------------------------------------------------------------------
def resolve_model_path(path: str | os.PathLike) -> Path:
    """The model file: ``path`` itself, or ``model.pt`` in a train run folder."""
    p = Path(path)
    if p.is_dir():
        p = p / MODEL_FILE
    if not p.is_file():
        raise InputError(f"{path}: no model file (give a model.pt or a train run folder holding one)")
    return p


@dataclass
class _Loaded:
    model: Any
    device: Any
    precision: str


_MODELS: dict[tuple, _Loaded] = {}


def _resolve(device: str, precision: str) -> tuple[Any, str]:
    from ..runtime import resolve_device, resolve_precision

    dev = resolve_device(device)
    return dev, resolve_precision(precision, dev)


def _model(path: str, sha256: str, device: str, precision: str, threads: int | None) -> _Loaded:
    """The model of this process (loaded once per file, device, precision)."""
    import torch

    from .model import load_model

    key = (path, sha256, device, precision, threads)
    loaded = _MODELS.get(key)
    if loaded is None:
        _MODELS.clear()
        if threads is not None:
            torch.set_num_threads(int(threads))
        dev, prec = _resolve(device, precision)
        model, _ = load_model(path, map_location=dev)
        model.eval()
        if dev.type == "cpu" and prec in ("bf16", "fp32"):
            model.backbone.fuse_for_cpu(torch.bfloat16 if prec == "bf16" else torch.float32)
            if prec == "bf16":
                model.head.to(memory_format=torch.channels_last)
        loaded = _MODELS[key] = _Loaded(model, dev, prec)
    return loaded


@dataclass(frozen=True)
class _Job:
    """One image for a worker (small and picklable)."""

    key: str
    path: str
    label_path: str | None
    model_path: str
    model_sha256: str
    config: EmbedConfig
    threads: int | None


def process_image(job: _Job) -> Item:
    """Segments and prototypes of one image (module-level: worker processes and Dask run it)."""
    from ..io.images import read_label_png

    loaded = _model(job.model_path, job.model_sha256, job.config.device, job.config.precision, job.threads)
    if job.threads is not None:
        use_torch_threads(job.threads)
    rgb = read_image(job.path)
    labels = None
    if job.config.labels is not None:
        if not job.label_path:
            raise BadImageError(job.path, f"no label PNG for this image in {job.config.labels}")
        labels = read_label_png(job.label_path).astype(np.int64)
        if labels.shape != rgb.shape[:2]:
            raise BadImageError(job.label_path, f"label map is {labels.shape[0]}x{labels.shape[1]} but the image "
                                                f"{job.path} is {rgb.shape[0]}x{rgb.shape[1]}")
    arrays = image_prototypes(loaded.model, rgb, job.config, labels=labels, precision=loaded.precision,
                              device=loaded.device)
    return Item(job.key, arrays, {"source": job.path, "height": int(rgb.shape[0]), "width": int(rgb.shape[1]),
                                  "views": len(job.config.views)})


def _label_paths(folder: str) -> dict[str, Path]:
    from ..evaluate.inputs import image_id

    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"label folder not found: {root}")
    files = {image_id(p.name): p for p in sorted(root.rglob("*.png"))}
    if not files:
        raise InputError(f"no label PNGs in {root}")
    return files


def run(config: EmbedConfig, inputs: Any, output: str | os.PathLike, *,
        executor: Executor | None = None, overwrite: bool | str = False) -> StageSummary:
    """Segments and prototypes of every image into the prototypes store at ``output``.

    ``inputs`` is ``[model, images]``: a ``model.pt`` (or a train run folder holding one) and a
    folder, glob, list file or image (see :func:`list_images`) or a list of :class:`ImageRef`.
    Bad images are logged, recorded and skipped.
    """
    from ..evaluate.inputs import image_id
    from ..io.atomic import sha256_file

    executor = executor or InProcess()
    try:
        model_in, images = inputs
    except (TypeError, ValueError):
        raise InputError("embed needs two inputs: a model (model.pt or a train run folder) and images") from None
    model_path = resolve_model_path(model_in)
    refs = list(images) if isinstance(images, list) else list_images(images)
    sha = sha256_file(model_path)
    dev, precision = _resolve(config.device, config.precision)
    label_files = _label_paths(config.labels) if config.labels is not None else {}
    identity = config.identity(model_sha256=sha, precision=precision)
    meta = {"model_file": str(model_path.resolve()), "model_sha256": sha, "precision": precision,
            "device": str(dev), "settings": config.to_dict()}
    threads = inference_threads(config.threads)  # the same in every executor: the same bits
    _model(str(model_path.resolve()), sha, config.device, config.precision, threads)  # a bad file fails here, once
    jobs = []
    for ref in refs:
        lab = label_files.get(image_id(ref.key))
        jobs.append(_Job(ref.key, os.path.abspath(ref.path), None if lab is None else str(lab.resolve()),
                         str(model_path.resolve()), sha, config, threads))
    with StageRun("embed", output, kind="prototypes", identity=identity, meta=meta, overwrite=overwrite,
                  shard_size=config.shard_size,
                  sources=FileSources({j.key: (j.path, j.label_path) for j in jobs})) as run:
        log.info("embed: %s (%s), %s features, %s, %d view(s), on %s", model_path, sha[:12], config.features,
                 precision, len(config.views), executor.describe())
        run.run_jobs(executor, process_image, jobs, desc="embed")
    return run.summary


STAGE = Stage("embed", EmbedConfig, run, sources=("train", "input"), output="prototypes", optional=True,
              input_paths=("labels",), help="segments + one prototype per segment, per image")
