"""The contours stage: images -> contours store (edge probability + orientation per image).

Store contract (``kind="contours"``, schema in :mod:`segsort_unsup.io.store`), one item per image key:

* ``edge``: float16 ``(H, W)``, probability 0..1;
* ``orientation``: float16 ``(H, W)``, radians in ``[0, pi)``, from :func:`edge_orientation`;
* attrs ``source`` (absolute path), ``height``, ``width``, ``model``, ``weights_sha256``, ``precision``, ``scales``.

In-process, images are decoded ahead in threads and batched by size; on local processes or Dask,
every worker process loads the model once and runs images one at a time.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import PRECISIONS, StageConfig, config_hash, run_only, setting
from ..errors import SegsortError
from ..io.atomic import atomic_write_bytes
from ..io.outdir import OutputFolder, key_path, prepare_exports, settle_exports
from ..io.images import DEFAULT_MAX_PIXELS, ImageRef, list_images, read_image
from ..io.sources import item_sources
from ..io.store import Item
from ..log import get_logger
from ..parallel import Executor, InProcess, inference_threads, use_torch_threads
from ..stages import Stage, StageRun, StageSummary
from ..edgemaps import edge_nms, edge_orientation
from .registry import DEFAULT_MODEL, MODELS

_log = get_logger("contours")


@dataclass(frozen=True)
class ContoursConfig(StageConfig):
    """Settings of the contours stage.

    ``model``, ``precision``, ``scales``, ``max_side``/``tile_side``/``tile`` (tiling changes results
    for large images), ``resize_to`` and ``orientation_radius`` change the stored maps and form the
    store's identity with the weights' sha256, the precision and the tile side that ``auto`` values
    resolve to; the run-only rest does not (``max_pixels`` only decides which images are refused,
    never what an accepted image gives).

    ``max_side`` decides which images are tiled (those with a longer side); ``tile_side`` how large
    their tiles are (at most ``max_side``). Its default (None, "auto") is the largest side whose
    forward pass fits the detector's memory budget for the model and precision
    (:func:`~segsort_unsup.contours.detect.auto_tile_side`).
    """

    stage = "contours"

    model: str = setting(DEFAULT_MODEL, help="Contour model (see `segsort-unsup weights list`).",
                         choices=tuple(MODELS))
    precision: str = setting("auto", help="auto: bf16 on CPUs with AMX/AVX512-BF16 and on CUDA, else fp32.",
                             choices=PRECISIONS)
    scales: tuple[float, ...] = setting((1.0,), help="Comma-separated image scales whose edge maps are averaged, "
                                                     "e.g. 0.5,1,1.5.", low=0.05, high=8.0)
    max_side: int = setting(2048, help="Images with a longer side are processed in overlapping tiles; smaller ones "
                                       "run whole.", low=320)
    tile_side: int | None = setting(None, help="Side of those tiles (at most --max-side). auto: the largest whose "
                                               "forward pass needs at most 512 MiB for the model and precision "
                                               "(smaller tiles: less memory, a little more compute).",
                                    auto=True, low=320, metavar="auto|SIDE")
    tile: bool = setting(True, help="--no-tile: refuse images above --max-side instead of tiling them.")
    orientation_radius: float = setting(4.0, help="Radius (pixels) of the triangle filter smoothing the edge map "
                                                  "before the orientation is computed.", low=0)
    resize_to: int | None = setting(None, help="Scale images whose longer side is above SIDE down to SIDE (maps are "
                                               "stored at that size).", low=32, metavar="SIDE")
    max_pixels: int = run_only(DEFAULT_MAX_PIXELS, help="Refuse images with more pixels (after --resize-to), read "
                                                        "from the header before decoding; 0: no limit. Memory needed: "
                                                        "about 1 GiB + 8 bytes per pixel of the largest tiled image.",
                               low=0)
    weights: str | None = run_only(None, help="Weights file to use instead of the cached one of --model (any "
                                              "supported format).")
    device: str = run_only("auto", help="auto, cpu, cuda or cuda:N.")
    batch_size: int | None = run_only(None, help="Same-size images per forward pass (default: 1 on CPU, where "
                                                 "batches only add memory traffic; 8 on CUDA).", low=1)
    threads: int | None = run_only(None, help="Torch threads per image [default: 1, in every executor, so that "
                                              "every executor gives the same bits; workers give the parallelism]. "
                                              "More speed up a few huge images; the maps then differ in the last "
                                              "bits.", low=1)
    shard_size: int = run_only(64, help="Items per HDF5 shard (a killed run redoes at most this many).", low=1)
    png_dir: str | None = run_only(None, help="Also write 8-bit edge PNGs here (<key>.png).", writes=True)
    nms_png: bool = run_only(False, help="With --png-dir: also write NMS-thinned edges (nms/<key>.png).")
    png_compression: int = run_only(3, help="PNG compression level of those pictures (0-9).", low=0, high=9)

    def validate(self) -> None:
        if self.model not in MODELS:
            raise self.bad_value("model", f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.precision not in PRECISIONS:
            raise self.bad_value("precision", f"choose one of {', '.join(PRECISIONS)}")
        if not self.scales or any(not (0.05 <= s <= 8.0) for s in self.scales):
            raise self.bad_value("scales", "give one or more scale factors between 0.05 and 8, e.g. [0.5, 1.0]")
        if self.max_side < 320:
            raise self.bad_value("max_side", "must be >= 320")
        if self.tile_side is not None and self.tile_side < 320:
            raise self.bad_value("tile_side", "must be >= 320 (or omitted: auto)")
        for key in ("shard_size", "batch_size", "threads"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise self.bad_value(key, "must be >= 1")
        if self.max_pixels < 0:
            raise self.bad_value("max_pixels", "must be >= 0 (0: no limit)")
        if self.resize_to is not None and self.resize_to < 32:
            raise self.bad_value("resize_to", "must be >= 32 (a longer side in pixels)")
        if self.nms_png and not self.png_dir:
            raise self.bad_value("nms_png", "needs png_dir")


@dataclass(frozen=True)
class _Job:
    """One image for a worker process (small and picklable)."""

    key: str
    path: str
    config: ContoursConfig
    threads: int | None


_DETECTORS: dict[Any, Any] = {}


def _detector(config: ContoursConfig, threads: int | None):
    """The model of this worker process (loaded once per process and configuration)."""
    from .detect import EdgeDetector

    cache_key = (config.model, config.weights, config.device, config.precision, config.scales, config.max_side,
                 config.tile_side, config.tile, config.batch_size, threads)
    detector = _DETECTORS.get(cache_key)
    if detector is None:
        _DETECTORS.clear()
        detector = _DETECTORS[cache_key] = EdgeDetector(
            config.model, config.weights, device=config.device, precision=config.precision, scales=config.scales,
            batch_size=config.batch_size, max_side=config.max_side, tile_side=config.tile_side, tile=config.tile,
            threads=threads)
    return detector


def process_image(job: _Job) -> Item:
    """Edge map of one image (module-level: local worker processes and Dask tasks run it)."""
    detector = _detector(job.config, job.threads)
    use_torch_threads(job.threads)
    edge = detector.detect(read_image(job.path, max_pixels=job.config.max_pixels, resize_to=job.config.resize_to))
    return _item(job.key, job.path, edge, job.config, detector)


def _item(key: str, source: str, edge: np.ndarray, config: ContoursConfig, detector) -> Item:
    """Orientation, optional PNGs, and the stored item for one edge map."""
    orientation = edge_orientation(edge, radius=config.orientation_radius, dtype=np.float16)
    edge = edge.astype(np.float16, copy=False)  # what is stored (tiled maps already are)
    if config.png_dir:  # from the stored map: a PNG redone from the store has the same bytes
        _write_pngs(Path(config.png_dir), key, edge, nms=config.nms_png, compression=config.png_compression)
    return Item(key, {"edge": edge, "orientation": orientation}, {
        "source": source, "height": int(edge.shape[0]), "width": int(edge.shape[1]),
        "model": config.model, "weights_sha256": detector.weights_sha256,
        "precision": detector.precision, "scales": ",".join(f"{s:g}" for s in config.scales),
    })


def _weights_identity(config: ContoursConfig) -> tuple[str, str, str]:
    """(weights file, its sha256, the precision 'auto' resolves to) without building the network."""
    from ..runtime import resolve_device, resolve_precision
    from .registry import get_model
    from .weights import resolve_weights

    entry = get_model(config.model)
    path, sha256 = resolve_weights(entry, config.weights)
    device = resolve_device(config.device)
    return str(path), sha256, resolve_precision(config.precision, device, cpu_bf16=entry.cpu_bf16)


def tile_side(config: ContoursConfig, precision: str) -> int:
    """The side of the tiles of images above ``max_side``: ``tile_side`` or the automatic one, at
    most ``max_side`` (what :class:`~segsort_unsup.contours.detect.EdgeDetector` uses)."""
    from .detect import auto_tile_side

    side = config.tile_side if config.tile_side is not None else auto_tile_side(config.model, precision)
    return min(config.max_side, side)


def run(config: ContoursConfig, inputs: str | os.PathLike | list[ImageRef], output: str | os.PathLike, *,
        executor: Executor | None = None, overwrite: bool | str = False) -> StageSummary:
    """Edge maps for every input image into the contours store at ``output``.

    ``inputs`` is a folder, glob, list file or image (see :func:`list_images`) or a list of
    :class:`ImageRef`. Bad images are logged, recorded and skipped; the summary lists them.
    """
    executor = executor or InProcess()
    refs = list(inputs) if isinstance(inputs, list) else list_images(inputs)
    weights_file, weights_sha256, precision = _weights_identity(config)
    tiles = {"tile_side": tile_side(config, precision)} if config.tile else {}
    identity = config.identity(weights_sha256=weights_sha256, precision=precision, **tiles)
    meta = {"model": config.model, "weights_sha256": weights_sha256, "weights_file": weights_file,
            "precision": precision, "scales": list(config.scales), **tiles, "settings": config.to_dict()}
    with contextlib.ExitStack() as stack:
        run = stack.enter_context(StageRun("contours", output, kind="contours", identity=identity, meta=meta,
                                           overwrite=overwrite, shard_size=config.shard_size,
                                           sources=item_sources(refs)))
        pngs = stack.enter_context(_png_folder(config, identity, overwrite)) if config.png_dir else None
        if pngs is not None:
            prepare_exports(pngs, [ref.key for ref in refs], targets=lambda key: _png_targets(config, key))
        stored_before = set(run.writer.completed)
        _log.info("contours: %s (%s), %s, scales %s, tiles of %s above %d px, on %s", config.model,
                  weights_sha256[:12], precision, ",".join(f"{s:g}" for s in config.scales),
                  tiles.get("tile_side", "none"), config.max_side, executor.describe())
        if isinstance(executor, InProcess):
            _run_batched(run, config, refs)
        else:
            threads = inference_threads(config.threads)  # the same in every executor: the same bits
            jobs = [_Job(ref.key, os.path.abspath(ref.path), config, threads) for ref in refs]
            run.run_jobs(executor, process_image, jobs, desc="contours")
        if pngs is not None:
            run.writer.flush()
            _settle_pngs(pngs, run, config, output, stored_before, {ref.key for ref in refs})
    return run.summary


def _png_targets(config: ContoursConfig, key: str) -> list[Path]:
    root = Path(config.png_dir)
    return [key_path(root, key, ".png")] + ([key_path(root, key, ".png", folder="nms")] if config.nms_png else [])


def _png_folder(config: ContoursConfig, identity: dict[str, Any], overwrite: bool | str) -> OutputFolder:
    """The PNG export folder: made from this store's maps, with these PNG settings."""
    return OutputFolder(config.png_dir, kind="contours-png", overwrite=overwrite,
                        identity={"store_identity": config_hash(identity), "nms_png": config.nms_png,
                                  "png_compression": config.png_compression})


