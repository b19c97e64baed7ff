"""The ``ucm`` stage: contour maps -> OWT-UCM hierarchies in a resumable segments store.

Input is a contours store (``segsort-unsup contours``) or edge-probability images (a folder,
glob, list file or one PNG: 8-bit maps are scaled by 1/255, 16-bit by 1/65535). Each item
gets ``ucm2`` (BSDS doubled grid; float32, or uint16-quantised for huge maps: read it with
:func:`~segsort_unsup.ucm.hierarchy.ucm2_values`), the merge tree ``parents``/``altitudes``, the
pixel-to-leaf map ``leaves`` (so any cut is ``cut_labels(parents, altitudes, threshold=t)[leaves]``),
``labels`` at the configured threshold and, with levels, ``labels_levels``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import StageConfig, config_hash, run_only, setting
from ..errors import BadImageError, InputError
from ..io.images import list_images, read_edge_png
from ..io.outdir import OutputFolder, prepare_exports, settle_exports
from ..io.sources import item_sources
from ..io.store import DeferredArray, Item, StoreReader, cached_reader, is_store
from ..log import get_logger
from ..parallel import Executor, InProcess
from ..stages import Stage, StageRun, StageSummary
from ._kernels import any_half_nonfinite
from .hierarchy import (UCM2_SCALE_ATTR, cut_labels, mean_boundary_hierarchy, quantise_ucm2, ucm2_from_regions,
                        ucm2_scale)
from .owt import watershed_rag

log = get_logger("ucm")


#: With ``ucm2_dtype`` unset, maps above this many pixels get a uint16 ucm2 (a float32 one would
#: take 256 MiB and more); BSDS500 and CamVid images stay far below it.
UINT16_ABOVE_PIXELS = 1 << 24


def ucm2_dtype_for(config: "UcmConfig", pixels: int) -> str:
    """The ucm2 dtype ``config`` gives a map of ``pixels`` pixels."""
    if config.ucm2_dtype is not None:
        return config.ucm2_dtype
    return "uint16" if pixels > UINT16_ABOVE_PIXELS else "float32"


@dataclass(frozen=True)
class UcmConfig(StageConfig):
    """Settings of the ucm stage.

    threshold : cut stored as ``labels`` (regions joined by boundaries of strength <= threshold).
    levels : further cuts stored as ``labels_levels`` (in this order).
    oriented : apply the oriented watershed transform (needs an orientation; computed from the
        edge map with ``edge_orientation`` when the input has none).
    epsilon, min_size : arc splitting of the oriented watershed transform.
    ucm2_dtype : ``"float32"``, ``"uint16"`` (quantised: altitudes ``[0, max]`` to ``0..65535``, the
        step in the item attribute ``ucm2_scale``; read it with :func:`~segsort_unsup.ucm.ucm2_values`)
        or unset: float32 up to :data:`UINT16_ABOVE_PIXELS` pixels, uint16 above (8 bytes per pixel
        less for huge images). The tree, ``leaves`` and ``labels`` are exact either way.
    """

    stage = "ucm"

    threshold: float = setting(0.5, help="Cut stored as `labels` (boundaries weaker than this are removed).", low=0)
    levels: tuple[float, ...] = setting((), help="More cuts stored as `labels_levels`, e.g. 0.3,0.5,0.7.", low=0,
                                        metavar="T1,T2,...")
    oriented: bool = setting(True, help="--no-owt skips the oriented watershed transform (plain mean boundary "
                                        "strength).", flags=("--owt/--no-owt",))
    epsilon: float = setting(0.1, help="OWT: an arc is split where it strays from its chord by this fraction "
                                       "of the chord's length...", low=0)
    min_size: float = setting(2.0, help="...and by more than this many pixels.", low=0)
    ucm2_dtype: str | None = setting(None, help="Stored ucm2 type; default float32, uint16-quantised (65535 steps "
                                                "of the largest altitude) above 16.8 Mpx. The tree and labels are "
                                                "exact either way.", choices=("float32", "uint16"))
    shard_size: int = run_only(64, help="Items per HDF5 shard (a killed run redoes at most this many).", low=1)
    png_dir: str | None = run_only(None, help="Also write ucm PNGs, label PNGs and an overview picture per image "
                                              "here.", writes=True)
    mat_dir: str | None = run_only(None, help="Also write BSDS-compatible .mat files (variable ucm2) here.",
                                   writes=True)

    def validate(self) -> None:
        for key, values in (("threshold", (self.threshold,)), ("levels", self.levels)):
            if any(not np.isfinite(v) or v < 0 for v in values):
                raise self.bad_value(key, "thresholds must be finite and >= 0")
        if self.epsilon < 0:
            raise self.bad_value("epsilon", "must be >= 0")
        if self.min_size < 0:
            raise self.bad_value("min_size", "must be >= 0")
        if self.ucm2_dtype not in (None, "float32", "uint16"):
            raise self.bad_value("ucm2_dtype", "must be 'float32' or 'uint16' (unset: uint16 for huge images only)")
        if self.shard_size < 1:
            raise self.bad_value("shard_size", "must be >= 1")


@dataclass(frozen=True)
class _Job:
    key: str
    kind: str  # "store" or "image"
    path: str  # store root or image path
    config: UcmConfig


def _finite(arr: np.ndarray) -> bool:
    if arr.dtype == np.float16:
        return not any_half_nonfinite(np.ascontiguousarray(arr).reshape(-1).view(np.uint16))
    return bool(np.isfinite(arr).all())


def _load(job: _Job) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    if job.kind == "store":
        item = cached_reader(job.path, kind="contours").read(job.key)
        # float16 as stored: the kernels decode it exactly, so no float32 copies of the maps
        edge = np.asarray(item.arrays["edge"])
        orient = item.arrays.get("orientation")
        if orient is not None:
            orient = np.asarray(orient)
        if not _finite(edge):
            raise BadImageError(f"{job.path}:{job.key}", "stored edge map holds NaN or inf values")
        return edge, orient, {"source": str(item.attrs.get("source", ""))}
    return read_edge_png(job.path), None, {"source": job.path}


def pixel_cut(parents: np.ndarray, altitudes: np.ndarray, leaves: np.ndarray, threshold: float) -> np.ndarray:
    """Pixel labels ``(H, W)`` int32 of the tree's cut at ``threshold`` (a segments item's ``labels``)."""
    return cut_labels(parents, altitudes, threshold=threshold)[leaves]


def pixel_cuts(parents: np.ndarray, altitudes: np.ndarray, leaves: np.ndarray,
               thresholds: tuple[float, ...]) -> np.ndarray:
    """Pixel labels ``(L, H, W)`` int32 of the tree's cuts at ``thresholds`` (``labels_levels``)."""
    out = np.empty((len(thresholds), *leaves.shape), np.int32)
    for i, t in enumerate(thresholds):
        np.take(cut_labels(parents, altitudes, threshold=t), leaves, out=out[i])
    return out


