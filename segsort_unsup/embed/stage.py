"""The embed stage: a trained model + images -> a prototypes store (segments and one prototype each).

Per image (as the reference's ``pyscripts/inference/extract_prototypes.py`` and
``inference_segsort_msc.py``):

1. **Embeddings at full resolution.** The network runs on the image (or, when a side exceeds
   ``window``, on ``window``-sized windows whose ends are spread evenly with at most
   ``window_stride`` between them, as the reference); each window's embedding (at the model's
   stride, 8 for the VGG and ResNet trunks, the patch for a ViT) is upsampled bilinearly by that
   stride (half-pixel centres), cropped to the window and re-normalised; overlapping windows are
   summed and normalised again. Images smaller than a window are not padded (the reference pads to
   512 x 512 with zeros; padding would change the borders' embeddings). With ``dense`` the map
   is computed at half the stride first (:func:`shift_and_stitch`, four passes), for thin objects.
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
:mod:`~segsort_unsup.transfer.stage` sums each pixel's kNN votes over views (the reference sums
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

from ..config import PRECISIONS, StageConfig, run_only, setting
from ..errors import BadImageError, InputError
from ..io.images import ImageRef, list_images, read_image
from ..io.labels import describe_sources
from ..io.sources import FileSources
from ..io.store import Item
from ..log import get_logger
from ..parallel import Executor, InProcess, inference_threads, use_torch_threads
from ..stages import Stage, StageRun, StageSummary

log = get_logger("embed")

FEATURES = ("head", "trunk")
MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class EmbedConfig(StageConfig):
    """Settings of the embed stage (see the module doc).

    features : ``head`` (the model's embeddings) or ``trunk`` (normalised trunk features).
    scales, flip : views whose segments all enter the store (votes are summed over them).
    dense : embeddings at half the network's stride (:func:`shift_and_stitch`), four times the work.
    window, window_stride : sliding windows for images with a side above ``window``.
    grid, iterations, location_weight : pixel sorting (5 x 5, 10, 1 in the reference).
    labels : folder of label PNGs (the labelled set), or several folders / list files (a list;
        :class:`~segsort_unsup.io.labels.LabelFiles`); ``ignore_label`` pixels are dropped.
    class_parts : with ``labels``, every segment is split by class (:func:`split_by_class`): each
        part of at least this many pixels is a segment of its own, so a thin object inside a larger
        region still gives the labelled set a prototype of its class. None: as released.
    units : the segments prototypes are made of (see :func:`parse_units`): ``gridN`` pixel sorting
        from an N x N grid (None: the ``grid`` setting, 5 x 5 as released), ``ucm:T`` the regions
        of the segments store ``segments`` (``segsort-unsup ucm`` of these images) at the stored
        cut T, one prototype per region.
    sort_stride : 1 (the reference) sorts every pixel; s > 1 runs the k-means on the embedding
        average-pooled s x s (a cell is used when all its pixels are valid), then gives every
        full-resolution pixel the cluster of largest cosine (one more E-step): s^2 times less
        k-means work, for wide features (``trunk``: 512 dims) on CPU.
    """

    stage = "embed"

    features: str = setting("head", help="head: the model's embeddings; trunk: L2-normalised trunk features "
                                         "(raw-feature baseline).", choices=FEATURES)
    scales: tuple[float, ...] = setting((1.0,), help="Image scales; every view's segments vote.", low=0.1, high=4.0,
                                        metavar="S1,S2,...")
    flip: bool = setting(False, help="Also the mirrored image of every scale.")
    dense: bool = setting(False, help="Embeddings at half the network's stride (4 for the VGG trunks): the network "
                                      "runs on the image shifted by half a stride (four passes) and the maps are "
                                      "interleaved, the a-trous map of the trained model.", off=False)
    window: int = setting(480, help="Sliding-window side for larger images (multiple of 8).", low=64)
    window_stride: int = setting(320, help="Step between sliding windows.", low=8)
    grid: tuple[int, ...] = setting((5, 5), help="Initial k-means cells.", nargs=2, metavar="ROWS COLS")
    iterations: int = setting(10, help="k-means iterations.", low=0)
    location_weight: float = setting(1.0, help="Weight of the pixel position in the sorting's k-means.", low=0)
    sort_stride: int = setting(1, help="k-means on the embedding pooled s x s, then one full-resolution step "
                                       "(s^2 times less work; 1: every pixel, as the reference).", low=1)
    precision: str = setting("auto", help="auto: bf16 on CPUs with AMX/AVX512-BF16 and on CUDA, else fp32.",
                             choices=PRECISIONS)
    labels: str | tuple[str, ...] | None = setting(
        None, help="Folder (or list file) of label PNGs, same names as the images; repeat for labels split over "
                   "folders: store each segment's majority class (the labelled set for `transfer`).",
        multiple=True, metavar="DIR")
    ignore_label: int = setting(255, help="Label of pixels to drop (with --labels), e.g. 11 for CamVid.")
    units: str | None = setting(None, help="Segment units: gridN = pixel sorting from N x N cells (default: --grid, "
                                           "5 x 5 as released); ucm:T = the regions of --segments at its stored "
                                           "cut T, one prototype each.", metavar="gridN|ucm:T")
    segments: str | None = setting(None, help="Segments store of these images (`segsort-unsup ucm`), for --units "
                                              "ucm:T.")
    class_parts: int | None = setting(None, help="With --labels: split every segment by class; a part of at least "
                                                 "this many pixels gets a prototype of its own (default: none, each "
                                                 "segment keeps its majority class only, as released).",
                                      low=1, metavar="PIXELS")
    device: str = run_only("auto", help="auto, cpu, cuda, cuda:1...")
    threads: int | None = run_only(None, help="Torch threads per image [default: 1, in every executor, so that "
                                              "every executor gives the same bits; workers give the parallelism]. "
                                              "More speed up a few huge images; the maps then differ in the last "
                                              "bits.", low=1)
    shard_size: int = run_only(64, help="Items per HDF5 shard (a killed run redoes at most this many).", low=1)

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
        if self.labels == ():
            raise self.bad_value("labels", "give one or more label folders, or leave it out")
        if self.units is not None:
            kind, value = parse_units(self.units)
            if kind == "grid" and tuple(self.grid) != (5, 5):
                raise self.bad_value("units", "give the cells either as units = \"gridN\" or as grid, not both")
            if kind == "ucm" and not self.segments:
                raise self.bad_value("segments", f"units {self.units!r} need the segments store of these images "
                                                 "(segments = \"<ucm store>\", --segments)")
        if self.class_parts is not None and (self.class_parts < 1 or not self.labels):
            raise self.bad_value("class_parts", "needs labels (the labelled set) and at least 1 pixel a part")
        if self.segments and (self.units is None or not self.units.startswith("ucm:")):
            raise self.bad_value("segments", "is only used with units = \"ucm:T\"; remove it or set units")
        if not self.location_weight >= 0:
            raise self.bad_value("location_weight", "must be >= 0")
        for key in ("threads", "shard_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise self.bad_value(key, "must be >= 1")

    @property
    def sorting_grid(self) -> tuple[int, int]:
        """The initial k-means cells: ``gridN`` units, else the ``grid`` setting."""
        if self.units is not None and self.units.startswith("grid"):
            n = int(parse_units(self.units)[1])
            return (n, n)
        return (int(self.grid[0]), int(self.grid[1]))

    @property
    def units_label(self) -> str:
        """The units as recorded in the store's meta (``grid5``, ``grid4x6``, ``ucm:0.3``)."""
        if self.units is not None:
            return self.units
        gy, gx = self.sorting_grid
        return f"grid{gy}" if gy == gx else f"grid{gy}x{gx}"

    @property
    def views(self) -> list[tuple[float, bool]]:
        """(scale, mirrored) of every view, in store order."""
        return [(s, f) for f in ((False, True) if self.flip else (False,)) for s in self.scales]


def parse_units(units: str) -> tuple[str, float]:
    """``"gridN"`` -> ``("grid", N)`` (1 <= N <= 64); ``"ucm:T"`` -> ``("ucm", T)``; else InputError."""
    text = str(units).strip()
    try:
        if text.startswith("grid"):
            n = int(text[4:])
            if 1 <= n <= 64:
                return "grid", n
        elif text.startswith("ucm:"):
            t = float(text[4:])
            if math.isfinite(t) and t >= 0:
                return "ucm", t
    except ValueError:
        pass
    raise InputError(f"units {units!r}: give gridN (N x N k-means cells, e.g. grid5, grid8, grid12) or "
                     "ucm:T (the regions of a segments store at its stored cut T, e.g. ucm:0.3)")


class NonFiniteEmbeddingError(InputError):
    """The model gave NaN or infinite embeddings (a diverged training): nothing is stored."""


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
                dense: bool = False, precision: str = "fp32", device: Any = "cpu"):
    """Unit-norm pixel embeddings of one image at full resolution.

    Parameters
    ----------
    model : SegSortNet
    rgb : (H, W, 3) uint8 or float array, RGB 0..255.
    features : ``head`` or ``trunk`` (normalised trunk features, skipping the head).
    dense : the network's map at half its stride (:func:`shift_and_stitch`: four passes).
    precision : ``fp32``, ``bf16`` or ``fp16`` (autocast; channels_last on CPU).

    Returns
    -------
    (D, H, W) float32 torch tensor, unit norm per pixel.
    """
    import torch
    import torch.nn.functional as F

    if features not in FEATURES:
        raise InputError(f"features {features!r}: choose one of {', '.join(FEATURES)}")
    h, w = rgb.shape[:2]
    dev = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None].to(dev)
    if precision in ("bf16", "fp16") and dev.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    total = None
    for y0 in window_starts(h, window, window_stride):
        for x0 in window_starts(w, window, window_stride):
            crop = x[:, :, y0:y0 + window, x0:x0 + window]
            ch, cw = crop.shape[-2:]
            out = _pixel_embedding(model, crop, features=features, dense=dense, precision=precision)
            if ch == h and cw == w:
                return out[0]
            if total is None:
                total = out.new_zeros(1, out.shape[1], h, w)
            total[:, :, y0:y0 + ch, x0:x0 + cw] += out
    return F.normalize(total, dim=1)[0]


