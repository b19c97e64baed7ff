"""Edge-map post-processing: orientation (for OWT) and non-maximum suppression (for evaluation).

A package of its own below the stages: ``contours`` (writes thinned PNGs and orientations),
``ucm`` (orientation for the oriented watershed) and ``evaluate`` (NMS before the boundary
benchmark) all use it, and none of them needs another stage for it. Kernels live in
``_kernels`` (numba).

Both follow Dollar's Structured Edge toolbox, as used by the HED, RCF and PiDiNet BSDS500
evaluations (``convTri``, ``gradient2``, ``edgesNmsMex``), so thinned maps are comparable with
published numbers.
"""

from __future__ import annotations

import cv2
import numpy as np

from ._kernels import edge_nms_kernel

__all__ = ["edge_nms", "edge_orientation", "triangle_smooth"]


def _as_map(edge: np.ndarray, name: str = "edge") -> np.ndarray:
    edge = np.asarray(edge)
    if edge.ndim != 2 or min(edge.shape) < 1:
        raise ValueError(f"{name} must be a 2-D (H, W) array, got shape {edge.shape}")
    if not np.issubdtype(edge.dtype, np.floating) and not np.issubdtype(edge.dtype, np.integer):
        raise ValueError(f"{name} must be numeric, got {edge.dtype}")
    return np.ascontiguousarray(edge, dtype=np.float32)


def triangle_smooth(image: np.ndarray, radius: float) -> np.ndarray:
    """Dollar's ``convTri``: separable triangle filter, symmetric padding.

    ``radius >= 1`` uses the kernel ``[1..r+1..1] / (r+1)^2``; ``0 < radius < 1`` the 3-tap
    ``[1, p, 1] / (2 + p)`` with ``p = 12 / r / (r + 2) - 2``; ``radius == 0`` returns a copy.
    """
    img = _as_map(image, "image")
    if radius <= 0:
        return img.copy()
    if radius < 1:
        p = 12.0 / radius / (radius + 2.0) - 2.0
        kernel = np.array([1.0, p, 1.0], np.float32) / (2.0 + p)
    else:
        r = int(round(radius))
        kernel = np.concatenate([np.arange(1, r + 2), np.arange(r, 0, -1)]).astype(np.float32) / (r + 1) ** 2
    pad = len(kernel) // 2
    padded = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REFLECT)  # 'symmetric' in MATLAB
    out = cv2.sepFilter2D(padded, cv2.CV_32F, kernel, kernel, borderType=cv2.BORDER_CONSTANT)
    return np.ascontiguousarray(out[pad:-pad, pad:-pad])


STRIP_PIXELS = 4_000_000  # maps above this are oriented in strips of rows (bounded working memory)


def edge_orientation(edge: np.ndarray, *, radius: float = 4, dtype: type = np.float32) -> np.ndarray:
    """Orientation (radians in ``[0, pi)``) of the normal to the edges, from second derivatives.

    ``O = mod(atan(Oyy * sign(-Oxy) / (Oxx + 1e-5)), pi)`` on the map smoothed by a triangle
    filter of ``radius``; x runs along columns, y along rows. ``dtype`` float32 or float16 (values
    that round up to pi wrap to 0, the same line). Maps above :data:`STRIP_PIXELS` are done in
    strips of rows with a halo wide enough that every row sees exactly the full-map computation,
    so the working memory is a few strips, not a dozen full-size float32 arrays.
    """
    if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float16)):
        raise ValueError(f"dtype must be float32 or float16, got {np.dtype(dtype)}")
    edge = np.asarray(edge)
    if edge.ndim != 2 or min(edge.shape) < 1:
        raise ValueError(f"edge must be a 2-D (H, W) array, got shape {edge.shape}")
    h, w = edge.shape
    halo = int(np.ceil(radius)) + 4  # triangle filter reach + two nested central differences (+1 spare)
    rows = max(4 * halo, STRIP_PIXELS // max(1, w))
    if h * w <= STRIP_PIXELS or h <= rows:
        return _wrap_cast(_orientation(edge, radius), dtype)
    out = np.empty((h, w), dtype)
    for a in range(0, h, rows):
        b = min(h, a + rows)
        lo, hi = max(0, a - halo), min(h, b + halo)
        out[a:b] = _wrap_cast(_orientation(edge[lo:hi], radius)[a - lo : b - lo], dtype)
    return out


def _wrap_cast(orient: np.ndarray, dtype: type) -> np.ndarray:
    if np.dtype(dtype) == np.float32:
        return orient
    out = orient.astype(dtype)
    out[out.astype(np.float32) >= np.float32(np.pi)] = 0
    return out


def _orientation(edge: np.ndarray, radius: float) -> np.ndarray:
    smoothed = triangle_smooth(edge, radius)
    h, w = smoothed.shape
    if h < 3 or w < 3:  # np.gradient needs 2+ samples per axis: replicate, then crop back
        smoothed = np.pad(smoothed, ((0, max(0, 3 - h)), (0, max(0, 3 - w))), mode="edge")
    oy, ox = np.gradient(smoothed)
    del smoothed
    _, oxx = np.gradient(ox)
    del ox, _
    oyy, oxy = np.gradient(oy)
    del oy
    with np.errstate(divide="ignore", invalid="ignore"):  # oxx = -1e-5 exactly happens on quantised maps
        orient = np.arctan(oyy * np.sign(-oxy) / (oxx + 1e-5))
    orient[np.isnan(orient)] = 0.0  # 0 / 0: a flat spot has no orientation
    orient = np.mod(orient[:h, :w], np.pi).astype(np.float32)
    orient[orient >= np.float32(np.pi)] = 0.0  # float32 rounding can land exactly on pi
    return orient


def edge_nms(
    edge: np.ndarray,
    orientation: np.ndarray | None = None,
    *,
    radius: int = 1,
    border: int = 5,
    multiplier: float = 1.01,
    smooth: float = 1,
) -> np.ndarray:
    """Thin an edge-probability map by non-maximum suppression along the edge normal.

    As the BSDS evaluations of HED/RCF/PiDiNet do: smooth with a triangle filter of radius
    ``smooth``, compare each pixel (times ``multiplier``) with its bilinear neighbours at
    distances ``1..radius`` along ``orientation``, then fade the ``border`` pixels to zero
    linearly. ``orientation`` defaults to :func:`edge_orientation` of the smoothed map, which is
    the evaluation protocol exactly; pass ``smooth=0`` and a stored orientation to skip both.

    Returns a float32 ``(H, W)`` map with the surviving pixels' (smoothed) values.
    """
    edge = _as_map(edge)
    if smooth > 0:
        edge = triangle_smooth(edge, smooth)
    if orientation is None:
        orientation = edge_orientation(edge)
    orientation = _as_map(orientation, "orientation")
    if orientation.shape != edge.shape:
        raise ValueError(f"orientation shape {orientation.shape} differs from edge shape {edge.shape}")
    if radius < 1 or border < 0 or multiplier <= 0:
        raise ValueError("radius must be >= 1, border >= 0, multiplier > 0")
    out = np.empty_like(edge)
    edge_nms_kernel(edge, orientation, int(radius), int(border), np.float32(multiplier), out)
    return out
