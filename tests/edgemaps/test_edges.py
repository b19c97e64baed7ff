import math

import numpy as np
import pytest

from segsort_unsup.edgemaps import edge_nms, edge_orientation, triangle_smooth


def _naive_nms(edge, orient, r=1, s=5, m=1.01):
    """Literal transcription of the NMS definition, pixel by pixel in Python."""
    h, w = edge.shape

    def interp(y, x):
        x = min(max(x, 0.0), w - 1.001)
        y = min(max(y, 0.0), h - 1.001)
        x0, y0 = int(x), int(y)
        dx, dy = x - x0, y - y0
        return (edge[y0, x0] * (1 - dx) * (1 - dy) + edge[y0, x0 + 1] * dx * (1 - dy)
                + edge[y0 + 1, x0] * (1 - dx) * dy + edge[y0 + 1, x0 + 1] * dx * dy)

    out = edge.astype(np.float64).copy()
    for y in range(h):
        for x in range(w):
            e = edge[y, x] * m
            if edge[y, x] == 0:
                continue
            for d in [d for d in range(-r, r + 1) if d]:
                if e < interp(y + d * math.sin(orient[y, x]), x + d * math.cos(orient[y, x])):
                    out[y, x] = 0
                    break
    s = min(s, w // 2, h // 2)
    for x in range(s):
        out[:, x] *= x / s
        out[:, w - 1 - x] *= x / s
    for y in range(s):
        out[y, :] *= y / s
        out[h - 1 - y, :] *= y / s
    return out


def test_nms_matches_naive_on_real_like_map(bsds):
    from skimage.filters import sobel

    from segsort_unsup.io.images import read_image

    img = read_image(bsds / "images" / "test" / "100007.jpg")[:60, :80].mean(axis=2) / 255.0
    edge = sobel(img).astype(np.float32)
    edge /= edge.max()
    smoothed = triangle_smooth(edge, 1)
    orient = edge_orientation(smoothed)
    fast = edge_nms(edge)
    slow = _naive_nms(smoothed, orient)
    np.testing.assert_allclose(fast, slow, atol=1e-5)
    assert 0.05 < (fast > 0.1).mean() < (edge > 0.1).mean()


def test_orientation_on_a_circle_and_thin_ring():
    """On a ring, the toolbox formula gives sign(sin 2t) * atan(tan(t)^2) for normal angle t
    (an approximation of t itself, exact at multiples of 45 degrees), and NMS leaves a 1-px ring."""
    yy, xx = np.mgrid[:101, :101].astype(np.float32)
    radius = np.hypot(yy - 50, xx - 50)
    edge = np.exp(-((radius - 30) ** 2) / 4).astype(np.float32)
    orient = edge_orientation(edge)
    on = (np.abs(radius - 30) < 0.7) & (np.abs(xx - 50) > 2) & (np.abs(yy - 50) > 2)
    theta = np.arctan2(yy - 50, xx - 50)
    expected = np.mod(np.sign(np.sin(2 * theta)) * np.arctan(np.tan(theta) ** 2), np.pi)
    diff = np.abs(orient - expected)[on]
    diff = np.minimum(diff, np.pi - diff)
    assert np.median(diff) < 0.05
    assert orient.min() >= 0 and orient.max() < np.pi
    thin = edge_nms(edge, smooth=0) > 0.5
    ring = np.abs(radius - 30) < 3
    assert not thin[~ring].any()
    # along each of 360 rays, the ring survives with 1 or 2 pixels
    for t in np.linspace(0, 2 * np.pi, 360, endpoint=False):
        rs = np.arange(26, 34.01, 0.25)
        ys = np.round(50 + rs * np.sin(t)).astype(int)
        xs = np.round(50 + rs * np.cos(t)).astype(int)
        hits = {(y, x) for y, x in zip(ys, xs) if thin[y, x]}
        assert 1 <= len(hits) <= 3, (t, hits)


def test_triangle_smooth_matches_definition():
    rng = np.random.default_rng(1)
    img = rng.random((9, 11)).astype(np.float32)
    r = 2
    k = np.array([1, 2, 3, 2, 1], np.float64) / 9
    padded = np.pad(img.astype(np.float64), r, mode="symmetric")
    rows = np.apply_along_axis(lambda v: np.convolve(v, k, "valid"), 1, padded)
    ref = np.apply_along_axis(lambda v: np.convolve(v, k, "valid"), 0, rows)
    np.testing.assert_allclose(triangle_smooth(img, r), ref, atol=1e-6)


def test_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        edge_nms(np.zeros((3, 4, 3)))
    with pytest.raises(ValueError, match="differs"):
        edge_nms(np.zeros((3, 4)), np.zeros((4, 3)))


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (2, 5), (6, 2)])
def test_tiny_maps(shape):
    edge = np.random.default_rng(0).random(shape).astype(np.float32)
    orient = edge_orientation(edge)
    assert orient.shape == shape and np.isfinite(orient).all()
    assert edge_nms(edge).shape == shape