def _pixel_embedding(model, crop, *, features: str, dense: bool, precision: str):
    """The network's normalised map of one crop, upsampled bilinearly to the crop's pixels (half-
    pixel centres: a cell of a stride-s map is centred on pixel ``s * i + (s - 1) / 2``), re-normalised."""
    import torch
    import torch.nn.functional as F

    from ..runtime import autocast

    def network(x):
        with torch.no_grad(), autocast(x.device, precision):
            out = model(x) if features == "head" else model.features(x)
        return F.normalize(out.float(), dim=1)

    stride = int(model.stride)
    grid = shift_and_stitch(network, crop, stride) if dense else network(crop)
    step = stride // 2 if dense else stride
    ch, cw = crop.shape[-2:]
    out = F.interpolate(grid, scale_factor=step, mode="bilinear", align_corners=False)[:, :, :ch, :cw]
    return F.normalize(out, dim=1)


def shift_and_stitch(network, x, stride: int):
    """The map of a stride-``stride`` network at stride ``stride / 2``: the network runs on ``x``
    shifted by half a stride down and/or right and the four maps are interleaved, as if its last
    stride-2 step were replaced by stride 1 and every layer after it dilated by 2 (the a-trous
    conversion; equal away from the borders). ``x`` is padded by a quarter stride at the top and
    left first, so that cell ``j`` is centred on pixel ``(stride / 2) * j + (stride / 2 - 1) / 2``,
    as upsampling with half-pixel centres expects.

    ``network``: ``(N, C, H, W) -> (N, D, ceil(H / stride), ceil(W / stride))``; ``stride`` a multiple of 4.
    """
    import torch.nn.functional as F

    if stride % 4:
        raise InputError(f"a dense map needs a network stride divisible by 4, this one has stride {stride}")
    half, quarter = stride // 2, stride // 4
    rows, cols = -(-x.shape[-2] // half), -(-x.shape[-1] // half)
    padded = F.pad(x, (quarter, 0, quarter, 0), mode="replicate")
    out = None
    for dy in (0, 1):
        for dx in (0, 1):
            n_rows, n_cols = (rows - dy + 1) // 2, (cols - dx + 1) // 2
            if n_rows and n_cols:  # none for an image under half a stride high or wide
                part = network(padded[:, :, dy * half:, dx * half:])
                if out is None:
                    out = part.new_empty(part.shape[0], part.shape[1], rows, cols)
                out[:, :, dy::2, dx::2] = part[:, :, :n_rows, :n_cols]
    return out


def segment_table(embedding, segments, labels=None) -> dict[str, np.ndarray]:
    """Prototypes, areas, boxes (and majority classes) of a segment map, as host arrays.

    embedding : (D, H, W) tensor, unit rows. segments : (H, W) ids 0..K-1, -1 = left out (array
    or tensor). labels : (H, W) classes (used where ``segments >= 0``): each segment takes its
    majority class (ties: the lowest class) and its prototype uses only the pixels of that class.
    Computed on the embedding's device (:func:`device_segment_table`), then moved to the host.
    """
    dev = embedding.device
    table = device_segment_table(embedding, _as_tensor(segments, dev),
                                 None if labels is None else _as_tensor(labels, dev))
    return to_host(table)


def device_segment_table(embedding, segments, labels=None) -> dict[str, Any]:
    """:func:`segment_table` as tensors on the embedding's device (nothing leaves the device but
    the segment count)."""
    import torch
    import torch.nn.functional as F

    dev = embedding.device
    d, h, w = embedding.shape
    flat = segments.to(dev).reshape(-1).long()
    k = int(flat.max()) + 1 if flat.numel() else 0
    pix = torch.nonzero(flat >= 0).squeeze(1)
    ids = flat[pix]
    ys, xs = torch.div(pix, w, rounding_mode="floor"), pix % w
    bbox = torch.stack([
        torch.full((k,), h, dtype=torch.long, device=dev).scatter_reduce_(0, ids, ys, "amin"),
        torch.full((k,), w, dtype=torch.long, device=dev).scatter_reduce_(0, ids, xs, "amin"),
        torch.zeros(k, dtype=torch.long, device=dev).scatter_reduce_(0, ids, ys + 1, "amax"),
        torch.zeros(k, dtype=torch.long, device=dev).scatter_reduce_(0, ids, xs + 1, "amax"),
    ], dim=1).int()
    out: dict[str, Any] = {"area": torch.bincount(ids, minlength=k), "bbox": bbox}
    members = torch.where(flat >= 0, flat, k)  # pixels left out add into a spare row k
    if labels is not None:
        lab = labels.to(dev).reshape(-1).long()[pix]
        n_cls = int(lab.max()) + 1 if lab.numel() else 1
        counts = torch.bincount(ids * n_cls + lab, minlength=k * n_cls).reshape(k, n_cls)
        majority = counts.argmax(dim=1)  # the first (lowest) class among equal counts
        members[pix[majority[ids] != lab]] = k
        out["label"] = majority.int()
    out["prototypes"] = F.normalize(_segment_sums(embedding.reshape(d, -1).float(), members, k + 1)[:k], dim=1)
    return out


def _segment_sums(emb, members, k: int, chunk: int = 8192):
    """(k, D) sums of the columns of ``emb`` (D, P) by ``members`` (P,) in 0..k-1.

    A few thousand pixels at a time, each block transposed to pixel rows: gathering or scattering
    along the map's pixel axis directly strides over all its H*W values per channel, which costs
    seconds per image for wide (512-d) features."""
    sums = emb.new_zeros(k, emb.shape[0])
    for start in range(0, emb.shape[1], chunk):
        block = emb[:, start:start + chunk]
        sums.index_add_(0, members[start:start + chunk], block.T.contiguous())
    return sums


def to_host(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    """The one place results leave the device: tensors -> NumPy arrays (store dtypes)."""
    import torch

    dtypes = {"prototypes": np.float32, "area": np.int64}
    out = {}
    for name, value in arrays.items():
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        out[name] = arr.astype(dtypes.get(name, np.int32), copy=False)
    return out


def _as_tensor(values, device):
    import torch

    if isinstance(values, torch.Tensor):
        return values.to(device)
    return torch.from_numpy(np.ascontiguousarray(values)).to(device)


def sort_pixels(embedding, *, valid=None, grid: tuple[int, int] = (5, 5), iterations: int = 10,
                location_weight: float = 1.0, stride: int = 1):
    """Pixel sorting of one ``(D, H, W)`` embedding -> ``(H, W)`` int64 segment ids (-1: not
    valid), a tensor on the embedding's device.

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
    dev = embedding.device
    if valid is not None:
        valid = valid.to(dev)
    if stride == 1 or min(h, w) < 2 * stride:
        return pixel_sort(embedding[None], valid=valid, grid=grid, iterations=iterations,
                          location_weight=location_weight)[0]
    emb = embedding.float()
    pooled = F.normalize(F.avg_pool2d(emb[None], stride, ceil_mode=True), dim=1)
    pvalid = None
    if valid is not None:
        pvalid = -F.max_pool2d(-valid.float()[None], stride, ceil_mode=True)[0] > 0.5  # all pixels valid
    locs = location_features(h, w, device=dev)
    ploc = F.avg_pool2d(locs[None], stride, ceil_mode=True)[0]
    small = pixel_sort(pooled, valid=pvalid, grid=grid, iterations=iterations, locations=ploc,
                       location_weight=location_weight)[0]
    x_small = F.normalize(torch.cat([pooled[0], ploc * location_weight]), dim=0).reshape(d + 2, -1)
    lab = small.reshape(-1)
    keep = lab >= 0
    k = int(lab.max()) + 1
    sums = x_small.new_zeros(k, d + 2).index_add_(0, lab[keep], x_small[:, keep].T)
    centres = F.normalize(sums, dim=1)
    x = F.normalize(torch.cat([emb, locs * location_weight]), dim=0).reshape(d + 2, -1)
    labels = (centres @ x).argmax(dim=0)
    if valid is not None:
        labels = torch.where(valid.reshape(-1), labels, -1)
    return consecutive_labels(labels[None])[0].reshape(h, w)


def _region_segments(regions: np.ndarray, valid, device):
    """(H, W) region ids -> segment ids 0..R-1 in raster order of first appearance (-1: not valid)."""
    import torch

    from .sorting import consecutive_labels

    h, w = regions.shape
    seg = torch.from_numpy(np.ascontiguousarray(regions, dtype=np.int64)).to(device)
    seg = seg - seg.min()  # region ids are >= 0 from here; -1 marks pixels left out
    if valid is not None:
        seg = torch.where(valid[0], seg, -1)
    return consecutive_labels(seg.reshape(1, -1))[0].reshape(h, w)


def split_by_class(segments, labels, min_pixels: int):
    """(H, W) segment ids (-1: left out) -> the ids of their parts by class, renumbered in raster order.

    The part of a segment's majority class, and every other part of at least ``min_pixels`` pixels,
    gets an id of its own; the pixels of smaller parts join their segment's majority part (whose
    prototype leaves them out, as released). Ties for the majority go to the lowest class, as in
    :func:`device_segment_table`.
    """
    import torch

    from .sorting import consecutive_labels

    h, w = segments.shape
    flat = segments.reshape(-1).long()
    cls = labels.to(flat.device).reshape(-1).long()
    inside = flat >= 0
    if not bool(inside.any()):
        return segments
    seg, lab = flat[inside], cls[inside]
    k, n_cls = int(seg.max()) + 1, int(lab.max()) + 1
    counts = torch.bincount(seg * n_cls + lab, minlength=k * n_cls).reshape(k, n_cls)
    majority = counts.argmax(dim=1)
    own = counts >= min_pixels
    own[torch.arange(k, device=own.device), majority] = True
    part_class = torch.where(own[seg, lab], lab, majority[seg])
    parts = torch.full_like(flat, -1)
    parts[inside] = seg * n_cls + part_class
    return consecutive_labels(parts.reshape(1, -1))[0].reshape(h, w)


def _resize_rgb(rgb: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    if scale == 1.0:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_LINEAR)


def image_prototypes(model, rgb: np.ndarray, config: EmbedConfig, *, labels: np.ndarray | None = None,
                     regions: np.ndarray | None = None, precision: str = "fp32",
                     device: Any = "cpu") -> dict[str, np.ndarray]:
    """Every view's segments and prototypes of one image: the arrays of one store item.

    ``regions`` (H, W) integer map: the units instead of pixel sorting (``ucm:T`` units): every
    region is one segment (ids renumbered in raster order of first appearance; ignore-label
    pixels left out). Everything is computed on ``device``; the finished item moves to the host
    once (:func:`to_host`).
    """
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    h, w = rgb.shape[:2]
    valid = lab = None
    if labels is not None:
        if labels.shape != (h, w):
            raise InputError(f"label map is {labels.shape[0]}x{labels.shape[1]} but the image is {h}x{w}")
        lab = torch.from_numpy(np.ascontiguousarray(labels)).to(dev)
        valid = (lab != config.ignore_label)[None]
    fixed = None if regions is None else _region_segments(regions, valid, dev)
    tables, maps, offset = [], [], 0
    for scale, mirrored in config.views:
        view = _resize_rgb(rgb, scale)
        if mirrored:
            view = np.ascontiguousarray(view[:, ::-1])
        emb = embed_image(model, view, features=config.features, window=config.window,
                          window_stride=config.window_stride, dense=config.dense, precision=precision, device=dev)
        if not bool(torch.isfinite(emb).all()):
            raise NonFiniteEmbeddingError(
                f"the model's embedding of this image (view: scale {scale:g}{', mirrored' if mirrored else ''}) "
                "has NaN or infinite values; the model is broken (retrain it, e.g. with a lower --lr)")
        if mirrored:
            emb = emb.flip(-1)
        if emb.shape[-2:] != (h, w):
            emb = F.normalize(F.interpolate(emb[None], size=(h, w), mode="bilinear", align_corners=False)[0], dim=0)
        seg = fixed if fixed is not None else sort_pixels(
            emb, valid=valid, grid=config.sorting_grid, iterations=config.iterations,
            location_weight=config.location_weight, stride=config.sort_stride)
        if config.class_parts is not None and lab is not None:
            seg = split_by_class(seg, lab, config.class_parts)
        table = device_segment_table(emb, seg, lab)
        tables.append(table)
        maps.append(torch.where(seg >= 0, seg + offset, -1))
        offset += len(table["prototypes"])
    arrays = {name: torch.cat([t[name] for t in tables]) for name in tables[0]}
    arrays["segments"] = maps[0]
    if len(maps) > 1:
        arrays["views"] = torch.stack(maps)
    return to_host(arrays)


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

    from ..runtime import cpu_fusion_dtype
    from .model import load_model

    key = (path, sha256, device, precision, threads)
    loaded = _MODELS.get(key)
    if loaded is None:
        _MODELS.clear()
        if threads is not None:
            torch.set_num_threads(int(threads))
        dev, prec = _resolve(device, precision)
        model, _ = load_model(path)  # rebuilt on the host: move it, whatever the file's tensors were on
        model = model.to(dev).eval()
        fused_dtype = cpu_fusion_dtype(prec)
        if dev.type == "cpu" and fused_dtype is not None:
            model.backbone.fuse_for_cpu(fused_dtype)
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
    regions: tuple[str, str, int | None] | None = None  # ucm units: (segments store, dataset, level)


def _read_regions(job: _Job, shape: tuple[int, int]) -> np.ndarray:
    """This image's regions at the units' cut, from the segments store."""
    from ..io.store import StoreReader

    store, name, level = job.regions
    with StoreReader(store, kind="segments") as reader:
        if job.key not in reader:
            raise BadImageError(job.path, f"no item {job.key!r} in the segments store {store} "
                                          "(run `segsort-unsup ucm` on these images' contours)")
        regions = np.asarray(reader.read(job.key, names=(name,)).arrays[name])
    if level is not None:
        regions = regions[level]
    if regions.shape != shape:
        raise BadImageError(job.path, f"its regions in {store} are {regions.shape[0]}x{regions.shape[1]} but the "
                                      f"image is {shape[0]}x{shape[1]} (segments of other images?)")
    return regions


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
            raise BadImageError(job.path, f"no label PNG for this image in {describe_sources(job.config.labels)}")
        labels = read_label_png(job.label_path).astype(np.int64)
        if labels.shape != rgb.shape[:2]:
            raise BadImageError(job.label_path, f"label map is {labels.shape[0]}x{labels.shape[1]} but the image "
                                                f"{job.path} is {rgb.shape[0]}x{rgb.shape[1]}")
    regions = _read_regions(job, rgb.shape[:2]) if job.regions else None
    try:
        arrays = image_prototypes(loaded.model, rgb, job.config, labels=labels, regions=regions,
                                  precision=loaded.precision, device=loaded.device)
    except NonFiniteEmbeddingError as exc:
        raise BadImageError(job.path, str(exc)) from None
    if not np.isfinite(arrays["prototypes"]).all():
        raise BadImageError(job.path, "non-finite prototypes (NaN or infinite values); the model is broken")
    return Item(job.key, arrays, {"source": job.path, "height": int(rgb.shape[0]), "width": int(rgb.shape[1]),
                                  "views": len(job.config.views)})


def _units_source(config: EmbedConfig) -> tuple[tuple[str, str, int | None] | None, dict[str, Any]]:
    """For ``ucm:T`` units: (segments store, dataset, level) of the cut and the store's provenance
    for the identity (what it holds, so regions recomputed by another ucm run change it)."""
    if config.units is None or not config.units.startswith("ucm:"):
        return None, {}
    from ..io.sources import store_content
    from ..io.store import StoreReader, is_store
    from ..train.data import grouping_names

    root = Path(config.segments)
    if not is_store(root):
        raise InputError(f"segments {root}: not a store; give the segments store of these images "
                         "(`segsort-unsup ucm` output)")
    with StoreReader(root, kind="segments") as reader:
        name, level = grouping_names(reader, parse_units(config.units)[1])
        provenance = {"segments_identity": reader.config_hash, "segments_content": store_content(reader)}
    return (str(root.resolve()), name, level), provenance


def units_of(reader: Any) -> str:
    """The segment units of a prototypes store (:class:`StoreReader`), for the stages reading it;
    stores made before units were recorded sorted pixels from their ``grid`` setting."""
    units = reader.meta.get("units")
    if isinstance(units, str):
        return units
    grid = (reader.meta.get("settings") or {}).get("grid") or [5, 5]
    return f"grid{grid[0]}" if grid[0] == grid[1] else f"grid{grid[0]}x{grid[1]}"


def _label_paths(labels: str | tuple[str, ...], refs: list[ImageRef]) -> dict[str, Path]:
    """The label PNG of each image that has one, by key (:class:`~segsort_unsup.io.labels.LabelFiles`)."""
    from ..io.labels import LabelFiles

    files = LabelFiles(labels)
    found = {ref.key: files.find(ref.key, ref.path) for ref in refs}
    return {key: path for key, path in found.items() if path is not None}


def run(config: EmbedConfig, inputs: Any, output: str | os.PathLike, *,
        executor: Executor | None = None, overwrite: bool | str = False) -> StageSummary:
    """Segments and prototypes of every image into the prototypes store at ``output``.

    ``inputs`` is ``[model, images]``: a ``model.pt`` (or a train run folder holding one) and a
    folder, glob, list file or image (see :func:`list_images`) or a list of :class:`ImageRef`.
    Bad images are logged, recorded and skipped.
    """
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
    label_files = _label_paths(config.labels, refs) if config.labels is not None else {}
    regions, provenance = _units_source(config)
    identity = config.identity(model_sha256=sha, precision=precision, **provenance)
    meta = {"model_file": str(model_path.resolve()), "model_sha256": sha, "precision": precision,
            "device": str(dev), "units": config.units_label, "settings": config.to_dict()}
    threads = inference_threads(config.threads)  # the same in every executor: the same bits
    _model(str(model_path.resolve()), sha, config.device, config.precision, threads)  # a bad file fails here, once
    jobs = []
    for ref in refs:
        lab = label_files.get(ref.key)
        jobs.append(_Job(ref.key, os.path.abspath(ref.path), None if lab is None else str(lab.resolve()),
                         str(model_path.resolve()), sha, config, threads, regions))
    with StageRun("embed", output, kind="prototypes", identity=identity, meta=meta, overwrite=overwrite,
                  shard_size=config.shard_size,
                  sources=FileSources({j.key: (j.path, j.label_path) for j in jobs})) as run:
        log.info("embed: %s (%s), %s features, %s units, %s, %d view(s), on %s", model_path, sha[:12],
                 config.features, config.units_label, precision, len(config.views), executor.describe())
        run.run_jobs(executor, process_image, jobs, desc="embed")
    return run.summary


STAGE = Stage("embed", EmbedConfig, run, sources=("train", "input"), output="prototypes", optional=True,
              arguments=("model", "input"),
              input_paths=("labels", "segments"), help="segments + one prototype per segment, per image")
