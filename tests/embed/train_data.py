"""A tiny real training set: BSDS500 test photos at half size and the segments of their human
contour maps (OWT-UCM of the annotators' mean boundaries, see tests/ucm/maps.py)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from segsort_unsup.io.images import read_image
from tests.ucm.maps import gt_contour_map

IDS = ("100007", "100039", "100099", "10081")


def make_segments(bsds: Path, root: Path, *, ids=IDS, scale: float = 0.5, levels=(0.3,)) -> tuple[Path, Path]:
    """``(segments store, photo folder)`` under ``root`` (photos resized by ``scale``)."""
    from segsort_unsup.ucm.stage import UcmConfig, run

    images, edges = root / "images", root / "edges"
    images.mkdir(parents=True, exist_ok=True)
    edges.mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        rgb = read_image(bsds / "images" / "test" / f"{image_id}.jpg")
        h, w = round(rgb.shape[0] * scale), round(rgb.shape[1] * scale)
        cv2.imwrite(str(images / f"{image_id}.png"), cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)[..., ::-1])
        edge = gt_contour_map(bsds / "groundTruth" / "test" / f"{image_id}.mat")
        edge = cv2.resize(edge, (w, h), interpolation=cv2.INTER_AREA)
        edge = edge / max(float(edge.max()), 1e-6)
        cv2.imwrite(str(edges / f"{image_id}.png"), np.round(edge * 255).astype(np.uint8))
    store = root / "segments"
    run(UcmConfig(levels=tuple(levels)), edges, store)
    return store, images
