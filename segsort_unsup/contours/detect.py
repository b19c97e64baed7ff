"""Batched, tiled, multiscale edge detection with any registry model.

:class:`EdgeDetector` wraps a contour network (``forward``: RGB float 0..255 ``(N, 3, H, W)`` ->
probability ``(N, 1, H, W)``) with what makes it fast and robust on real folders:

* **batching**: images of exactly the same size run together (padding to a common size would
  change HED's borders, so it is not done);
* **precision**: ``bf16`` autocast + channels_last on CPUs with AMX or AVX512-BF16 (``auto``),
  ``fp16``/``bf16`` autocast on CUDA, ``fp32`` everywhere;
* **multiscale**: ``scales=(0.5, 1, 1.5)`` resizes the image, runs, resizes the probability back
  and averages;
* **large images**: above ``max_side`` the image is cut into overlapping tiles whose results are
  blended with linear ramps (or refused with a clear error when ``tile=False``); tiles are cut
  from the uint8 image and blended one band of tile rows at a time into a float16 map, so the
  working memory is a few tiles, not full-size float copies; the tile side is chosen so that one
  tile's forward pass needs at most :data:`TILE_MEMORY_BUDGET` (:func:`auto_tile_side`, from the
  model's measured bytes per tile pixel); a stop request (Ctrl-C, SIGTERM) is honoured between tiles;
* **tiny images**: sides below :data:`MIN_SIDE` are padded by edge replication and cropped back;
* **overlapped decoding**: :meth:`EdgeDetector.detect_files` checks every file's header first
  (unreadable, empty or too large files are reported at once, before any image is decoded), then
  reads the next window of images (bounded in count and pixels) in a thread pool while the
  network runs.
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BadImageError, InputError
from ..io.images import ImageRef, check_image_size, image_size, read_image, resized_size
from ..parallel import check_stop
from ..runtime import autocast, cpu_fusion_dtype, release_free_memory, resolve_device, resolve_precision
from .registry import DEFAULT_MODEL, ContourModel, build_network, get_model
from .weights import resolve_weights

MIN_SIDE = 32  # smaller sides are padded by replication: conv5 (1/16) then still has 2 pixels
TILE_OVERLAP = 256  # pixels shared by neighbouring tiles (HED's deepest side sees ~200 px)
TILE_MARGIN = 64  # pixels next to an inner tile edge that are not used at all (zero-padding effects)
TILE_ALIGN = 32  # tile starts and sizes are multiples of this: keeps the networks' pooling grids (/16, /8) in phase
MIN_TILE_SIDE = TILE_OVERLAP + 2 * TILE_ALIGN  # smaller tiles would be mostly overlap
# Working memory allowed for one tile's forward pass (activations, scratch). With the process and
# the model (~0.4 GiB) and 4.5 bytes per image pixel (the RGB image, the float16 map) it keeps a
# tiled run within 1 GiB + 8 bytes per pixel of the largest image.
TILE_MEMORY_BUDGET = 512 << 20
MAX_BATCH_PIXELS = 4_000_000  # images x pixels per forward pass (bounds activation memory)
MAX_WINDOW_PIXELS = 16_000_000  # pixels decoded ahead together (an image above it is read on its own)


@dataclass
class Detection:
    """Result for one input: the probability map, or the error that prevented it."""

    ref: ImageRef
    edge: np.ndarray | None = None  # (H, W), 0..1: float32, or float16 for tiled images
    error: Exception | None = None


class EdgeDetector:
    """A contour model ready for inference.

    Parameters
    ----------
    model : registry name (``hed-bsds500``, ``pidinet``...) or entry.
    weights_path : weights file; ``None`` uses the verified cache file of ``model``.
    device : ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
    precision : ``auto`` (bf16 on CPUs with AMX/AVX512-BF16 and on CUDA, else fp32; see
        :func:`segsort_unsup.runtime.resolve_precision`), ``fp32``,
        ``bf16`` or ``fp16``.
    scales : image scales whose probabilities are averaged (``(1.0,)``: single scale).
    batch_size : images per forward pass (same-size images only; also capped by pixel count);
        ``None``: 1 on CPU, 8 on CUDA.
    max_side : images (after scaling) with a longer side are tiled, or refused if ``tile=False``;
        images at or below it run whole.
    tile_side : side of those tiles (at most ``max_side``); ``None``: :func:`auto_tile_side` for the
        model and the resolved precision.
    tile_overlap : pixels shared by neighbouring tiles.
    threads : torch intra-op threads (``None``: torch's default).
    """

    def __init__(
        self,
        model: str | ContourModel = DEFAULT_MODEL,
        weights_path: str | os.PathLike | None = None,
        *,
        device: str = "auto",
        precision: str = "auto",
        scales: Sequence[float] = (1.0,),
        batch_size: int | None = None,
        max_side: int = 2048,
        tile_side: int | None = None,
        tile: bool = True,
        tile_overlap: int = TILE_OVERLAP,
        threads: int | None = None,
    ):
        self.entry = get_model(model)
        if not scales or any(not (0.05 <= float(s) <= 8.0) for s in scales):
            raise InputError(f"scales {tuple(scales)}: give one or more factors between 0.05 and 8")
        if batch_size is not None and batch_size < 1:
            raise InputError("batch size must be >= 1")
        if tile_overlap < 4:
            raise InputError(f"tile overlap {tile_overlap} is too small (use at least 4 px)")
        smallest = tile_overlap + 2 * TILE_ALIGN
        for name, side in (("max side", max_side), ("tile side", tile_side)):
            if side is not None and side < smallest:
                raise InputError(f"{name} {side} is too small for tiles overlapping by {tile_overlap} px "
                                 f"(use at least {smallest})")
        if threads is not None:
            torch.set_num_threads(int(threads))
        self.scales = tuple(float(s) for s in scales)
        self.max_side = int(max_side)
        self.tile = tile
        self.tile_overlap = int(tile_overlap)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device, cpu_bf16=self.entry.cpu_bf16)
        self.tile_side = min(self.max_side, int(tile_side) if tile_side is not None
                             else auto_tile_side(self.entry, self.precision))
        # On CPU one image at a time is fastest (measured for HED and PiDiNet: a batch only adds
        # memory traffic); GPUs want batches.
        self.batch_size = int(batch_size) if batch_size is not None else (8 if self.device.type == "cuda" else 1)
        self.weights_path, self.weights_sha256 = resolve_weights(self.entry, weights_path)
        self.network = build_network(self.entry, self.weights_path).to(self.device)
        self.network.requires_grad_(False)
        # channels_last lets oneDNN (CPU) and cuDNN (tensor cores) pick their fast convolutions;
        # on CPU, networks that offer it also pre-cast their weights and fuse conv + ReLU.
        self.fused = False
        fused_dtype = cpu_fusion_dtype(self.precision)
        if self.device.type == "cpu" and fused_dtype is not None and hasattr(self.network, "fuse_for_cpu"):
            self.network.fuse_for_cpu(fused_dtype)
            self.fused = True
        self.channels_last = self.fused or self.precision != "fp32" or self.device.type == "cuda"
        if self.channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)

    # -- arrays -------------------------------------------------------------------------------
    def detect(self, image: np.ndarray) -> np.ndarray:
        """Edge probability ``(H, W)``, 0..1, of one RGB uint8 ``(H, W, 3)`` image.

        float32; float16 for single-scale images above ``max_side`` (tiled: a float32 map of a
        huge image would be its largest array).
        """
        return self.detect_many([image])[0]

    def detect_many(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Edge probabilities of several images; same-size images are batched together."""
        out: list[np.ndarray | None] = [None] * len(images)
        for index, prob in self._run_grouped(list(enumerate(images))):
            if isinstance(prob, Exception):
                raise prob
            out[index] = prob
        return out  # type: ignore[return-value]

    def _run_grouped(self, items: list[tuple[object, np.ndarray]]) -> Iterator[tuple[object, np.ndarray | Exception]]:
        """Probabilities of ``items``, same-size images batched. ``items`` is consumed (emptied), and
        each image is released before its result is yielded: a huge image does not outlive its run."""
        groups: dict[tuple[int, int], list[tuple[object, np.ndarray]]] = defaultdict(list)
        for item in items:
            groups[_check_image(item[1])].append(item)
        item = None  # the loop variable would keep the last image alive as long as this generator
        items.clear()
        while groups:
            h, w = next(iter(groups))
            members = groups.pop((h, w))
            per_batch = max(1, min(self.batch_size, MAX_BATCH_PIXELS // max(1, h * w)))
            while members:
                batch, members[:per_batch] = members[:per_batch], []
                results: list[tuple[object, np.ndarray | Exception]] = []
                stacked = None
                try:
                    stacked = batch[0][1][None] if len(batch) == 1 else np.stack([img for _, img in batch])
                    results = list(zip([tag for tag, _ in batch], self._probabilities(stacked), strict=True))
                except (RuntimeError, BadImageError) as exc:
                    if len(batch) == 1:
                        results = [(batch[0][0], exc)]
                    else:  # retry one by one so one failure does not sink the batch
                        for tag, img in batch:
                            try:
                                results.append((tag, self._probabilities(img[None])[0]))
                            except (RuntimeError, BadImageError) as exc1:
                                results.append((tag, exc1))
                del batch, stacked
                yield from results
                results.clear()

    # -- files --------------------------------------------------------------------------------
    def detect_files(self, refs: Iterable[ImageRef], *, prefetch: int | None = None, read_workers: int = 2,
                     max_pixels: int | None = None, resize_to: int | None = None) -> Iterator[Detection]:
        """Detections for image files, in batches, decoding the next window of images in threads.

        Every header is checked first: missing, empty, unrecognised files and images above
        ``max_pixels`` (after ``resize_to``; see :func:`~segsort_unsup.io.images.read_image`) come
        back at once as a :class:`Detection` with ``error`` set, before anything is decoded. The
        rest are read in windows of at most ``prefetch`` images and :data:`MAX_WINDOW_PIXELS` pixels
        (a larger image has a window of its own, decoded only when its turn comes: two huge images
        are never in memory together); the next window is decoded while the current one runs.
        Results come in window order, and within a window grouped by image size.
        """
        window = prefetch or max(2 * self.batch_size, 8)
        sized: list[tuple[ImageRef, int]] = []
        for ref in refs:
            try:
                w, h = image_size(ref.path)
                check_image_size(ref.path, w, h, max_pixels=max_pixels, resize_to=resize_to)
            except BadImageError as exc:
                yield Detection(ref, error=exc)
                continue
            rw, rh = resized_size(w, h, resize_to)
            sized.append((ref, rw * rh))
        chunks: list[list[ImageRef]] = []
        alone: list[bool] = []  # a window holding one image above MAX_WINDOW_PIXELS: not decoded ahead
        pixels = 0
        for ref, n in sized:
            if not chunks or len(chunks[-1]) >= window or pixels + n > MAX_WINDOW_PIXELS:
                chunks.append([])
                alone.append(n > MAX_WINDOW_PIXELS)
                pixels = 0
            chunks[-1].append(ref)
            pixels += n
        if not chunks:
            return

        def read(ref: ImageRef) -> np.ndarray:
            return read_image(ref.path, max_pixels=max_pixels, resize_to=resize_to)

        pool = ThreadPoolExecutor(max_workers=read_workers, thread_name_prefix="segsort-read")
        try:
            pending = [pool.submit(read, ref) for ref in chunks[0]]
            for k, chunk in enumerate(chunks):
                # a huge image is decoded only when its turn comes, so two never share memory
                current = pending or [pool.submit(read, ref) for ref in chunk]
                ahead = k + 1 < len(chunks) and not alone[k + 1]
                pending = [pool.submit(read, ref) for ref in chunks[k + 1]] if ahead else []
                loaded = []
                for i, ref in enumerate(chunk):
                    try:
                        loaded.append((ref, current[i].result()))
                    except Exception as exc:  # noqa: BLE001 - reported per image
                        yield Detection(ref, error=exc)
                    current[i] = None  # a finished future keeps its image alive
                for ref, prob in self._run_grouped(loaded):
                    if isinstance(prob, Exception):
                        yield Detection(ref, error=prob)
                    else:
                        yield Detection(ref, edge=prob)
        finally:  # Ctrl-C / SIGTERM: do not wait for images still being decoded
            pool.shutdown(wait=False, cancel_futures=True)

    # -- the network --------------------------------------------------------------------------
    @torch.inference_mode()
    def _probabilities(self, images: np.ndarray) -> np.ndarray:
        """``(N, H, W, 3)`` uint8 -> ``(N, H, W)`` probabilities, averaged over the scales.

        float32; float16 for tiled images (above ``max_side``), whose tiles are cut from the uint8
        array (no full-size float copy of the image or of the map is made). Multi-scale tiled
        images are tiled first and each tile is run at every scale (tiles of
        :attr:`multi_scale_tile_side`, so the largest scale's pass keeps to the memory budget).
        """
        n, h, w, _ = images.shape
        if max(h, w) > self.max_side:
            self._check_tiling(h, w)
            out = np.empty((n, h, w), np.float16)

            def tile_of(y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
                return _tensor(images[:, y0:y1, x0:x1]).to(self.device).permute(0, 3, 1, 2).float()

            if self.scales == (1.0,):
                self._run_tiled(tile_of, n, h, w, out)
            else:
                self._run_tiled(tile_of, n, h, w, out, run=self._run_scales, tile_side=self.multi_scale_tile_side)
            return out
        x = _tensor(images).to(self.device).permute(0, 3, 1, 2).float()
        return self._run_scales(x)[:, 0].clamp_(0.0, 1.0).cpu().numpy()

    @property
    def multi_scale_tile_side(self) -> int:
        """Tile side of multi-scale tiled images: ``tile_side`` over the largest upscale (the
        scaled tiles are at most ``tile_side``), on the tile grid, at least the overlap plus two
        grid steps."""
        side = int(self.tile_side / max(1.0, *self.scales)) // TILE_ALIGN * TILE_ALIGN
        return max(self.tile_overlap + 2 * TILE_ALIGN, side)

    def _run_scales(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` float -> ``(N, 1, H, W)`` float32 probabilities averaged over the scales."""
        n, _, h, w = x.shape
        if self.scales == (1.0,):
            return self._run_any_size(x)
        total = torch.zeros((n, 1, h, w), dtype=torch.float32, device=x.device)
        for scale in self.scales:
            if scale == 1.0:
                prob = self._run_any_size(x)
            else:
                sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
                scaled = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False,
                                       antialias=scale < 1.0)
                prob = F.interpolate(self._run_any_size(scaled), size=(h, w), mode="bilinear", align_corners=False)
            total += prob
        total /= len(self.scales)
        return total

    def _check_tiling(self, h: int, w: int) -> None:
        if not self.tile:
            raise BadImageError(
                "<image>", f"{w}x{h} pixels exceeds --max-side {self.max_side}; raise --max-side or allow tiling")

    def _run_any_size(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if max(h, w) > self.max_side:
            self._check_tiling(h, w)
            out = np.empty((n, h, w), np.float32)
            self._run_tiled(lambda y0, y1, x0, x1: x[..., y0:y1, x0:x1], n, h, w, out)
            return torch.from_numpy(out)[:, None].to(x.device)
        if min(h, w) < MIN_SIDE:
            return self._run_padded(x)
        return self._run_network(x)

    def _run_network(self, x: torch.Tensor) -> torch.Tensor:
        # From HWC images the batch arrives channels-last-strided: make the layout the one chosen.
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        with autocast(self.device, self.precision):
            prob = self.network(x)
        return prob.float().contiguous()

    def _run_tile(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_padded(x) if min(x.shape[-2:]) < MIN_SIDE else self._run_network(x)

    def _run_padded(self, x: torch.Tensor) -> torch.Tensor:
        """Pad sides below MIN_SIDE by replicating the border pixels, run, crop back."""
        h, w = x.shape[-2:]
        ph, pw = max(0, MIN_SIDE - h), max(0, MIN_SIDE - w)
        top, left = ph // 2, pw // 2
        padded = F.pad(x, (left, pw - left, top, ph - top), mode="replicate")
        return self._run_network(padded)[..., top : top + h, left : left + w]

    def _run_tiled(self, tile_of, n: int, h: int, w: int, out: np.ndarray, *, run=None,
                   tile_side: int | None = None) -> None:
        """Overlapping tiles of at most ``tile_side`` (default: the detector's), blended over their
        overlaps, into ``out`` (n, h, w).

        ``tile_of(y0, y1, x0, x1)`` gives the float ``(n, 3, y1 - y0, x1 - x0)`` input of one tile,
        ``run(tile)`` its ``(n, 1, ...)`` probabilities (default: one pass of the network).
        Near an inner tile edge HED sees zero padding instead of the image, so each tile drops
        ``margin`` pixels there and ramps its weight up linearly over the rest of the overlap.
        The weights are separable, so their sum is an outer product of two 1-D sums; tiles are
        accumulated in float32 one band of tile rows at a time, and rows no later band reaches
        are normalised and written to ``out``. Working memory: one band plus one tile.
        """
        device = self.device
        side = tile_side or self.tile_side
        run = run or self._run_tile
        ys, xs = _tile_spans(h, side, self.tile_overlap), _tile_spans(w, side, self.tile_overlap)
        wys = [_edge_weights(y1 - y0, y0 > 0, y1 < h, self.tile_overlap, device) for y0, y1 in ys]
        wxs = [_edge_weights(x1 - x0, x0 > 0, x1 < w, self.tile_overlap, device) for x0, x1 in xs]
        norm_y = torch.zeros(h, dtype=torch.float32, device=device)
        for (y0, y1), wy in zip(ys, wys, strict=True):
            norm_y[y0:y1] += wy
        norm_x = torch.zeros(w, dtype=torch.float32, device=device)
        for (x0, x1), wx in zip(xs, wxs, strict=True):
            norm_x[x0:x1] += wx
        band = torch.zeros((n, 0, w), dtype=torch.float32, device=device)
        band_start = 0  # image row of band[:, 0]

        def flush(upto: int) -> None:  # rows band_start..upto are final
            nonlocal band, band_start
            rows = upto - band_start
            if rows <= 0:
                return
            done = band[:, :rows] / (norm_y[band_start:upto, None] * norm_x[None, :])
            out[:, band_start:upto] = done.clamp_(0.0, 1.0).cpu().numpy()
            band, band_start = band[:, rows:], upto

        for (y0, y1), wy in zip(ys, wys, strict=True):
            flush(y0)
            if band_start + band.shape[1] < y1:  # grow the band down to this tile row's end
                grow = torch.zeros((n, y1 - band_start - band.shape[1], w), dtype=torch.float32, device=device)
                band = torch.cat([band, grow], dim=1)
            for (x0, x1), wx in zip(xs, wxs, strict=True):
                check_stop()  # Ctrl-C / SIGTERM within a huge image: stop within one tile
                tile = tile_of(y0, y1, x0, x1)
                prob = run(tile)
                band[:, y0 - band_start : y1 - band_start, x0:x1] += prob[:, 0] * (wy[:, None] * wx[None, :])
                del tile, prob
            release_free_memory()  # freed activations, so that they do not stay resident for later steps
        flush(h)


def auto_tile_side(model: str | ContourModel, precision: str, *, budget: int = TILE_MEMORY_BUDGET) -> int:
    """The largest tile side (a multiple of ``TILE_ALIGN``, at least ``MIN_TILE_SIDE``) whose
    forward pass needs at most ``budget`` bytes, from the model's measured bytes per tile pixel
    (``ContourModel.tile_bytes``; ``bf16`` stands for ``fp16`` too).

    A function of the model and the precision only, so a store's identity does not depend on the
    machine. A model without a figure gets 2048, the fixed side used before.
    """
    entry = get_model(model)
    per_pixel = entry.tile_bytes.get("fp32" if precision == "fp32" else "bf16")
    if not per_pixel:
        return 2048
    side = int((budget / per_pixel) ** 0.5) // TILE_ALIGN * TILE_ALIGN
    return max(MIN_TILE_SIDE, side)


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``array``'s memory, read-only arrays included (decoded images often are:
    they are only read, and copying a huge image just to silence torch's warning would double it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _check_image(image: np.ndarray) -> tuple[int, int]:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", None)
        raise InputError(f"expected an RGB uint8 (H, W, 3) image, got shape {shape} dtype {dtype} (use io.read_image)")
    if min(image.shape[:2]) < 1:
        raise InputError(f"image has no pixels (shape {image.shape})")
    return image.shape[0], image.shape[1]


def _tile_spans(length: int, tile_side: int, overlap: int) -> list[tuple[int, int]]:
    """``(start, end)`` of tiles covering ``0..length``: starts and sizes are multiples of TILE_ALIGN
    (the last tile ends at ``length``), neighbours share at least ``overlap`` pixels."""
    if length <= tile_side:
        return [(0, length)]
    size = max(TILE_ALIGN, tile_side // TILE_ALIGN * TILE_ALIGN)
    step = max(TILE_ALIGN, (size - overlap) // TILE_ALIGN * TILE_ALIGN)
    spans = [(0, size)]
    while spans[-1][1] < length:
        start = spans[-1][0] + step
        spans.append((start, min(start + size, length)))
    return spans


def _edge_weights(length: int, inner_start: bool, inner_end: bool, overlap: int, device: torch.device) -> torch.Tensor:
    """1-D tile weights: 0 within the margin of an inner edge, then a linear ramp up to 1."""
    margin = min(TILE_MARGIN, overlap // 4)
    ramp = max(1, overlap - 2 * margin)
    idx = torch.arange(length, dtype=torch.float32, device=device)
    weight = torch.ones(length, dtype=torch.float32, device=device)
    if inner_start:
        weight = torch.minimum(weight, ((idx - margin + 0.5) / ramp).clamp(0.0, 1.0))
    if inner_end:
        weight = torch.minimum(weight, ((length - 1 - idx - margin + 0.5) / ramp).clamp(0.0, 1.0))
    return weight
