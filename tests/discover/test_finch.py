"""FINCH (segsort_unsup.discover.finch) against the reference package and brute-force numpy.

The reference is ``finch-clust`` (import name ``finch``), run on its exact path (dense pairwise
distances, N <= its ann_threshold). Partitions are compared up to relabelling at every level,
with the adjusted Rand index computed here from the contingency table.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from segsort_unsup.discover import FinchResult, finch


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (Hubert & Arabie), from the contingency table."""
    a = np.unique(np.asarray(a), return_inverse=True)[1].reshape(-1)
    b = np.unique(np.asarray(b), return_inverse=True)[1].reshape(-1)
    n = a.size
    pairs = np.unique(a.astype(np.int64) * (b.max() + 1) + b, return_counts=True)[1]

    def comb2(v):
        v = np.asarray(v, dtype=np.float64)
        return float((v * (v - 1) / 2).sum())

    index = comb2(pairs)
    rows, cols = comb2(np.bincount(a)), comb2(np.bincount(b))
    expected = rows * cols / comb2([n]) if n > 1 else 0.0
    top = (rows + cols) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when a and b are the same partition up to relabelling (a bijection between labels)."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    if a.shape != b.shape:
        return False
    pairs = np.unique(np.stack([a, b]), axis=1)
    return np.unique(pairs[0]).size == pairs.shape[1] == np.unique(pairs[1]).size


def first_occurrence_ordered(labels: np.ndarray) -> bool:
    _, first = np.unique(labels, return_index=True)
    return bool(np.all(np.diff(first) > 0)) and labels.min() == 0


def brute_first_neighbours(x: np.ndarray) -> np.ndarray:
    """Cosine first neighbour of every row, float64, self excluded, lowest index on ties."""
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    v = x / np.where(norms == 0, 1, norms)
    s = v @ v.T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(axis=1)


def brute_merge(x: np.ndarray, labels: np.ndarray, target: int) -> np.ndarray:
    """Merge the closest pair of cluster means (cosine, dense float64) until ``target`` remain."""
    labels = np.unique(labels, return_inverse=True)[1].reshape(-1)
    while labels.max() + 1 > target:
        k = labels.max() + 1
        means = np.stack([x[labels == c].astype(np.float64).mean(axis=0) for c in range(k)])
        v = means / np.linalg.norm(means, axis=1, keepdims=True)
        s = v @ v.T
        np.fill_diagonal(s, -np.inf)
        i, j = np.unravel_index(np.argmax(s), s.shape)
        labels[labels == max(i, j)] = min(i, j)
        labels = np.unique(labels, return_inverse=True)[1].reshape(-1)
    return labels


def mixture(n: int, d: int, k: int, sigma: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian mixture on the unit sphere: k random directions, isotropic noise, normalised."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.integers(0, k, n)
    x = centres[truth] + sigma / np.sqrt(d) * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), truth


@pytest.fixture(scope="module")
def ref():
    """The reference FINCH function, or skip."""
    import importlib

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it warns when pynndescent is absent (unused on its exact path)
            module = importlib.import_module("finch")
    except ImportError as exc:
        pytest.skip(f"reference package finch-clust is not importable ({exc}); pip install finch-clust")
    if not hasattr(module, "FINCH"):
        pytest.skip(f"the importable 'finch' ({module.__file__}) is not finch-clust; pip install finch-clust")
    return module.FINCH