def process_item(job: _Job) -> Item:
    """OWT-UCM of one contour map (module-level so worker processes and Dask tasks can run it).

    The steps of :func:`ultrametric_contour_map` on the lean path (:func:`watershed_rag`: no
    per-grid-edge arrays, float16 maps read as stored), each full-size array dropped as soon as it
    is no longer needed: the input maps after the watershed, the RAG's per-edge sums once merged.
    """
    cfg = job.config
    if cfg.png_dir or cfg.mat_dir:  # a key that cannot name its exports fails before any work
        from .export import export_paths

        export_paths(job.key, png_dir=cfg.png_dir, mat_dir=cfg.mat_dir)
    edge, orient, attrs = _load(job)
    h, w = edge.shape
    if cfg.oriented and orient is None:
        from ..edgemaps import edge_orientation

        orient = edge_orientation(edge)
    rag = watershed_rag(edge, orient if cfg.oriented else None, epsilon=cfg.epsilon, min_size=cfg.min_size)
    exported_edge = edge if cfg.png_dir or cfg.mat_dir else None
    del edge, orient
    parents, altitudes, rag_alt = mean_boundary_hierarchy(rag, consume=True)
    leaves, offsets, targets = rag.leaves, rag.offsets, rag.targets
    del rag  # its spent per-edge sums, lengths and sources (20 bytes per RAG edge) before the ucm2
    if ucm2_dtype_for(cfg, h * w) == "uint16":
        scale = ucm2_scale(altitudes)
        attrs[UCM2_SCALE_ATTR] = scale
        rag_alt = quantise_ucm2(rag_alt, scale)  # painted straight into a uint16 ucm2
    ucm2 = ucm2_from_regions(leaves, offsets, targets, rag_alt)
    del offsets, targets, rag_alt
    exports = bool(cfg.png_dir or cfg.mat_dir)
    # A huge map's labels are cut when the store writes them, after its ucm2 is on disk and let go
    # (written one dataset at a time: 12 bytes per pixel at the peak instead of the item's 16).
    stream = h * w > UINT16_ABOVE_PIXELS and not exports
    cut = (parents, altitudes, leaves)
    arrays: dict[str, Any] = {
        "ucm2": ucm2,
        "parents": parents,
        "altitudes": altitudes,
        "leaves": leaves,  # int32 already: stored as is, no copy
        "labels": DeferredArray(pixel_cut, (*cut, cfg.threshold), (h, w), np.dtype(np.int32)),
    }
    if cfg.levels:
        arrays["labels_levels"] = DeferredArray(pixel_cuts, (*cut, cfg.levels), (len(cfg.levels), h, w),
                                                np.dtype(np.int32))
    if not stream:
        arrays = {name: np.asarray(value) for name, value in arrays.items()}
    del ucm2
    attrs.update(
        height=int(h),
        width=int(w),
        n_regions=int(leaves.max()) + 1,
        threshold=float(cfg.threshold),
    )
    item = Item(job.key, arrays, attrs, stream=stream)
    if exports:
        from .export import export_item

        try:
            export_item(item, cfg, png_dir=cfg.png_dir, mat_dir=cfg.mat_dir,
                        source_store=job.path if job.kind == "store" else "", edge=exported_edge)
        except Exception as exc:  # noqa: BLE001 - an export problem must not lose the stored result
            log.warning("%s: export failed (%s); retried from the store", job.key, exc)
    return item


