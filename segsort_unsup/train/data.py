"""Training data of the ``train`` stage: images + groupings from a segments store, augmentation,
a deterministic sample stream, and the cached-feature store.

Determinism
    Every random choice of a sample (which image, scale, crop offset, flip) is a pure function
    of ``(seed, global sample index)``: the image order of epoch ``e`` is a permutation drawn from
    ``numpy.random.default_rng([seed, e])``, and sample ``i``'s augmentation from
    ``default_rng([seed, 1, i])``. So the only "data RNG state" a checkpoint needs is the step
    (global sample index = step x global batch), data workers hold no state that matters, and
    with DDP every rank sees the same global order, rank ``r`` taking its slice of each global
    batch.

Groupings
    Unsupervised: the segments store's ``labels`` (the ucm cut at the stage threshold), or one of
    its ``labels_levels`` (``cut``). Supervised: class-label PNGs matched by key or basename.
    Crop padding is :data:`~segsort_unsup.embed.losses.PAD_SEGMENT` (its own segment) for
    groupings and the ignore label for class labels.

Cached mode
    :class:`FeatureBatches` crops the maps of a ``features`` store (written by the
    :mod:`~segsort_unsup.train.features` stage). Class labels are not stored there: supervised
    runs map them to each map's grid as they read it (:func:`classes_on_grid`), so the unsupervised
    model and its supervised counterpart share one store (``features_dir``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from ..errors import BadImageError, InputError, StoreError
from ..io.images import IMAGE_EXTENSIONS, read_image, read_label_png
from ..io.labels import LabelFiles, LabelSources, describe_sources
from ..io.store import Item, StoreReader, cached_reader
from ..log import get_logger
from ..embed.losses import PAD_SEGMENT, segments_to_grid
from ..embed.sorting import grid_labels as initial_cells

log = get_logger("train")

STRIDE = 8


# -- where the pictures are ------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One training image: its key, photo path, segments store and (supervised) label PNG."""

    key: str
    image: str
    store: str
    label: str | None = None


def _index_folder(folder: Path) -> dict[str, Path]:
    """Files of a folder tree by relative key without extension, and by bare stem."""
    found: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            found.setdefault(str(p.relative_to(folder).with_suffix("")), p)
            found.setdefault(p.stem, p)
    return found


def _lookup(index: dict[str, Path], key: str, source: str) -> Path | None:
    for name in (key, Path(key).name, Path(source).stem if source else ""):
        if name and name in index:
            return index[name]
    return None


def grouping_names(reader: StoreReader, cut: float | None) -> tuple[str, int | None]:
    """Dataset name and level index of the grouping at ``cut`` (None: the stage's ``labels``)."""
    if cut is None:
        return "labels", None
    threshold = reader.config.get("threshold")
    if threshold is not None and math.isclose(float(threshold), cut, abs_tol=1e-9):
        return "labels", None
    levels = [float(v) for v in reader.config.get("levels", []) or []]
    for i, level in enumerate(levels):
        if math.isclose(level, cut, abs_tol=1e-9):
            return "labels_levels", i
    avail = ", ".join(f"{v:g}" for v in ([float(threshold)] if threshold is not None else []) + levels)
    raise InputError(f"{reader.root}: no stored cut at {cut:g}; available levels: {avail or 'none'} "
                     "(re-run ucm with --levels to store more)")


def list_samples(segments: str | os.PathLike, *, images: str | os.PathLike | None = None,
                 labels: LabelSources | None = None) -> tuple[list[Sample], list[tuple[str, str]]]:
    """The samples of a segments store and the items left out ``(key, reason)``.

    The photo of an item is its recorded ``source`` attr; with ``images`` it is looked up as
    ``<images>/<key>.<ext>`` or by basename instead. With ``labels`` (one or several folders or
    list files, :class:`~segsort_unsup.io.labels.LabelFiles`) each item needs a label PNG (same
    key or basename). Items whose photo or label file is missing are left out.
    """
    root = Path(segments)
    try:
        reader = StoreReader(root, kind="segments")
    except StoreError:
        raise
    image_index = _index_folder(Path(images)) if images else None
    label_index = LabelFiles(labels) if labels else None
    samples, dropped = [], []
    with reader:
        for key in reader.keys():
            item = reader.read(key, names=("labels",))
            source = str(item.attrs.get("source", ""))
            if image_index is not None:
                path = _lookup(image_index, key, source)
                if path is None:
                    dropped.append((key, f"no image for {key!r} in {images}"))
                    continue
            else:
                if not source:
                    dropped.append((key, "the item records no source image (pass --images DIR)"))
                    continue
                path = Path(source)
                if not path.is_file():
                    dropped.append((key, f"{source}: image not found (moved? pass --images DIR)"))
                    continue
            label = None
            if label_index is not None:
                lp = label_index.find(key, source)
                if lp is None:
                    dropped.append((key, f"no label PNG for {key!r} in {describe_sources(labels)}"))
                    continue
                try:
                    lh, lw = read_label_png(lp).shape
                except BadImageError as exc:
                    dropped.append((key, str(exc)))
                    continue
                sh, sw = item.arrays["labels"].shape[-2:]
                if (lh, lw) != (sh, sw):
                    dropped.append((key, f"{lp}: label map is {lw}x{lh}, its segments {sw}x{sh}"))
                    continue
                label = str(lp)
            samples.append(Sample(key, str(path), str(root.resolve()), label))
    return samples, dropped


