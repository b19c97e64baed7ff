"""The thumbnail map's grid snapping and colours, against direct restatements."""

from __future__ import annotations

import numpy as np

from segsort_unsup.discover.maps import group_colours, snap_to_grid


def test_snap_keeps_the_point_nearest_each_cell_centre():
    rng = np.random.default_rng(4)
    xy = rng.normal(size=(700, 2)) * np.array([3.0, 1.0])
    cols, rows = 9, 7
    kept, cells = snap_to_grid(xy, cols, rows)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    expected = {}
    for i, (x, y) in enumerate(xy):  # one point at a time, as a person would do it
        u = (x - lo[0]) / (hi[0] - lo[0]) * cols
        v = (y - lo[1]) / (hi[1] - lo[1]) * rows
        c, r = min(int(u), cols - 1), min(int(v), rows - 1)
        d = (u - c - 0.5) ** 2 + (v - r - 0.5) ** 2
        if (r * cols + c) not in expected or d < expected[r * cols + c][0]:
            expected[r * cols + c] = (d, i)
    assert dict(zip(cells.tolist(), kept.tolist())) == {cell: i for cell, (_, i) in expected.items()}
    assert len(set(cells.tolist())) == len(cells)


def test_group_colours_are_distinct_css_colours():
    colours = group_colours(60)
    assert len(set(colours)) == 60 and all(len(c) == 7 and c.startswith("#") for c in colours)
    rgb = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in colours[:12]], float)
    gaps = np.linalg.norm(rgb[:, None] - rgb[None], axis=2)[~np.eye(12, dtype=bool)]
    assert gaps.min() > 25  # the first dozen (the largest groups) are told apart
