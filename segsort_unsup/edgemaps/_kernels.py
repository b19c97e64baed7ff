"""Numba kernels for edge maps: no I/O, inputs already validated (C-contiguous float32)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, inline="always")
def _bilinear(img, y, x):
    h, w = img.shape
    # Clamp as Dollar's edgesNms does: stay strictly inside the last cell.
    if x < 0.0:
        x = 0.0
    elif x > w - 1.001:
        x = w - 1.001
    if y < 0.0:
        y = 0.0
    elif y > h - 1.001:
        y = h - 1.001
    x0 = int(x)
    y0 = int(y)
    dx = x - x0
    dy = y - y0
    return (img[y0, x0] * (1.0 - dx) * (1.0 - dy) + img[y0, x0 + 1] * dx * (1.0 - dy)
            + img[y0 + 1, x0] * (1.0 - dx) * dy + img[y0 + 1, x0 + 1] * dx * dy)


@njit(cache=True, nogil=True)
def edge_nms_kernel(edge, orientation, radius, border, multiplier, out):
    """Suppress pixels not maximal along the orientation's normal, then fade the border."""
    h, w = edge.shape
    for y in range(h):
        for x in range(w):
            e = edge[y, x]
            out[y, x] = e
            if e == 0.0:
                continue
            e = e * multiplier
            c = np.cos(orientation[y, x])
            s = np.sin(orientation[y, x])
            for d in range(-radius, radius + 1):
                if d == 0:
                    continue
                if e < _bilinear(edge, y + d * s, x + d * c):
                    out[y, x] = 0.0
                    break
    b = min(border, w // 2, h // 2)
    if b > 0:
        for x in range(b):
            f = np.float32(x / b)
            for y in range(h):
                out[y, x] *= f
                out[y, w - 1 - x] *= f
        for y in range(b):
            f = np.float32(y / b)
            for x in range(w):
                out[y, x] *= f
                out[h - 1 - y, x] *= f