def run_ref(ref, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c, counts, req = ref(x, **kw)
    return np.asarray(c).reshape(x.shape[0], -1), list(counts), req


def assert_same_levels(ours: FinchResult, ref_c: np.ndarray, ref_counts: list) -> None:
    assert ours.counts.tolist() == [int(c) for c in ref_counts]
    assert ours.partitions.shape == ref_c.shape
    for level in range(ref_c.shape[1]):
        assert same_partition(ours.partitions[:, level], ref_c[:, level]), f"level {level}"
        assert ari(ours.partitions[:, level], ref_c[:, level]) == pytest.approx(1.0, abs=1e-12)


def req_values(counts: list) -> list[int]:
    """Requested sizes: each level's count, a few below each (short refinements), 1 and 2."""
    values = {1, 2}
    for c in counts:
        values.update({c, c - 1, c - 3})
    return sorted(v for v in values if 1 <= v <= counts[0])


# ----------------------------------------------------------------------------------------------
# real vectors: superpixel features of BSDS500 photos
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def superpixel_features(bsds):
    """Per-SLIC-superpixel colour, texture and position features of 3 BSDS500 photos, z-scored."""
    from skimage import color, filters, io, segmentation

    paths = sorted((bsds / "images" / "val").glob("*.jpg"))[:3]
    if len(paths) < 3:
        pytest.skip(f"fewer than 3 BSDS500 val images under {bsds}")
    rows = []
    for path in paths:
        img = io.imread(path)[..., :3]
        lab = color.rgb2lab(img)
        grad = filters.sobel(color.rgb2gray(img))
        seg = segmentation.slic(img, n_segments=400, compactness=10, start_label=0).ravel()
        k = seg.max() + 1
        size = np.bincount(seg, minlength=k)
        h, w = img.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w]
        chans = [lab[..., 0], lab[..., 1], lab[..., 2], grad, yy / h, xx / w]
        mean = [np.bincount(seg, c.ravel(), k) / size for c in chans]
        std = [np.sqrt(np.maximum(np.bincount(seg, c.ravel() ** 2, k) / size - m**2, 0)) for c, m in zip(chans[:4], mean)]
        rows.append(np.column_stack(mean + std))
    x = np.concatenate(rows)
    return ((x - x.mean(0)) / x.std(0)).astype(np.float32)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_matches_reference_on_bsds_superpixels(ref, superpixel_features, distance):
    x = superpixel_features
    assert x.shape[0] > 500
    ref_c, ref_counts, _ = run_ref(ref, x, distance=distance)
    ours = finch(x, distance=distance)
    assert_same_levels(ours, ref_c, ref_counts)
    for req in req_values(ref_counts):
        _, _, ref_req = run_ref(ref, x, distance=distance, req_clust=req)
        got = finch(x, distance=distance, req_clust=req).req_partition
        assert np.unique(got).size == req
        assert same_partition(got, ref_req), f"req_clust={req}"


# ----------------------------------------------------------------------------------------------
# random data of several sizes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "d", "distance"), [(60, 3, "cosine"), (400, 4, "cosine"), (1500, 8, "euclidean"),
                                                  (2500, 16, "cosine"), (5000, 32, "cosine")])