def source_identity(source: Path) -> dict[str, Any]:
    """Provenance of the input: a contours store's identity hash and weights, or the images' folder."""
    if is_store(source):
        with StoreReader(source, kind="contours") as reader:
            if not len(reader):
                raise InputError(f"{source}: the contours store holds no items; run `segsort-unsup contours` first")
            return {"source_identity": reader.config_hash,
                    "weights_sha256": str(reader.meta.get("weights_sha256", ""))}
    return {"source_identity": os.path.abspath(source), "weights_sha256": ""}


def _jobs(source: Path, config: UcmConfig) -> list[_Job]:
    if is_store(source):
        with StoreReader(source, kind="contours") as reader:
            keys = reader.keys()
            if reader.damaged:
                log.warning("%s: %d damaged shard(s) of the contours store skipped; re-run contours to redo them",
                            source, len(reader.damaged))
        root = os.path.abspath(source)
        return [_Job(key, "store", root, config) for key in keys]
    if (source / "store.json").exists():
        StoreReader(source, kind="contours")  # raises the store's own, precise error
    return [_Job(ref.key, "image", os.path.abspath(ref.path), config) for ref in list_images(source)]


def _announce_compilation() -> None:
    """Say once that the first run compiles the numba kernels (otherwise the first image looks stuck)."""
    cache = Path(__file__).resolve().parent / "__pycache__"
    if not os.environ.get("NUMBA_CACHE_DIR") and not any(cache.glob("_kernels.*.nbi")):
        log.info("first run: compiling the OWT-UCM kernels (about 15 s, once; cached for later runs)")


