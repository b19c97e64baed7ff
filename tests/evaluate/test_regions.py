"""Region measures against naive definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from segsort_unsup.evaluate import regions as R
from segsort_unsup.ucm.hierarchy import labels_from_ucm2


def _naive_ri(a, b):
    a, b = a.ravel(), b.ravel()
    agree = total = 0
    for i, j in itertools.combinations(range(a.size), 2):
        agree += (a[i] == a[j]) == (b[i] == b[j])
        total += 1
    return agree / total


def _entropy(labels):
    _, counts = np.unique(labels, return_counts=True)
    p = counts / counts.sum()
    return -(p * np.log2(p)).sum()


def _naive_vi(a, b):
    joint = a.ravel() * 1000 + b.ravel()
    return 2 * _entropy(joint) - _entropy(a) - _entropy(b)  # H(A|B) + H(B|A)


@pytest.mark.parametrize("seed", range(5))
def test_rand_index_and_vi_match_definitions(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 5, (6, 7))
    b = rng.integers(1, 4, (6, 7))
    ri, vi = R.rand_index_voi(a, b)
    assert ri == pytest.approx(_naive_ri(a, b))
    assert vi == pytest.approx(_naive_vi(a, b))


def _naive_covering(seg, gts):
    """Covering of the humans by seg: sum |G| max_S Jaccard(G, S) / sum |G|, label 0 ignored."""
    num = den = 0.0
    for gt in gts:
        for g in np.unique(gt[gt > 0]):
            gm = gt == g
            best = max((np.sum(gm & (seg == s)) / np.sum(gm | (seg == s)) for s in np.unique(seg[seg > 0])),
                       default=0.0)
            num += gm.sum() * best
            den += gm.sum()
    return num / den


def test_covering_matches_definition():
    rng = np.random.default_rng(3)
    seg = rng.integers(1, 6, (12, 10))
    gts = [rng.integers(1, 4, (12, 10)), rng.integers(1, 3, (12, 10))]
    counts = R.region_counts([seg], gts)
    assert counts.cnt_r[0] / counts.sum_r[0] == pytest.approx(_naive_covering(seg, gts))
    # the reverse covering swaps the roles (machine regions by their best human region, any human)
    num = sum((seg == s).sum() * max(np.sum((seg == s) & (g == k)) / np.sum((seg == s) | (g == k))
                                     for g in gts for k in np.unique(g)) for s in np.unique(seg))
    assert counts.cnt_p[0] / counts.sum_p[0] == pytest.approx(num / seg.size)


def test_ucm2_cut_recovers_regions():
    seg = np.array([[1, 1, 2, 2],
                    [1, 1, 2, 2],
                    [3, 3, 3, 3]])
    h, w = seg.shape
    ucm2 = np.zeros((2 * h + 1, 2 * w + 1))
    strength = {(1, 2): 0.8, (1, 3): 0.4, (2, 3): 0.6}  # saliency of each shared border
    level = np.vectorize(lambda a, b: 0.0 if a == b else strength[(min(a, b), max(a, b))])
    # edges between 4-neighbours with different labels; vertices take the max of their edges
    ucm2[1::2, 2:-1:2] = level(seg[:, :-1], seg[:, 1:])
    ucm2[2:-1:2, 1::2] = level(seg[:-1, :], seg[1:, :])
    ucm2[2:-1:2, 2:-1:2] = np.maximum.reduce([ucm2[1:-2:2, 2:-1:2], ucm2[3::2, 2:-1:2],
                                              ucm2[2:-1:2, 1:-2:2], ucm2[2:-1:2, 3::2]])
    ucm2[0, :] = ucm2[-1, :] = ucm2[:, 0] = ucm2[:, -1] = 1  # image border
    for connectivity, order in ((8, "F"), (4, "C")):  # BSR's cut, and ours: the same on a proper ucm2
        def cut(t):
            return labels_from_ucm2(ucm2, t, connectivity=connectivity, order=order)

        fine = cut(0.3)
        assert len(np.unique(fine)) == 3
        assert all(len(np.unique(fine[seg == k])) == 1 for k in (1, 2, 3))
        coarse = cut(0.5)  # the weak 0.4 border disappears: regions 1 and 3 merge
        assert len(np.unique(coarse)) == 2 and coarse[0, 0] == coarse[2, 3] != coarse[0, 3]
        mid = cut(0.7)  # the 0.6 border goes too: 1 and 2 connect through 3
        assert len(np.unique(mid)) == 1
        assert len(np.unique(cut(0.9))) == 1
    # the benchmark's cuts carry BSR's ids: from 1, numbered in MATLAB's column-major scan
    segs = [seg.copy() for seg in R.ucm2_segmentations(ucm2, np.array([0.3, 0.5]))]
    np.testing.assert_array_equal(segs[0], [[1, 1, 3, 3], [1, 1, 3, 3], [2, 2, 2, 2]])
    np.testing.assert_array_equal(segs[1], [[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 1, 1]])


def test_float32_ucm2_cuts_as_float64():
    """A stored (float32) ucm2 is cut without a float64 copy, and exactly as its float64 copy is:
    also at thresholds just below a float32 level (float32(0.3) > 0.3)."""
    rng = np.random.default_rng(5)
    h, w = 30, 40
    ucm2 = np.zeros((2 * h + 1, 2 * w + 1), np.float32)
    levels = np.array([0.1, 0.3, 0.3 + 1e-9, 0.5, 0.7], np.float32)
    ucm2[::2, :] = rng.choice(levels, ucm2[::2, :].shape)
    ucm2[:, ::2] = rng.choice(levels, ucm2[:, ::2].shape)
    thresholds = np.array([0.05, 0.1, 0.2, 0.25, 0.3, np.float64(np.float32(0.3)), 0.31, 0.5, 0.69, 0.9])
    got = list(R.ucm2_segmentations(ucm2, thresholds))
    want = list(R.ucm2_segmentations(ucm2.astype(np.float64), thresholds))
    assert len(got) == len(want) == len(thresholds)
    for g, x in zip(got, want):
        assert g.dtype == np.int32 and np.array_equal(g, x)
    assert got[3] is got[2]  # no level between 0.2 and 0.25: the same cut again
    assert not np.array_equal(got[4], got[5])  # 0.3 < float32(0.3): the cut at 0.3 keeps those borders
    gts = [rng.integers(1, 4, (h, w)), rng.integers(1, 6, (h, w)).astype(np.uint16)]
    a = R.region_counts_ucm2(ucm2, gts, thresholds=thresholds)
    b = R.region_counts([s.astype(np.int64) for s in want], [g.astype(np.int64) for g in gts], thresholds=thresholds)
    for name in ("cnt_r", "sum_r", "cnt_p", "sum_p", "ri", "voi"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.cnt_r_best == b.cnt_r_best


def test_bsr_cut_joins_pixels_through_a_low_corner():
    """8-connectivity (BSR's bwlabel) joins the pixels around a corner that is below its boundaries;
    4-connectivity (the merge tree's cut) keeps them apart."""
    ucm2 = np.ones((5, 5))
    ucm2[1::2, 1::2] = 0  # pixels
    ucm2[2, 2] = 0  # a corner lower than its four boundaries (possible in other tools' ucm2 files)
    four = labels_from_ucm2(ucm2, 0.5)
    assert len(np.unique(four)) == 4 and four.min() == 0
    eight = labels_from_ucm2(ucm2, 0.5, connectivity=8)
    np.testing.assert_array_equal(eight, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="connectivity"):
        labels_from_ucm2(ucm2, 0.5, connectivity=6)
