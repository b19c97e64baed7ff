"""The ``ucm`` stage: contour maps -> OWT-UCM hierarchies in a resumable segments store.

Input is a contours store (``segsort-unsup contours``) or edge-probability images (a folder,
glob, list file or one PNG: 8-bit maps are scaled by 1/255, 16-bit by 1/65535). Each item
gets ``ucm2`` (float32, BSDS doubled grid), the merge tree ``parents``/``altitudes``, the
pixel-to-leaf map ``leaves`` (so any cut is ``cut_labels(parents, altitudes, threshold=t)[leaves]``),
``labels`` at the configured threshold and, with levels, ``labels_levels``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadImageError, InputError, StoreError
from ..io.images import list_images
from ..io.store import MANIFEST_NAME, Item, StoreReader, StoreWriter, config_hash
from ..log import get_logger
from ..parallel import map_items
from ..stage import StageSummary
from .hierarchy import cut_labels, ultrametric_contour_map

log = get_logger("ucm")


@dataclass(frozen=True)
class UcmConfig:
    """Configuration of the ucm stage (hashed into the store; a change needs ``--overwrite``).

    threshold : cut stored as ``labels`` (regions joined by boundaries of strength <= threshold).
    levels : further cuts stored as ``labels_levels`` (in this order).
    oriented : apply the oriented watershed transform (needs an orientation; computed from the
        edge map with ``edge_orientation`` when the input has none).
    epsilon, min_size : arc splitting of the oriented watershed transform.
    """

    threshold: float = 0.5
    levels: tuple[float, ...] = field(default_factory=tuple)
    oriented: bool = True
    epsilon: float = 0.1
    min_size: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(float(v) for v in self.levels))
        for value in (self.threshold, *self.levels):
            if not np.isfinite(value) or value < 0:
                raise InputError(f"ucm thresholds must be finite and >= 0, got {value}")
        if self.epsilon < 0 or self.min_size < 0:
            raise InputError("epsilon and min_size must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["levels"] = list(self.levels)
        return d


@dataclass(frozen=True)
class _Job:
    key: str
    kind: str  # "store" or "image"
    path: str  # store root or image path
    config: UcmConfig


_READERS: dict[str, StoreReader] = {}


def _reader(root: str) -> StoreReader:
    reader = _READERS.get(root)
    if reader is None:
        reader = _READERS[root] = StoreReader(root, kind="contours", required=("edge",))
    return reader


def read_edge_png(path: str | os.PathLike) -> np.ndarray:
    """An edge-probability image as float32 (H, W) in [0, 1] (colour images are averaged)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise BadImageError(path, "file not found")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file (format not recognised)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(path, f"cannot decode edge map: {exc or type(exc).__name__}") from None
    if arr.ndim == 3:
        arr = arr[..., :3].astype(np.float32).mean(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    if arr.ndim != 2 or arr.size == 0:
        raise BadImageError(path, f"unsupported edge map shape {arr.shape}")
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise BadImageError(path, "edge map holds NaN or inf values")
        return np.clip(arr.astype(np.float32), 0, None)
    top = 65535.0 if (arr.dtype.itemsize > 1 and arr.max(initial=0) > 255) else 255.0
    return arr.astype(np.float32) / np.float32(top)


def _load(job: _Job) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    if job.kind == "store":
        item = _reader(job.path).read(job.key)
        edge = np.asarray(item.arrays["edge"], dtype=np.float32)
        orient = item.arrays.get("orientation")
        if orient is not None:
            orient = np.asarray(orient, dtype=np.float32)
        if not np.isfinite(edge).all():
            raise BadImageError(f"{job.path}:{job.key}", "stored edge map holds NaN or inf values")
        return edge, orient, {"source": str(item.attrs.get("source", ""))}
    return read_edge_png(job.path), None, {"source": job.path}


def process_item(job: _Job) -> Item:
    """OWT-UCM of one contour map (module-level so worker processes can run it)."""
    edge, orient, attrs = _load(job)
    cfg = job.config
    if cfg.oriented and orient is None:
        from ..contours.edges import edge_orientation

        orient = edge_orientation(edge)
    ucm = ultrametric_contour_map(edge, orient if cfg.oriented else None, epsilon=cfg.epsilon, min_size=cfg.min_size)
    arrays: dict[str, np.ndarray] = {
        "ucm2": ucm.ucm2,
        "parents": ucm.parents,
        "altitudes": ucm.altitudes,
        "leaves": ucm.leaves.astype(np.int32),
        "labels": cut_labels(ucm.parents, ucm.altitudes, threshold=cfg.threshold)[ucm.leaves].astype(np.int32),
    }
    if cfg.levels:
        arrays["labels_levels"] = np.stack(
            [cut_labels(ucm.parents, ucm.altitudes, threshold=t)[ucm.leaves] for t in cfg.levels]
        ).astype(np.int32)
    attrs.update(
        height=int(edge.shape[0]),
        width=int(edge.shape[1]),
        n_regions=int(ucm.leaves.max()) + 1,
        threshold=float(cfg.threshold),
    )
    return Item(job.key, arrays, attrs)


def _reason(error: BaseException) -> str:
    """One line for a failed item: library errors speak for themselves, others name their type."""
    if isinstance(error, (BadImageError, StoreError, ValueError)):
        return str(error) or type(error).__name__
    return f"{type(error).__name__}: {error}"


def _jobs(source: Path, config: UcmConfig) -> tuple[list[_Job], dict[str, Any]]:
    if source.is_dir() and (source / MANIFEST_NAME).is_file():
        reader = StoreReader(source, kind="contours", required=("edge",))
        meta = {
            "source": str(source.resolve()),
            "source_store": str(source.resolve()),
            "weights_sha256": str(reader.meta.get("weights_sha256", "")),
            "model": str(reader.meta.get("model", "")),
        }
        keys = reader.keys()
        reader.close()
        if not keys:
            raise InputError(f"{source}: the contours store holds no items; run `segsort-unsup contours` first")
        return [_Job(key, "store", str(source.resolve()), config) for key in keys], meta
    refs = list_images(source)
    meta = {"source": str(source), "source_store": "", "weights_sha256": "", "model": ""}
    return [_Job(ref.key, "image", str(ref.path), config) for ref in refs], meta


def run_ucm(
    config: UcmConfig,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    workers: int = 1,
    overwrite: bool = False,
    png_dir: str | os.PathLike | None = None,
    mat_dir: str | os.PathLike | None = None,
    shard_size: int = 64,
) -> StageSummary:
    """Compute the OWT-UCM of every contour map in ``source`` into the segments store ``output``.

    Items already in the store are skipped (resume); items that fail are logged with the
    reason, recorded in ``failures.tsv`` and reported in the summary, and the rest go on.
    ``png_dir`` receives ucm and label PNGs and an overview picture per item; ``mat_dir``
    BSDS-compatible ``.mat`` files holding ``ucm2``.
    """
    source = Path(source)
    jobs, meta = _jobs(source, config)
    summary = StageSummary("ucm", total=len(jobs), output=str(output))
    # The input is part of what the store is: resuming onto another source must be refused.
    store_config = {**config.to_dict(), "source": meta["source"], "weights_sha256": meta["weights_sha256"]}
    meta["config_hash"] = config_hash(store_config)
    try:
        _write(config, store_config, jobs, meta, summary, output, workers=workers, overwrite=overwrite,
               png_dir=png_dir, mat_dir=mat_dir, shard_size=shard_size)
    finally:
        for reader in _READERS.values():  # in-process runs read the contours store here
            reader.close()
        _READERS.clear()
    return summary


def _write(config: UcmConfig, store_config: dict[str, Any], jobs: list[_Job], meta: dict[str, Any],
           summary: StageSummary, output, *, workers: int, overwrite: bool, png_dir, mat_dir,
           shard_size: int) -> None:
    """Run the jobs not yet in the store, saving results and failures as they come."""
    with StoreWriter(output, kind="segments", config=store_config, meta=meta,
                     shard_size=shard_size, overwrite=overwrite) as writer:
        todo = [job for job in jobs if job.key not in writer.completed]
        summary.skipped = len(jobs) - len(todo)
        for outcome in map_items(process_item, todo, workers=workers, desc="ucm"):
            key = outcome.item.key
            if not outcome.ok:
                reason = _reason(outcome.error)
                log.warning("%s: skipped (%s)", key, reason)
                writer.record_failure(key, reason)
                summary.failed.append((key, reason))
                continue
            item = outcome.result
            item.attrs.update(
                source_store=meta["source_store"],
                weights_sha256=meta["weights_sha256"],
                config_hash=meta["config_hash"],
            )
            writer.add(item)
            summary.done += 1
            if png_dir is not None or mat_dir is not None:
                from .export import export_item

                try:
                    edge = _load(outcome.item)[0] if png_dir is not None else None
                    export_item(item, config, png_dir=png_dir, mat_dir=mat_dir, source_store=meta["source_store"],
                                edge=edge)
                except Exception as exc:  # noqa: BLE001 - an export problem must not lose the stored result
                    log.warning("%s: export failed (%s)", key, exc)
