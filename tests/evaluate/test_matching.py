"""Pixel correspondence and thinning against independent references (scipy, scikit-image)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
import scipy.io as sio
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from skimage.morphology import thin as sk_thin

from segsort_unsup.evaluate import _kernels as K
from segsort_unsup.evaluate import boundaries as B


def _scipy_objective(indptr, cols, costs, n_cols, outlier, rows=None):
    """Optimal cost of the outlier assignment by scipy's LAPJVsp (rows: optional subset)."""
    n_all = len(indptr) - 1
    rows = np.arange(n_all) if rows is None else np.asarray(rows)
    if len(rows) == 0:
        return 0
    r_idx, c_idx, w = [], [], []
    for new, r in enumerate(rows):
        seg = slice(indptr[r], indptr[r + 1])
        r_idx += [new] * (indptr[r + 1] - indptr[r])
        c_idx += list(cols[seg])
        w += list(costs[seg])
        r_idx.append(new)
        c_idx.append(n_cols + new)  # private outlier column
        w.append(outlier)
    # +1 keeps zero-cost edges explicit; a full matching has exactly len(rows) edges
    mat = csr_matrix((np.array(w, float) + 1, (r_idx, c_idx)), shape=(len(rows), n_cols + len(rows)))
    ri, ci = min_weight_full_bipartite_matching(mat)
    return int(round(mat[ri, ci].sum())) - len(rows)


def _random_problem(rng, n_rows, n_cols, density):
    indptr = [0]
    cols, costs = [], []
    for _ in range(n_rows):
        js = np.flatnonzero(rng.random(n_cols) < density)
        cols += list(js)
        costs += list(rng.integers(0, 50, len(js)))
        indptr.append(len(cols))
    return (np.array(indptr, np.int64), np.array(cols, np.int64), np.array(costs, np.int64))


@pytest.mark.parametrize("seed", range(12))
def test_assignment_is_optimal(seed):
    rng = np.random.default_rng(seed)
    n_rows, n_cols = rng.integers(1, 40, 2)
    indptr, cols, costs = _random_problem(rng, n_rows, n_cols, rng.uniform(0.05, 0.4))
    outlier = int(rng.integers(10, 120))  # small outlier costs: unmatched rows are common
    row_to_col = np.empty(n_rows, np.int64)
    matched = K.assign_with_outliers(indptr, cols, costs, n_cols, outlier, row_to_col)
    used = row_to_col[row_to_col >= 0]
    assert len(np.unique(used)) == len(used) == matched
    total = outlier * (n_rows - matched)
    for r, j in enumerate(row_to_col):
        if j >= 0:
            seg = slice(indptr[r], indptr[r + 1])
            assert j in cols[seg]
            total += costs[seg][list(cols[seg]).index(j)]
    assert total == _scipy_objective(indptr, cols, costs, n_cols, outlier)


def _reverse(indptr, cols, costs, n_cols):
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    order = np.argsort(cols, kind="stable")
    rev_indptr = np.zeros(n_cols + 1, np.int64)
    np.cumsum(np.bincount(cols, minlength=n_cols), out=rev_indptr[1:])
    return rev_indptr, np.ascontiguousarray(rows[order]), np.ascontiguousarray(costs[order])


@pytest.mark.parametrize("seed", range(8))
def test_incremental_matches_fresh_solves_on_random_subsets(seed):
    """Rows come and go between steps; every step must be an exact optimum."""
    rng = np.random.default_rng(100 + seed)
    n_rows, n_cols = 60, 45
    indptr, cols, costs = _random_problem(rng, n_rows, n_cols, 0.12)
    outlier = 60
    n_steps = 15
    active = rng.random((n_steps, n_rows)) < np.linspace(0.2, 0.9, n_steps)[:, None]
    acc = np.zeros_like(active)
    objective = np.zeros(n_steps, np.int64)
    counts = K.match_incremental(active, indptr, cols, costs, *_reverse(indptr, cols, costs, n_cols),
                                 n_cols, outlier, acc, objective)
    for t in range(n_steps):
        rows = np.flatnonzero(active[t])
        assert objective[t] == _scipy_objective(indptr, cols, costs, n_cols, outlier, rows), t
        assert counts[t] == acc[t].sum()
        assert not (acc[t] & ~active[t]).any()


def test_incremental_on_real_thinned_maps(bsds):
    """99 thresholds of a real ucm (thinning makes the maps non-nested) vs fresh solves per step."""
    ucm2 = sio.loadmat(bsds / "bench_sample" / "ucm2" / "3063.mat")["ucm2"]
    gt = sio.loadmat(bsds / "bench_sample" / "groundTruth" / "3063.mat")["groundTruth"]
    human = gt[0, 0]["Boundaries"][0, 0].astype(bool)
    pb = B.ucm2_to_pb(ucm2)
    maps = B.binary_maps(pb, B.default_thresholds(30))
    union = np.logical_or.reduce(maps)
    ys, xs = (a.astype(np.int64) for a in np.nonzero(union))
    sizes = np.array([m.sum() for m in maps])
    order = np.argsort(sizes, kind="stable")
    active = np.stack([maps[k][ys, xs] for k in order])
    assert any((active[t - 1] & ~active[t]).any() for t in range(1, len(order))), "want a non-nested case"
    radius = B.match_radius(pb.shape)
    ow = B._outlier_weight(radius, B.OUTLIER_COST)
    indptr, cols, costs, rev_indptr, rev_rows, rev_costs, n_cols = B._graph(ys, xs, human, radius)
    acc = np.zeros_like(active)
    objective = np.zeros(len(order), np.int64)
    K.match_incremental(active, indptr, cols, costs, rev_indptr, rev_rows, rev_costs, n_cols, ow, acc, objective)
    for t in range(0, len(order), 3):
        rows = np.flatnonzero(active[t])
        fresh = np.empty(len(rows), np.int64)
        sub = B._graph(ys[rows], xs[rows], human, radius)
        K.assign_with_outliers(sub[0], sub[1], sub[2], n_cols, ow, fresh)
        ref = _scipy_objective(sub[0], sub[1], sub[2], n_cols, ow)
        assert objective[t] == ref


