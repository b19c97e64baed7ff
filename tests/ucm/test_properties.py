"""Properties of the OWT-UCM hierarchy, on real BSDS500 contour maps and against naive references."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import label

from segsort_unsup.ucm.hierarchy import (
    cut_labels,
    labels_from_ucm2,
    mean_boundary_hierarchy,
    ucm2_from_tree,
    ultrametric_contour_map,
)
from segsort_unsup.ucm.owt import watershed_rag

from .grid_oracle import grid_edge_weights, watershed_regions


def _levels(ucm):
    alt = ucm.altitudes[ucm.altitudes > 0]
    return np.unique(np.quantile(alt, [0.0, 0.2, 0.5, 0.8, 0.95, 1.0]))


def test_cuts_are_nested_connected_and_match_ucm2(gt_maps):
    for image_id, edge, orient in gt_maps[:2]:
        ucm = ultrametric_contour_map(edge, orient)
        previous = None
        for t in _levels(ucm):
            labels = ucm.labels(t)
            # same segmentation from the tree and from the ucm2 picture
            np.testing.assert_array_equal(labels, labels_from_ucm2(ucm.ucm2, t), err_msg=f"{image_id} t={t}")
            # every region is one 4-connected component
            assert label(labels + 1, connectivity=1, background=0).max() == labels.max() + 1
            if previous is not None:  # nested: each finer region lies in one coarser region
                pairs = np.unique(previous.astype(np.int64) * (labels.max() + 1) + labels)
                assert pairs.size == previous.max() + 1, f"{image_id}: cut at {t} is not a union of finer regions"
            previous = labels


def test_ultrametric_inequality_on_region_triples(gt_maps):
    _, edge, orient = gt_maps[1]
    ucm = ultrametric_contour_map(edge, orient)
    n = ucm.leaves.max() + 1
    rng = np.random.default_rng(0)
    parents, altitudes = ucm.parents.astype(np.int64), ucm.altitudes

    def dist(a, b):  # naive lowest common ancestor
        up = set()
        while True:
            up.add(a)
            if parents[a] == a:
                break
            a = parents[a]
        while b not in up:
            b = parents[b]
        return altitudes[b]

    for a, b, c in rng.integers(0, n, size=(300, 3)):
        assert dist(a, c) <= max(dist(a, b), dist(b, c)) + 1e-6
    assert np.all(np.diff(altitudes[n:]) >= 0)  # merges in non-decreasing altitude


def test_threshold_zero_gives_the_watershed(gt_maps):
    _, edge, orient = gt_maps[0]
    ucm = ultrametric_contour_map(edge, orient)
    weights, _ = grid_edge_weights(edge)
    leaves, n = watershed_regions(weights, edge.shape)
    np.testing.assert_array_equal(ucm.leaves, leaves)
    assert ucm.altitudes[n:].min() > 0
    np.testing.assert_array_equal(ucm.labels(0.0), leaves)
    np.testing.assert_array_equal(labels_from_ucm2(ucm.ucm2, 0.0), leaves)


def test_ucm2_from_tree_equals_direct_ucm2(gt_maps):
    for _, edge, orient in gt_maps[:2]:
        ucm = ultrametric_contour_map(edge, orient)
        np.testing.assert_array_equal(ucm2_from_tree(ucm.parents, ucm.altitudes, ucm.leaves), ucm.ucm2)


def test_ucm2_layout():
    # two flat basins split by a vertical ridge in column 2: boundary between columns 1|2 or 2|3
    edge = np.zeros((4, 5), np.float32)
    edge[:, 2] = 1.0
    ucm = ultrametric_contour_map(edge)
    assert ucm.ucm2.shape == (9, 11)
    assert ucm.leaves.max() == 1
    assert np.all(ucm.ucm2[1::2, 1::2] == 0)  # pixels
    np.testing.assert_array_equal(ucm.ucm2[0], ucm.ucm2[1])  # frame = copy of its neighbours (BSR)
    np.testing.assert_array_equal(ucm.ucm2[:, -1], ucm.ucm2[:, -2])
    cols = np.nonzero(ucm.ucm2[1::2, :].max(axis=0))[0]
    assert cols.size == 1 and cols[0] in (4, 6)  # one vertical boundary on an even column
    assert np.all(ucm.ucm2[:, cols[0]] == 0.5)  # mean of the ridge pixel and a flat pixel


def test_watershed_against_naive_minima_count():
    # a watershed cut has one basin per regional minimum (plateau) of the edge weights
    rng = np.random.default_rng(1)
    edge = np.round(rng.random((30, 40)) * 8).astype(np.float32)
    weights, _ = grid_edge_weights(edge)
    rag = watershed_rag(edge)
    leaves, n = rag.leaves, rag.n_regions
    h, w = edge.shape
    wh = weights[: h * w].reshape(h, w)[:, :-1]
    wv = weights[h * w:].reshape(h, w)[:-1, :]
    # naive: minima of the edge-weighted graph = components of minimal edges no lower edge touches
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    fminus = np.full((h, w), np.inf)
    fminus[:, :-1] = np.minimum(fminus[:, :-1], wh)
    fminus[:, 1:] = np.minimum(fminus[:, 1:], wh)
    fminus[:-1, :] = np.minimum(fminus[:-1, :], wv)
    fminus[1:, :] = np.minimum(fminus[1:, :], wv)
    idx = np.arange(h * w).reshape(h, w)
    src, dst, val = [], [], []
    for a, b, v in ((idx[:, :-1], idx[:, 1:], wh), (idx[:-1, :], idx[1:, :], wv)):
        src.append(a.ravel()); dst.append(b.ravel()); val.append(v.ravel())
    src, dst, val = map(np.concatenate, (src, dst, val))
    fm = fminus.ravel()
    # a minimum is a connected set of edges of one weight k whose vertices touch no lower edge
    level = (val == fm[src]) & (val == fm[dst])
    graph = coo_matrix((np.ones(level.sum()), (src[level], dst[level])), shape=(h * w, h * w))
    _, comp = connected_components(graph, directed=False)
    in_level = np.zeros(h * w, bool)
    in_level[src[level]] = in_level[dst[level]] = True
    spoiled = np.zeros(h * w, bool)  # a component reaching a lower vertex through a level edge
    for a, b in ((src, dst), (dst, src)):
        bad = (val == fm[a]) & (fm[b] < fm[a]) & in_level[a]
        spoiled[comp[a[bad]]] = True
    minima = set(comp[in_level]) - set(np.nonzero(spoiled)[0])
    assert n == len(minima)
    assert np.array_equal(np.unique(leaves), np.arange(n))


def test_cut_labels_validates():
    with pytest.raises(ValueError):
        cut_labels(np.array([1, 1], np.int32), np.zeros(2, np.float32), threshold=0.5)
    labels = cut_labels(np.array([2, 2, 2]), np.array([0, 0, 0.4]), threshold=0.5)
    assert labels.tolist() == [0, 0]
    assert cut_labels(np.array([2, 2, 2]), np.array([0, 0, 0.4]), threshold=0.3).tolist() == [0, 1]


def test_mean_boundary_merge_against_naive():
    # greedy average linkage, written out naively on a small real RAG
    rng = np.random.default_rng(2)
    edge = rng.random((24, 32)).astype(np.float32)
    ows = watershed_rag(edge)
    parents, altitudes, _ = mean_boundary_hierarchy(ows)
    sums = {(int(a), int(b)): (s, l) for a, b, s, l in zip(ows.sources, ows.targets, ows.sums, ows.lengths)}
    n = ows.n_regions
    expected = []
    node = n
    while sums:
        (a, b), _ = min(sums.items(), key=lambda kv: (kv[1][0] / kv[1][1]))
        s, l = sums.pop((a, b))
        expected.append(s / l)
        merged = {}
        for (u, v), (su, lu) in list(sums.items()):
            if u in (a, b) or v in (a, b):
                other = v if u in (a, b) else u
                del sums[(u, v)]
                ps, pl = merged.get(other, (0.0, 0.0))
                merged[other] = (ps + su, pl + lu)
        for other, val in merged.items():
            sums[(other, node)] = val
        node += 1
    np.testing.assert_allclose(np.maximum.accumulate(expected), altitudes[n:], rtol=1e-5)


def test_bsds_tools_read_the_same_segmentation(gt_maps, sobel_maps):
    # BSR's benchmark labels ucm2 <= t with bwlabel's default 8-connectivity and keeps [1::2, 1::2]
    for _, edge, orient in (gt_maps[3], sobel_maps[0]):
        ucm = ultrametric_contour_map(edge, orient)
        for t in _levels(ucm):
            bsds = label(ucm.ucm2 <= t, connectivity=2, background=0)[1::2, 1::2] - 1
            np.testing.assert_array_equal(bsds, ucm.labels(t))
