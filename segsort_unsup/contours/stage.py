"""The contours stage: images -> contours store (edge probability + orientation per image).

Store contract (``kind="contours"``), one item per image key:

* ``edge``: float16 ``(H, W)``, probability 0..1;
* ``orientation``: float16 ``(H, W)``, radians in ``[0, pi)``, from :func:`edge_orientation`;
* attrs ``source``, ``height``, ``width``, ``model``, ``weights_sha256``, ``precision``, ``scales``.

The manifest's meta holds ``model`` and ``weights_sha256``. The stage is resumable: items already
in complete shards are skipped, failures are recorded in ``failures.tsv`` and retried next run.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.images import ImageRef, list_images
from ..io.store import Item, StoreWriter
from ..log import get_logger, progress
from ..stage import StageSummary
from .edges import edge_nms, edge_orientation
from .registry import DEFAULT_MODEL, get_model

_log = get_logger("contours")


@dataclass(frozen=True)
class ContoursConfig:
    """Settings of the contours stage.

    ``model``, ``precision``, ``scales``, ``max_side``/``tile`` (tiling changes results for large
    images) and ``orientation_radius`` change the stored maps and are part of the store's config
    hash, together with the weights' sha256; ``device``, ``batch_size``, ``threads`` and
    ``shard_size`` do not change results and are left out of it.
    """

    model: str = DEFAULT_MODEL
    precision: str = "auto"
    scales: tuple[float, ...] = (1.0,)
    device: str = "auto"
    batch_size: int | None = None  # None: 1 on CPU, 8 on CUDA
    max_side: int = 2048
    tile: bool = True
    threads: int | None = None
    orientation_radius: float = 4.0
    shard_size: int = 64
    png_compression: int = 3

    def __post_init__(self) -> None:
        get_model(self.model)  # unknown names fail early with the list of models
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if not self.scales:
            raise InputError("give at least one scale")

    def to_dict(self) -> dict:
        """All settings, JSON-able."""
        data = asdict(self)
        data["scales"] = list(self.scales)
        return data

    def result_config(self, *, weights_sha256: str, precision: str) -> dict:
        """The settings that determine the stored maps (hashed into the store's manifest)."""
        return {
            "stage": "contours",
            "model": self.model,
            "weights_sha256": weights_sha256,
            "precision": precision,
            "scales": list(self.scales),
            "max_side": self.max_side,
            "tile": self.tile,
            "orientation_radius": self.orientation_radius,
        }


def run_contours(
    config: ContoursConfig,
    inputs: str | os.PathLike | list[ImageRef],
    output: str | os.PathLike,
    *,
    weights_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    png_dir: str | os.PathLike | None = None,
    nms_png: bool = False,
) -> StageSummary:
    """Edge maps for every input image into the contours store at ``output``.

    ``inputs`` is a folder, glob, list file or image (see :func:`list_images`) or a list of
    :class:`ImageRef`. With ``png_dir``, 8-bit edge maps are written as ``<png_dir>/<key>.png``
    (and NMS-thinned ones as ``<png_dir>/nms/<key>.png`` with ``nms_png``). Bad images are logged,
    recorded and skipped; the summary lists them.
    """
    from .detect import EdgeDetector  # torch is imported only when the stage runs

    refs = list(inputs) if isinstance(inputs, list) else list_images(inputs)
    detector = EdgeDetector(
        config.model, weights_path, device=config.device, precision=config.precision, scales=config.scales,
        batch_size=config.batch_size, max_side=config.max_side, tile=config.tile, threads=config.threads,
    )
    store_config = config.result_config(weights_sha256=detector.weights_sha256, precision=detector.precision)
    meta = {"model": config.model, "weights_sha256": detector.weights_sha256,
            "weights_file": str(detector.weights_path), "precision": detector.precision,
            "scales": list(config.scales), "device": str(detector.device), "settings": config.to_dict()}
    summary = StageSummary("contours", total=len(refs), output=str(output))
    png_root = Path(png_dir) if png_dir is not None else None
    with StoreWriter(output, kind="contours", config=store_config, meta=meta,
                     shard_size=config.shard_size, overwrite=overwrite) as writer:
        todo = [ref for ref in refs if ref.key not in writer.completed]
        summary.skipped = len(refs) - len(todo)
        if summary.skipped:
            _log.info("%d of %d images already in %s: skipped", summary.skipped, len(refs), output)
        _log.info("contours: %s (%s) on %s, %s, scales %s", config.model, detector.weights_sha256[:12],
                  detector.device, detector.precision, ",".join(f"{s:g}" for s in config.scales))
        bar = progress(total=len(todo), desc="contours")
        try:
            for det in detector.detect_files(todo):
                bar.update(1)
                if det.error is not None:
                    reason = _reason(det.error)
                    _log.warning("%s: %s", det.ref.path, reason)
                    writer.record_failure(det.ref.key, reason)
                    summary.failed.append((det.ref.key, reason))
                    continue
                edge = det.edge
                try:
                    orientation = edge_orientation(edge, radius=config.orientation_radius)
                    if png_root is not None:
                        _write_pngs(png_root, det.ref.key, edge, nms=nms_png, compression=config.png_compression)
                except (ValueError, OSError) as exc:
                    reason = f"post-processing failed: {exc}"
                    _log.warning("%s: %s", det.ref.path, reason)
                    writer.record_failure(det.ref.key, reason)
                    summary.failed.append((det.ref.key, reason))
                    continue
                writer.add(Item(det.ref.key, {
                    "edge": edge.astype(np.float16),
                    "orientation": orientation_float16(orientation),
                }, {
                    "source": str(det.ref.path), "height": int(edge.shape[0]), "width": int(edge.shape[1]),
                    "model": config.model, "weights_sha256": detector.weights_sha256,
                    "precision": detector.precision, "scales": ",".join(f"{s:g}" for s in config.scales),
                }))
                summary.done += 1
        finally:
            bar.close()
    return summary


def orientation_float16(orientation: np.ndarray) -> np.ndarray:
    """Orientation in float16, still in ``[0, pi)``: values that round up to pi wrap to 0 (same line)."""
    out = orientation.astype(np.float16)
    out[out.astype(np.float32) >= np.float32(np.pi)] = 0
    return out


def _reason(error: Exception) -> str:
    reason = getattr(error, "reason", None)
    return reason if reason else (str(error) or type(error).__name__)


def _write_pngs(root: Path, key: str, edge: np.ndarray, *, nms: bool, compression: int) -> None:
    """8-bit PNGs, written to a temporary name and renamed (a killed run leaves no half file)."""
    import cv2

    targets = [(root / f"{key}.png", edge)]
    if nms:  # the evaluation protocol: smooth, orientation of the smoothed map, thin
        targets.append((root / "nms" / f"{key}.png", edge_nms(edge)))
    for path, prob in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        img = np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)
        tmp = path.with_name(f".{path.name}.tmp.png")
        if not cv2.imwrite(str(tmp), img, [cv2.IMWRITE_PNG_COMPRESSION, int(compression)]):
            raise OSError(f"cannot write {path}")
        os.replace(tmp, path)