def test_matches_reference_on_random_data(ref, n, d, distance):
    x = np.random.default_rng(n).normal(size=(n, d)).astype(np.float32)
    ref_c, ref_counts, _ = run_ref(ref, x, distance=distance)
    ours = finch(x, distance=distance)
    assert_same_levels(ours, ref_c, ref_counts)
    reqs = req_values(ref_counts)
    if n > 1500:  # each reference call redoes the whole hierarchy: keep the big cases short
        reqs = sorted({reqs[0], reqs[1], reqs[len(reqs) // 2], reqs[-2], reqs[-1]})
    for req in reqs:
        _, _, ref_req = run_ref(ref, x, distance=distance, req_clust=req)
        assert same_partition(finch(x, distance=distance, req_clust=req).req_partition, ref_req), f"req_clust={req}"


def test_req_clust_where_reference_ties_in_float32(ref):
    """The one documented difference: a float32 tie between two pairs of cluster means.

    On these data the merging from level 0 (731 clusters) down to 190 meets, at its 145th step,
    two different pairs of means whose cosine distances round to the same float32 value. The
    reference then keeps the two shortest first-neighbour links, which belong to different pairs,
    and merges both in one step: it returns 189 groups, our partition for req_clust=189 (on a CPU
    whose numpy argsort orders the tied links otherwise, it merges one pair and returns ours for
    190). Ours ranks in float64, merges one pair per step, and returns exactly 190 groups.
    """
    x = np.random.default_rng(43).normal(size=(3000, 64)).astype(np.float32)
    _, ref_counts, ref_req = run_ref(ref, x, req_clust=190)
    assert ref_counts[0] == 731 and 190 not in ref_counts
    ours = finch(x, req_clust=190).req_partition
    assert np.unique(ours).size == 190
    if np.unique(ref_req).size == 189:
        assert same_partition(ref_req, finch(x, req_clust=189).req_partition)
        assert ari(ours, ref_req) > 0.99
    else:
        assert same_partition(ref_req, ours)


def test_reference_early_exit_flag_has_no_effect(ref):
    """The reference's ensure_early_exit=True (its default) gives the same levels as False, and as ours."""
    x = np.random.default_rng(7).normal(size=(1200, 8)).astype(np.float32)
    on_c, on_counts, _ = run_ref(ref, x, ensure_early_exit=True)
    off_c, off_counts, _ = run_ref(ref, x, ensure_early_exit=False)
    assert on_counts == off_counts and np.array_equal(on_c, off_c)
    assert_same_levels(finch(x), on_c, on_counts)


def test_early_exit_matches_reference_rule_applied(ref, monkeypatch):
    """ensure_early_exit=True equals the reference with its link dropping made effective.

    The reference zeroes dropped links in place, which leaves explicit zeros that scipy's csgraph
    counts as edges; the patch removes them before the components are taken (nothing else).
    """
    import scipy.sparse as sp

    module = __import__("finch.finch", fromlist=["get_clust"])
    original = module.get_clust

    def get_clust(a, orig_dist, min_sim=None):
        if min_sim is not None:
            a = sp.csr_matrix(a, copy=True)
            a[np.where((orig_dist * a.toarray()) > min_sim)] = 0
            a.eliminate_zeros()
        return original(a, orig_dist, None)

    monkeypatch.setattr(module, "get_clust", get_clust)
    for n, d in [(800, 6), (3000, 16)]:
        x = np.random.default_rng(n).normal(size=(n, d)).astype(np.float32)
        ref_c, ref_counts, _ = run_ref(ref, x, ensure_early_exit=True)
        ours = finch(x, ensure_early_exit=True)
        assert_same_levels(ours, ref_c, ref_counts)
        assert ours.levels < finch(x).levels  # the rule does stop the recursion earlier here


# ----------------------------------------------------------------------------------------------
# brute force (no reference needed)
# ----------------------------------------------------------------------------------------------


def test_level0_is_first_neighbour_components():
    """Level 0 = connected components of i -> first neighbour (brute force float64 numpy)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    x = np.random.default_rng(3).normal(size=(700, 10)).astype(np.float32)
    nn = brute_first_neighbours(x)
    graph = sp.coo_matrix((np.ones(x.shape[0]), (np.arange(x.shape[0]), nn)), shape=(x.shape[0],) * 2)
    k, labels = connected_components(graph, directed=True, connection="weak")
    res = finch(x)
    assert res.counts[0] == k and same_partition(res.partitions[:, 0], labels)


def test_result_layout():
    x = np.random.default_rng(5).normal(size=(900, 6))  # float64 input is accepted (cast to float32)
    res = finch(x, req_clust=7)
    assert res.partitions.dtype == np.int32 and res.partitions.shape == (900, res.levels)
    assert res.counts.dtype == np.int64 and np.all(np.diff(res.counts) <= -2) and res.counts[-1] >= 2
    for level in range(res.levels):
        col = res.partitions[:, level]
        assert first_occurrence_ordered(col) and col.max() + 1 == res.counts[level]
        if level:  # nested: each cluster lies inside one cluster of the next level
            assert np.unique(np.stack([res.partitions[:, level - 1], col]), axis=1).shape[1] == res.counts[level - 1]
    assert res.req_partition.dtype == np.int32 and np.unique(res.req_partition).size == 7
    assert finch(x).req_partition is None


def test_block_size_does_not_change_result():
    x = np.random.default_rng(11).normal(size=(1000, 12)).astype(np.float32)
    a, b = finch(x, block=4096), finch(x, block=37)
    assert np.array_equal(a.partitions, b.partitions)


# ----------------------------------------------------------------------------------------------
# approximate neighbours
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clustered():
    return mixture(6000, 32, 40, 0.5, seed=0)[0]


@pytest.fixture(scope="module")
def clustered_exact(clustered):
    return finch(clustered, req_clust=40)


@pytest.mark.parametrize("ann", ["ivf", "hnsw"])
def test_approximate_close_to_exact(clustered, clustered_exact, ann):
    """exact_limit=0 forces the approximate index at every level; ARI >= 0.99 against exact."""
    approx = finch(clustered, req_clust=40, exact_limit=0, ann=ann)
    exact = clustered_exact
    for level in range(min(approx.levels, exact.levels)):
        assert ari(approx.partitions[:, level], exact.partitions[:, level]) >= 0.99, f"level {level}"
    assert ari(approx.req_partition, exact.req_partition) >= 0.99


@pytest.mark.parametrize("ann", ["ivf", "hnsw"])
def test_approximate_is_deterministic(clustered, ann):
    x = clustered[:3000]
    runs = [finch(x, exact_limit=0, ann=ann, seed=3, req_clust=12) for _ in range(2)]
    assert np.array_equal(runs[0].partitions, runs[1].partitions)
    assert np.array_equal(runs[0].req_partition, runs[1].req_partition)


def test_ivf_parameters_are_used(clustered):
    """One cell probed out of many loses neighbours; all cells probed is exact."""
    x = clustered[:3000]
    exact = finch(x)
    full = finch(x, exact_limit=0, ann_params={"nlist": 8, "nprobe": 8})
    assert np.array_equal(full.partitions[:, 0], exact.partitions[:, 0])
    poor = finch(x, exact_limit=0, ann_params={"nlist": 64, "nprobe": 1})
    assert not np.array_equal(poor.partitions[:, 0], exact.partitions[:, 0])


@pytest.mark.parametrize("kw", [{}, {"exact_limit": 0}, {"exact_limit": 0, "ann": "hnsw"}])
def test_thread_count_does_not_change_result(clustered, kw):
    x = clustered[:2500]
    one, three = finch(x, threads=1, block=300, **kw), finch(x, threads=3, block=300, **kw)
    assert np.array_equal(one.partitions, three.partitions)


# ----------------------------------------------------------------------------------------------
# edge cases the reference gets wrong or leaves undefined
# ----------------------------------------------------------------------------------------------


def test_single_point():
    res = finch(np.ones((1, 4)), req_clust=1)
    assert res.partitions.tolist() == [[0]] and res.counts.tolist() == [1] and res.req_partition.tolist() == [0]
    with pytest.raises(ValueError, match="outside 1..N"):
        finch(np.ones((1, 4)), req_clust=2)


@pytest.mark.parametrize("ann", [None, "ivf", "hnsw"])
def test_two_points(ann):
    kw = {} if ann is None else {"exact_limit": 0, "ann": ann}
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    res = finch(x, **kw)
    assert res.partitions.tolist() == [[0], [0]] and res.counts.tolist() == [1]
    assert finch(x, req_clust=1, **kw).req_partition.tolist() == [0, 0]
    assert finch(x, req_clust=2, **kw).req_partition.tolist() == [0, 1]  # the reference returns [0, 0]


def test_first_partition_with_one_cluster():
    """All points in one first-neighbour component: one level; any req_clust is met exactly."""
    x = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, 0.25], [1.0, 0.45]])  # 0<->1, 2->1, 3->2: one component
    res = finch(x)
    assert res.counts.tolist() == [1] and res.partitions.shape == (4, 1)
    for req in (1, 2, 3, 4):
        got = finch(x, req_clust=req).req_partition
        assert np.unique(got).size == req
        assert same_partition(got, brute_merge(x, np.arange(4), req))


def test_req_clust_above_finest_level():
    x = np.random.default_rng(4).normal(size=(40, 5)).astype(np.float32)
    res = finch(x)
    for req in range(int(res.counts[0]) + 1, 41, 4):
        got = finch(x, req_clust=req).req_partition
        assert np.unique(got).size == req and first_occurrence_ordered(got)
        assert same_partition(got, brute_merge(x, np.arange(40), req)), f"req_clust={req}"
    assert finch(x, req_clust=40).req_partition.tolist() == list(range(40))


def test_req_clust_equal_to_a_level():
    x = np.random.default_rng(6).normal(size=(800, 6)).astype(np.float32)
    res = finch(x)
    for level, count in enumerate(res.counts):
        got = finch(x, req_clust=int(count)).req_partition
        assert np.array_equal(got, res.partitions[:, level])


def test_req_clust_between_levels_brute_force():
    """Refinement starts from the coarsest level above req_clust and merges closest means."""
    x = np.random.default_rng(8).normal(size=(300, 5)).astype(np.float32)
    res = finch(x)
    for level in range(res.levels):
        upper = int(res.counts[level])
        lower = int(res.counts[level + 1]) if level + 1 < res.levels else 0
        for req in {upper - 1, (upper + lower) // 2, lower + 1} - {upper, lower, 0}:
            got = finch(x, req_clust=req).req_partition
            assert same_partition(got, brute_merge(x, res.partitions[:, level], req)), f"req_clust={req}"


@pytest.mark.parametrize("ann", [None, "ivf", "hnsw"])
def test_duplicate_points(ann):
    """Copies are each other's first neighbours, so level 0 is the groups of copies and level 1 is
    level 0 of the distinct points (the means of copies are the points; above that, means weigh
    each point by its number of copies). The approximate paths give the exact path's answer."""
    kw = {} if ann is None else {"exact_limit": 0, "ann": ann}
    rng = np.random.default_rng(9)
    distinct = rng.normal(size=(300, 6)).astype(np.float32)
    copies = rng.integers(2, 4, size=300)
    source = rng.permutation(np.repeat(np.arange(300), copies))
    x = distinct[source]
    res = finch(x, **kw)
    assert same_partition(res.partitions[:, 0], source)
    assert same_partition(res.partitions[:, 1], finch(distinct, **kw).partitions[source, 0])
    if ann is not None:
        assert np.array_equal(res.partitions, finch(x).partitions)
    # first neighbour of a point is a copy (brute force)
    assert np.all(source[brute_first_neighbours(x)] == source)
    # req_clust above level 0 merges copies first
    got = finch(x, req_clust=350, **kw).req_partition
    assert np.unique(got).size == 350
    assert np.unique(np.stack([got, source]), axis=1).shape[1] == 350  # no group mixes distinct points


def test_duplicate_points_match_reference(ref):
    rng = np.random.default_rng(10)
    distinct = rng.normal(size=(400, 8)).astype(np.float32)
    x = distinct[rng.permutation(np.repeat(np.arange(400), 3))]
    ref_c, ref_counts, _ = run_ref(ref, x)
    assert_same_levels(finch(x), ref_c, ref_counts)


def test_all_points_identical():
    x = np.full((25, 3), 2.5, np.float32)
    res = finch(x, req_clust=1)
    assert res.counts.tolist() == [1] and res.req_partition.tolist() == [0] * 25
    got = finch(x, req_clust=5).req_partition
    assert np.unique(got).size == 5
    assert np.array_equal(got, finch(x, req_clust=5).req_partition)  # deterministic ties


def test_zero_vectors_cosine():
    """A zero vector has cosine similarity 0 to everything: it still gets a neighbour (index 0 or 1)."""
    x = np.random.default_rng(12).normal(size=(50, 4)).astype(np.float32)
    x[[5, 17]] = 0
    res = finch(x)
    assert res.partitions.shape[0] == 50 and res.counts[0] < 50


# ----------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "match"), [
    (np.zeros(5), "2-D array.*reshape"),
    (np.zeros((2, 3, 4)), "2-D array"),
    (np.zeros((0, 3)), "at least one row"),
    (np.zeros((3, 0)), "at least one row and one column"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), "NaN or infinite.*row"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), "NaN or infinite"),
    (np.array([[1e39, 1.0], [0.0, 1.0]]), "float32 range"),
    (np.ones((3, 2), complex), "real numbers"),
    (np.array([["a", "b"]]), "real numbers"),
])
def test_bad_data(data, match):
    with pytest.raises(ValueError, match=match):
        finch(data)


def test_sparse_data_rejected():
    import scipy.sparse as sp

    with pytest.raises(ValueError, match="toarray"):
        finch(sp.eye(4, format="csr"))


@pytest.mark.parametrize(("kw", "match"), [
    ({"req_clust": 0}, "outside 1..N"),
    ({"req_clust": 11}, "outside 1..N"),
    ({"req_clust": 2.0}, "integer"),
    ({"req_clust": True}, "integer"),
    ({"distance": "manhattan"}, "distance"),
    ({"ann": "lsh"}, "ann="),
    ({"ann_params": {"nprobes": 4}}, "unknown ann_params key 'nprobes'"),
    ({"ann": "hnsw", "ann_params": {"M": 0}}, r"ann_params\['M'\]"),
    ({"exact_limit": -1}, "exact_limit"),
    ({"block": 0}, "block"),
    ({"threads": 0}, "threads"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        finch(np.random.default_rng(0).normal(size=(10, 3)), **kw)