def _settle_pngs(folder: OutputFolder, run: StageRun, config: ContoursConfig, store: str | os.PathLike,
                 stored_before: set[str], inputs: set[str]) -> None:
    """Record the PNGs this run wrote; redo from the store those of items stored without them."""
    from ..io.store import StoreReader

    with StoreReader(store, kind="contours") as reader:
        def redo(key: str) -> None:
            edge = reader.read(key, ("edge",)).arrays["edge"]
            _write_pngs(folder.path, key, edge, nms=config.nms_png, compression=config.png_compression)

        keys = sorted(run.writer.completed & inputs)  # items of inputs no longer given are left alone
        failed = settle_exports(folder, keys, targets=lambda key: _png_targets(config, key),
                                fresh=run.writer.completed - stored_before, redo=redo)
    for key, reason in failed:
        _log.warning("contours: %s: %s", key, reason)
    run.summary.failed.extend(failed)


def _run_batched(run: StageRun, config: ContoursConfig, refs: list[ImageRef]) -> None:
    """In-process: decode ahead in threads, batch same-size images, record each result."""
    from ..log import progress

    todo = run.todo(refs)
    if not todo:
        return
    threads = inference_threads(config.threads)
    detector = _detector(config, threads)
    use_torch_threads(threads)
    with progress(total=len(todo), desc="contours") as bar:
        for det in detector.detect_files(todo, max_pixels=config.max_pixels, resize_to=config.resize_to):
            bar.update(1)
            if det.error is not None:
                run.fail(det.ref.key, det.error)
                continue
            try:
                item = _item(det.ref.key, os.path.abspath(det.ref.path), det.edge, config, detector)
            except (ValueError, OSError, SegsortError) as exc:
                run.fail(det.ref.key, f"post-processing failed: {exc}")
                continue
            run.add(item)


def _write_pngs(root: Path, key: str, edge: np.ndarray, *, nms: bool, compression: int) -> None:
    """8-bit PNGs, each appearing whole (a killed run leaves no half file)."""
    import cv2

    edge = np.asarray(edge, np.float32)
    targets = [(key_path(root, key, ".png"), edge)]
    if nms:  # the evaluation protocol: smooth, orientation of the smoothed map, thin
        targets.append((key_path(root, key, ".png", folder="nms"), edge_nms(edge)))
    for path, prob in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        img = np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)
        ok, encoded = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
        if not ok:
            raise OSError(f"cannot encode {path}")
        atomic_write_bytes(path, encoded.tobytes())


STAGE = Stage("contours", ContoursConfig, run, sources=("input",), output="contours", input_paths=("weights",),
              help="edge probability + orientation per image")