def run(config: UcmConfig, inputs: str | os.PathLike, output: str | os.PathLike, *,
        executor: Executor | None = None, overwrite: bool | str = False) -> StageSummary:
    """Compute the OWT-UCM of every contour map in ``inputs`` into the segments store ``output``.

    Items already in the store are skipped (resume); items that fail are logged with the
    reason, recorded in ``failures.tsv`` and reported in the summary, and the rest go on.
    """
    source = Path(inputs)
    _announce_compilation()
    provenance = source_identity(source)
    jobs = _jobs(source, config)
    identity = config.identity(**provenance)
    meta = {"source": os.path.abspath(source), **provenance}
    with contextlib.ExitStack() as stack:
        run = stack.enter_context(StageRun("ucm", output, kind="segments", identity=identity, meta=meta,
                                           overwrite=overwrite, shard_size=config.shard_size,
                                           sources=item_sources(source)))
        exports = [(stack.enter_context(folder), dirs) for folder, dirs in _export_folders(config, identity, overwrite)]
        if exports:
            from .export import export_paths

            for folder, dirs in exports:
                prepare_exports(folder, [job.key for job in jobs],
                                targets=lambda key, dirs=dirs: export_paths(key, **dirs))
        stored_before = set(run.writer.completed)
        run.run_jobs(executor or InProcess(), process_item, jobs, desc="ucm")
        if exports:
            run.writer.flush()
            _settle_exports(exports, run, config, output, jobs, stored_before)
    return run.summary


def _export_folders(config: UcmConfig, identity: dict[str, Any],
                    overwrite: bool | str) -> list[tuple[OutputFolder, dict[str, str]]]:
    """The export folders (one when ``png_dir`` and ``mat_dir`` are the same), each with the
    ``export_item`` arguments it holds; made from this store's items."""
    dirs = {name: value for name, value in (("png_dir", config.png_dir), ("mat_dir", config.mat_dir)) if value}
    if len(dirs) == 2 and Path(config.png_dir).resolve() == Path(config.mat_dir).resolve():
        groups = [dirs]
    else:
        groups = [{name: value} for name, value in dirs.items()]
    store_identity = config_hash(identity)
    folders = []
    for group in groups:
        kind = "ucm-" + "+".join(name[:3] for name in group)
        folders.append((OutputFolder(next(iter(group.values())), kind=kind, overwrite=overwrite,
                                     identity={"store_identity": store_identity}), group))
    return folders


def _settle_exports(exports: list[tuple[OutputFolder, dict[str, str]]], run: StageRun, config: UcmConfig,
                    store: str | os.PathLike, jobs: list[_Job], stored_before: set[str]) -> None:
    """Record the exports this run wrote; redo from the store those of items stored without them."""
    from .export import export_item, export_paths

    by_key = {job.key: job for job in jobs}
    keys = sorted(run.writer.completed & by_key.keys())  # items of inputs no longer given are left alone
    with StoreReader(store, kind="segments") as reader:
        for folder, dirs in exports:
            def redo(key: str, dirs: dict[str, str] = dirs) -> None:
                job = by_key[key]
                edge = _load(job)[0]
                export_item(reader.read(key), config, **dirs, edge=edge,
                            source_store=job.path if job.kind == "store" else "")

            failed = settle_exports(folder, keys, targets=lambda key, dirs=dirs: export_paths(key, **dirs),
                                    fresh=run.writer.completed - stored_before, redo=redo)
            for key, reason in failed:
                log.warning("ucm: %s: %s", key, reason)
            run.summary.failed.extend(failed)


STAGE = Stage("ucm", UcmConfig, run, sources=("contours",), output="segments", arguments=("source",),
              help="OWT-UCM segment hierarchies")