def test_correspond_pixels_simple_geometry():
    machine = np.zeros((100, 100), bool)
    human = np.zeros((100, 100), bool)
    machine[50, 10:60] = True  # 50 px, 1 px above the human line
    human[51, 10:90] = True  # 80 px
    machine[10, 10:20] = True  # far away: never matched (radius ~1.06 px)
    m1, m2 = B.correspond_pixels(machine, human, max_dist=0.0075)
    assert m1[50, 10:60].all() and not m1[10].any()
    assert m2.sum() == 50
    # beyond the radius nothing matches
    m1, m2 = B.correspond_pixels(machine, np.roll(human, 3, axis=0), max_dist=0.0075)
    assert m1.sum() == 0 and m2.sum() == 0


@pytest.mark.parametrize("seed", range(6))
def test_thin_matches_scikit_image(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((50, 70)) < rng.uniform(0.2, 0.8)
    assert np.array_equal(B.thin(mask), sk_thin(mask))


def test_seg_boundaries_small_example():
    seg = np.array([[1, 1, 2], [1, 1, 2], [3, 3, 3]])
    bdry = B.seg_boundaries(seg)
    # a pixel is on the boundary if it differs from its south or east neighbour
    expect = np.array([[0, 1, 0], [1, 1, 1], [0, 0, 0]], bool)
    assert np.array_equal(bdry, expect)


@pytest.mark.parametrize("radius", [0.5, 1.0, 2.3, 5.0, 7.9])
def test_candidate_edges_equal_a_disk_scan(radius):
    """The row-wise edge search gives the edges of a brute-force scan of the disk, in its order."""
    rng = np.random.default_rng(int(radius * 10))
    human = rng.random((23, 31)) < 0.2
    machine = rng.random((23, 31)) < 0.3
    ys, xs = (a.astype(np.int64) for a in np.nonzero(machine))
    indptr, cols, costs, rev_indptr, rev_rows, rev_costs, n_cols = B._graph(ys, xs, human, radius)
    ids = np.full(human.shape, -1)
    ids[human] = np.arange(human.sum())
    r = int(np.ceil(radius))
    want_cols, want_costs, want_ptr = [], [], [0]
    for y, x in zip(ys, xs):
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                d2 = float(dy * dy + dx * dx)
                if d2 <= radius * radius and 0 <= y + dy < 23 and 0 <= x + dx < 31 and ids[y + dy, x + dx] >= 0:
                    want_cols.append(ids[y + dy, x + dx])
                    want_costs.append(int(np.rint(np.sqrt(d2) * 100)))
        want_ptr.append(len(want_cols))
    assert np.array_equal(indptr, want_ptr)
    assert np.array_equal(cols, want_cols) and np.array_equal(costs, want_costs)
    assert n_cols == human.sum() and rev_indptr[-1] == len(cols)
    rows = np.repeat(np.arange(len(ys)), np.diff(indptr))
    for j in range(n_cols):  # the reverse adjacency lists each column's edges, rows ascending
        sl = slice(rev_indptr[j], rev_indptr[j + 1])
        assert np.array_equal(rev_rows[sl], rows[cols == j]) and np.array_equal(rev_costs[sl], costs[cols == j])
    # only the pixels in reach (a disk dilation of the human map as the reference)
    sel, *reach = B._graph(ys, xs, human, radius, reachable=True)
    oy, ox = np.mgrid[-r:r + 1, -r:r + 1]
    near = ndimage.binary_dilation(human, structure=(oy * oy + ox * ox).astype(float) <= radius * radius)
    assert np.array_equal(sel, np.flatnonzero(near[ys, xs]))
    assert np.array_equal(reach[0], np.append(indptr[sel], indptr[-1])) and np.array_equal(reach[1], cols)
    assert np.array_equal(reach[4], np.searchsorted(sel, rev_rows)) and np.array_equal(reach[5], rev_costs)


def test_a_graph_too_large_for_memory_is_one_clear_line(monkeypatch):
    """The edges are counted before they are allocated: too many for the available memory is a
    MemoryError naming the count, not an allocation failure deep in a kernel."""
    rng = np.random.default_rng(3)
    pb = rng.random((40, 50))
    human = rng.random((40, 50)) < 0.1
    monkeypatch.setattr(B, "EDGE_BYTES", 1 << 50)
    with pytest.raises(MemoryError) as err:
        B.boundary_counts_pb(pb, [human], thresholds=B.default_thresholds(3))
    message = str(err.value)
    assert "candidate pixel pairs" in message and "downscaled" in message and "\n" not in message