def load_sample(sample: Sample, *, grouping: tuple[str, int | None] = ("labels", None)
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(rgb uint8 (H, W, 3), grouping int32 (H, W), classes int32 (H, W) or None)``."""
    rgb = read_image(sample.image)
    name, level = grouping
    arr = cached_reader(sample.store, kind="segments").read(sample.key, names=(name,)).arrays[name]
    seg = np.asarray(arr if level is None else arr[level], dtype=np.int32)
    if seg.shape != rgb.shape[:2]:
        raise BadImageError(sample.image, f"image is {rgb.shape[1]}x{rgb.shape[0]} but its segments are "
                                          f"{seg.shape[1]}x{seg.shape[0]} (wrong --images folder?)")
    cls = None
    if sample.label is not None:
        cls = read_label_png(sample.label).astype(np.int32)
        if cls.shape != seg.shape:
            raise BadImageError(sample.label, f"label map is {cls.shape[1]}x{cls.shape[0]}, image "
                                              f"{seg.shape[1]}x{seg.shape[0]}")
    return rgb, seg, cls


# -- the sample stream -----------------------------------------------------------------------------
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Image order of an epoch (the same on every rank)."""
    return np.random.default_rng([seed, 0, epoch]).permutation(n)


def sample_image(seed: int, index: int, n: int) -> int:
    """Which image global sample ``index`` uses."""
    epoch, pos = divmod(index, n)
    return int(epoch_order(seed, epoch, n)[pos])


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The augmentation generator of global sample ``index``."""
    return np.random.default_rng([seed, 1, index])


def rank_indices(step: int, *, batch: int, rank: int, world: int) -> list[int]:
    """Global sample indices of this rank's share of step ``step``'s global batch."""
    local = batch // world
    start = step * batch + rank * local
    return list(range(start, start + local))


# -- full mode: photos -----------------------------------------------------------------------------
MEAN_RGB = (123.68, 116.78, 103.94)  # ImageNet mean: crop padding of the photo


def augment(rgb: np.ndarray, seg: np.ndarray, cls: np.ndarray | None, rng: np.random.Generator, *,
            crop: int, scale_range: tuple[float, float], flip: bool, ignore_label: int
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Random scale, crop (padding: mean colour, PAD_SEGMENT, ignore label) and horizontal flip.

    ``cls``: classes (H, W), or the supervised stack (C, H, W) of :func:`supervised_targets`, every
    channel scaled, cropped and flipped alike. Returns float32 (3, crop, crop) RGB 0..255, int32
    (crop, crop) grouping and classes (or (C, crop, crop)).
    """
    s = float(rng.uniform(*scale_range))
    h, w = seg.shape
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    img = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    seg = cv2.resize(seg, (nw, nh), interpolation=cv2.INTER_NEAREST)
    if cls is not None:
        cls = np.stack([cv2.resize(c, (nw, nh), interpolation=cv2.INTER_NEAREST) for c in cls.reshape(-1, h, w)]
                       ).reshape(cls.shape[:-2] + (nh, nw))
    out_img = np.empty((crop, crop, 3), np.float32)
    out_img[:] = MEAN_RGB
    out_seg = np.full((crop, crop), PAD_SEGMENT, np.int32)
    out_cls = _padded(cls.shape[:-2], crop, ignore_label) if cls is not None else None
    y0 = int(rng.integers(0, max(nh - crop, 0) + 1))
    x0 = int(rng.integers(0, max(nw - crop, 0) + 1))
    ch, cw = min(crop, nh), min(crop, nw)
    out_img[:ch, :cw] = img[y0:y0 + ch, x0:x0 + cw]
    out_seg[:ch, :cw] = seg[y0:y0 + ch, x0:x0 + cw]
    if out_cls is not None:
        out_cls[..., :ch, :cw] = cls[..., y0:y0 + ch, x0:x0 + cw]
    if flip and rng.random() < 0.5:
        out_img, out_seg = out_img[:, ::-1], out_seg[:, ::-1]
        out_cls = out_cls[..., ::-1] if out_cls is not None else None
    return (np.ascontiguousarray(out_img.transpose(2, 0, 1)), np.ascontiguousarray(out_seg),
            None if out_cls is None else np.ascontiguousarray(out_cls))


def supervised_targets(classes: np.ndarray) -> np.ndarray:
    """``(4, H, W)`` int32: the classes, then what the supervised loss's pixel sorting starts from,
    built on the whole image as the released reader does before augmenting: each pixel's cell of
    the 5x5 initial grid, its row and its column. Scaled, flipped and cropped with the classes, they
    give every crop the whole image's k-means initialisation and its ``(y/H, x/W)`` locations."""
    h, w = classes.shape
    rows, cols = np.indices((h, w))
    return np.stack([classes, initial_cells(h, w).numpy(), rows, cols]).astype(np.int32)


def _padded(channels: tuple[int, ...], side: int, ignore_label: int) -> np.ndarray:
    """A crop's padding: the ignore label for classes; 0 for the sorting channels of a stack (their
    pixels are ignored, and no cluster id beyond the grid's appears)."""
    out = np.full(channels + (side, side), ignore_label, np.int32)
    if channels:
        out[1:] = 0
    return out


def _supervised_batch(stacks: list[tuple[np.ndarray, tuple[int, int]]]) -> dict[str, torch.Tensor]:
    """Batch entries of cropped :func:`supervised_targets` stacks and their images' (H, W)."""
    k = np.stack([stack for stack, _ in stacks])
    return {"labels": torch.from_numpy(np.ascontiguousarray(k[:, 0])),
            "init": torch.from_numpy(np.ascontiguousarray(k[:, 1])),
            "yx": torch.from_numpy(np.ascontiguousarray(k[:, 2:4])),
            "image_size": torch.tensor([size for _, size in stacks], dtype=torch.int64)}


class PhotoBatches(torch.utils.data.Dataset):
    """Full-mode data: item ``step`` is this rank's share of that step's global batch.

    Each element is read and augmented from ``(seed, global sample index)`` alone, so any number
    of DataLoader workers give the same batches, and resuming at a step needs nothing else.
    """

    def __init__(self, samples: list[Sample], *, seed: int, batch: int, rank: int, world: int, crop: int,
                 scale_range: tuple[float, float], flip: bool, grouping: tuple[str, int | None],
                 ignore_label: int):
        self.samples, self.seed, self.batch, self.rank, self.world = samples, seed, batch, rank, world
        self.crop, self.scale_range, self.flip = crop, scale_range, flip
        self.grouping, self.ignore_label = grouping, ignore_label

    def __len__(self) -> int:  # steps are indexed by a sampler; the length is only nominal
        return 2**62

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        imgs, segs, clss = [], [], []
        for index in rank_indices(step, batch=self.batch, rank=self.rank, world=self.world):
            sample = self.samples[sample_image(self.seed, index, len(self.samples))]
            rgb, seg, cls = load_sample(sample, grouping=self.grouping)
            if cls is not None:
                cls = supervised_targets(cls)
            img, aug_seg, cls = augment(rgb, seg, cls, sample_rng(self.seed, index), crop=self.crop,
                                        scale_range=self.scale_range, flip=self.flip, ignore_label=self.ignore_label)
            imgs.append(img)
            segs.append(aug_seg)
            if cls is not None:
                clss.append((cls, seg.shape))
        out = {"image": torch.from_numpy(np.stack(imgs)), "segments": torch.from_numpy(np.stack(segs))}
        if clss:
            out.update(_supervised_batch(clss))
        return out


class StepSampler(torch.utils.data.Sampler):
    """Steps ``start, start + 1, ..., stop - 1`` (one dataset item per step)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: one torch thread per worker, seeded generators (no sample
    depends on them: augmentation is drawn from the sample index)."""
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    import random

    random.seed(seed)


# -- cached mode: features -------------------------------------------------------------------------
def crop_features(feats: np.ndarray, seg: np.ndarray, cls: np.ndarray | None, rng: np.random.Generator, *,
                  cells: int, ignore_label: int, ratio: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A random crop of cached features that the trainable blocks turn into ``cells x cells``
    output cells (zero padding; groupings padded with PAD_SEGMENT, classes with the ignore label).

    ``ratio``: cached cells per output cell (output stride / cached stride, 2 for pool2 maps under
    a stride-8 output). The crop starts on the output grid, covers ``cells * ratio`` cached cells,
    and the grouping and classes (stored on the cached grid) are taken at every ``ratio``-th cell:
    the pixel the output grid itself samples (:func:`segments_to_grid`) when the image side is a
    multiple of the output stride, one within the same output cell otherwise.
    """
    if ratio > 1:
        seg, cls = seg[::ratio, ::ratio], (None if cls is None else cls[..., ::ratio, ::ratio])
    c, h, w = feats.shape
    oh, ow = seg.shape
    y0 = int(rng.integers(0, max(oh - cells, 0) + 1))
    x0 = int(rng.integers(0, max(ow - cells, 0) + 1))
    fh, fw = min(cells * ratio, h - y0 * ratio), min(cells * ratio, w - x0 * ratio)
    f = np.zeros((c, cells * ratio, cells * ratio), np.float32)
    f[:, :fh, :fw] = feats[:, y0 * ratio:y0 * ratio + fh, x0 * ratio:x0 * ratio + fw]
    ch, cw = min(cells, oh - y0), min(cells, ow - x0)
    s = np.full((cells, cells), PAD_SEGMENT, np.int32)
    s[:ch, :cw] = seg[y0:y0 + ch, x0:x0 + cw]
    k = None
    if cls is not None:  # classes (h, w) or a supervised stack (C, h, w)
        k = _padded(cls.shape[:-2], cells, ignore_label)
        k[..., :ch, :cw] = cls[..., y0:y0 + ch, x0:x0 + cw]
    return f, s, k


def classes_on_grid(label_png: str | os.PathLike, grid: tuple[int, int], *, flip: bool) -> np.ndarray:
    """:func:`supervised_targets` of a label PNG on a cached map's feature grid (flipped with the
    map), int32 ``(4, h, w)``: classes, initial cell, row, column of the full-size image.

    The grid of a rescaled image is reached from the full-size image directly by nearest
    neighbour (:func:`segments_to_grid`), as the map's grouping is.
    """
    stack = supervised_targets(read_label_png(label_png).astype(np.int32))
    if flip:
        stack = stack[..., ::-1]
    return segments_to_grid(torch.from_numpy(np.ascontiguousarray(stack)), grid).numpy()


class FeatureBatches:
    """Cached-mode data: this rank's share of step ``step`` from a features store.

    Sample ``i`` takes image ``sample_image(seed, i, n)``, then one of its cached (scale, flip)
    variants and a crop offset, all from ``sample_rng(seed, i)``. With ``labels`` (image key ->
    label PNG) each map also gets its classes on its grid (supervised).
    """

    def __init__(self, store: str | os.PathLike, keys: list[str], variants: dict[str, list[str]], *, seed: int,
                 batch: int, rank: int, world: int, cells: int, ignore_label: int,
                 labels: dict[str, str] | None = None, ratio: int = 1):
        self.store, self.keys, self.variants = os.fspath(store), keys, variants
        self.seed, self.batch, self.rank, self.world = seed, batch, rank, world
        self.cells, self.ignore_label, self.labels, self.ratio = cells, ignore_label, labels, ratio
        self.supervised = labels is not None
        self._cache: dict[str, Item] = {}

    def _read(self, key: str) -> Item:
        item = self._cache.get(key)
        if item is None:
            item = cached_reader(self.store, kind="features").read(key, names=("features", "segments"))
            if self.labels is not None:
                path = self.labels[str(item.attrs["image"])]
                item.arrays["targets"] = classes_on_grid(path, item.arrays["segments"].shape,
                                                         flip=bool(item.attrs["flip"]))
                item.arrays["labels"] = item.arrays["targets"][0]
                item.attrs["image_size"] = read_label_png(path).shape
            if len(self._cache) < 64:  # a small cache: tiny runs reread nothing
                self._cache[key] = item
        return item

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        fs, ss, ks = [], [], []
        for index in rank_indices(step, batch=self.batch, rank=self.rank, world=self.world):
            image = self.keys[sample_image(self.seed, index, len(self.keys))]
            rng = sample_rng(self.seed, index)
            options = self.variants[image]
            item = self._read(options[int(rng.integers(len(options)))])
            f, s, k = crop_features(item.arrays["features"], item.arrays["segments"], item.arrays.get("targets"),
                                    rng, cells=self.cells, ignore_label=self.ignore_label, ratio=self.ratio)
            fs.append(f)
            ss.append(s)
            if k is not None:
                ks.append((k, item.attrs["image_size"]))
        out = {"features": torch.from_numpy(np.stack(fs)), "segments": torch.from_numpy(np.stack(ss))}
        if self.supervised:
            out.update(_supervised_batch(ks))
        return out
