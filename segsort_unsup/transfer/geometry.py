"""Region geometry joined to prototypes: where a segment sits and what shape it has, label-free.

An option of the transfer stage (``geometry = W``), outside the released protocol, whose
prototypes are the embedding alone. Each segment's box and area give five scalars (:data:`SCALARS`):
log aspect (height / width), vertical centre y/H, the horizontal centre's distance from the
image's middle (so a mirrored view gives the same value), fill (area / box area) and log relative
area. Each is clipped to its range, mapped to an angle t in [0, pi/2] and written as (cos t, sin t);
the ten values, divided by sqrt(5), are a unit vector g whose inner product with another is the
mean cosine of the five angle differences. A prototype e becomes ``[e, W g] / sqrt(1 + W^2)``, a
unit row again, so the cosine of two joined rows is ``(e.e' + W^2 g.g') / (1 + W^2)``: the
embedding's similarity and the geometry's, weighted 1 : W^2. Every scalar is the same in every
view of an image (scales keep ratios, a flip keeps the distance from the middle).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: The scalars and the range each is clipped to before it becomes an angle.
SCALARS: dict[str, tuple[float, float]] = {
    "log_aspect": (-2.5, 2.5),
    "centre_y": (0.0, 1.0),
    "centre_x_offset": (0.0, 1.0),
    "fill": (0.0, 1.0),
    "log_area": (-12.0, 0.0),
}
DIMENSIONS = 2 * len(SCALARS)


def region_scalars(bbox: np.ndarray, area: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
    """The :data:`SCALARS` of segments with boxes ``bbox`` (K, 4) ``y0, x0, y1, x1`` (exclusive) and
    pixel counts ``area`` (K,) in an image of ``height`` x ``width``."""
    box = np.asarray(bbox, np.float64).reshape(-1, 4)
    pixels = np.maximum(np.asarray(area, np.float64).reshape(-1), 1.0)
    tall = np.maximum(box[:, 2] - box[:, 0], 1.0)
    wide = np.maximum(box[:, 3] - box[:, 1], 1.0)
    return {
        "log_aspect": np.log(tall / wide),
        "centre_y": (box[:, 0] + box[:, 2]) / 2.0 / height,
        "centre_x_offset": np.abs((box[:, 1] + box[:, 3]) / 2.0 / width - 0.5) * 2.0,
        "fill": pixels / (tall * wide),
        "log_area": np.log(pixels / (height * width)),
    }


def region_geometry(bbox: np.ndarray, area: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(K, 10)`` float32 unit rows: each scalar of :func:`region_scalars` as (cos t, sin t) of its
    angle t in [0, pi/2], divided by sqrt(5)."""
    values = region_scalars(bbox, area, height, width)
    columns = []
    for name, (low, high) in SCALARS.items():
        angle = (np.clip(values[name], low, high) - low) / (high - low) * (np.pi / 2)
        columns += [np.cos(angle), np.sin(angle)]
    return (np.stack(columns, axis=1) / np.sqrt(len(SCALARS))).astype(np.float32)


def join_geometry(prototypes: np.ndarray, geometry: np.ndarray, weight: float) -> np.ndarray:
    """``[e, weight * g] / |.|``: unit prototypes ``(K, D)`` joined to their :func:`region_geometry`."""
    joined = np.concatenate([np.asarray(prototypes, np.float32), np.float32(weight) * geometry], axis=1)
    joined /= np.maximum(np.linalg.norm(joined, axis=1, keepdims=True), 1e-12)
    return joined


def item_geometry(item: Any) -> np.ndarray:
    """:func:`region_geometry` of a prototypes-store item (its ``bbox``, ``area`` and image size)."""
    arrays, attrs = item.arrays, item.attrs
    height = attrs.get("height") or arrays["segments"].shape[0]
    width = attrs.get("width") or arrays["segments"].shape[1]
    return region_geometry(arrays["bbox"], arrays["area"], int(height), int(width))
