"""FINCH: parameter-free clustering by first-neighbour relations (Sarfraz et al., CVPR 2019).

Every point is linked to its first neighbour (the most similar other point); the connected
components of that graph are the clusters of level 0. The same step runs again on the cluster
means (means of the original points), level after level, which gives a hierarchy of partitions
without any parameter. ``req_clust`` then cuts the hierarchy at an exact number of groups.

This module follows the reference implementation ``finch-clust`` (0.2.3) level for level, with
three differences, all documented on :func:`finch`: first neighbours come from faiss (exact
blocked inner-product search, or a seeded approximate index for large inputs; never an N x N
matrix), the early-exit rule is applied as the paper and the reference intend (the reference's
version has no effect, see ``ensure_early_exit``), and the edge cases on which the reference
misbehaves have defined answers.

Conventions
-----------
- Labels of every partition are ``0 .. k-1`` in order of first occurrence (the cluster holding
  point 0 is 0, the next new cluster met when scanning the points in order is 1, ...). This is the
  labelling the reference produces too (scipy numbers components by their lowest node).
- Ties: among candidates with equal (float) similarity, the lowest index wins: the lowest point
  index at level 0, the lowest cluster label above (so, recursively, the cluster whose first point
  comes first). Exact duplicates have identical similarities to everything, so each point's
  first neighbour is the lowest-index copy of itself other than itself.
- Cosine similarity of a zero vector with anything is 0 (as in scikit-learn, which the reference
  uses).
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import scipy.sparse as sp
from numba import njit, prange
from scipy.sparse.csgraph import connected_components

from ..log import get_logger

__all__ = ["ANN_METHODS", "DISTANCES", "FinchResult", "finch"]

_LOG = get_logger("discover.finch")

DISTANCES = ("cosine", "euclidean")
ANN_METHODS = ("ivf", "hnsw")

# Defaults of the approximate indexes; ``None`` means "derived from the number of points".
_ANN_DEFAULTS: dict[str, dict[str, int | None]] = {
    # IndexIVFFlat: nlist cells (default round(2*sqrt(n)), at most n // 39 so k-means has 39
    # training points per cell), nprobe cells searched per query, k-means on train_size points
    # (default min(n, 64 * nlist)) for niter iterations.
    "ivf": {"nlist": None, "nprobe": 16, "train_size": None, "niter": 10},
    # IndexHNSWFlat: M links per node, efConstruction / efSearch beam widths.
    "hnsw": {"M": 16, "ef_construction": 80, "ef_search": 64},
}

_MEANS_CHUNK_BYTES = 1 << 27  # float64 copy of a column slice of the data when summing clusters


@dataclass(frozen=True)
class FinchResult:
    """The FINCH hierarchy of one data set.

    Attributes
    ----------
    partitions : ndarray of int32, shape (N, L)
        Column ``l`` is the partition of level ``l``; level 0 is the finest. Labels are
        ``0 .. counts[l]-1`` in order of first occurrence.
    counts : ndarray of int64, shape (L,)
        Number of clusters of each level, strictly decreasing.
    req_partition : ndarray of int32, shape (N,), or None
        The partition with exactly ``req_clust`` groups, when ``req_clust`` was given.
    """

    partitions: np.ndarray
    counts: np.ndarray
    req_partition: np.ndarray | None = None

    @property
    def levels(self) -> int:
        """Number of levels L."""
        return int(self.partitions.shape[1])


def finch(
    data: Any,
    *,
    req_clust: int | None = None,
    distance: str = "cosine",
    ensure_early_exit: bool = False,
    exact_limit: int = 20_000,
    ann: str = "ivf",
    ann_params: Mapping[str, int] | None = None,
    seed: int = 0,
    block: int = 4096,
    verbose: bool = False,
) -> FinchResult:
    """Cluster the rows of ``data`` with FINCH and return every level of the hierarchy.

    Parameters
    ----------
    data : array_like, shape (N, D)
        Real, finite feature vectors, one per row (N >= 1, D >= 1); cast to C-contiguous float32.
    req_clust : int, optional
        Also return a partition with exactly this many groups (1 <= req_clust <= N). If a level
        has that many clusters, it is that level. Otherwise, as in the reference, the coarsest
        level with more clusters is refined by merging the closest pair of cluster means (same
        distance as ``distance``; means of the original points), one pair at a time, until
        ``req_clust`` remain. If ``req_clust`` is above the finest level's count, the merging
        starts from singletons (each point its own cluster), so the answer still has exactly
        ``req_clust`` groups (the reference returns level 0 then). Cost: O((k - req_clust) k D)
        for a start level of k clusters.
    distance : {"cosine", "euclidean"}
        Cosine (the reference's default; data are L2-normalised for the search) or Euclidean.
    ensure_early_exit : bool, default False
        The early-exit rule of the reference: from level 1 on, drop every first-neighbour link
        longer than the longest first-neighbour link of level 0. finch-clust 0.2.3 defaults to
        True, but it marks the dropped links as explicit zeros in a scipy sparse matrix, which
        ``scipy.sparse.csgraph`` still counts as edges, so the rule never changes its output (and
        it is skipped above its ``ann_threshold``). False therefore reproduces the reference's
        default partitions; True applies the rule as described, at any N.
    exact_limit : int, default 20000
        Levels with at most this many points (or cluster means) get exact first neighbours:
        faiss ``IndexFlatIP`` (``IndexFlatL2`` for Euclidean) searched in blocks of ``block``
        queries, memory O(N D + block). Larger levels use the approximate index ``ann``.
    ann : {"ivf", "hnsw"}, default "ivf"
        Approximate index above ``exact_limit``: faiss ``IndexIVFFlat`` (k-means cells) or
        ``IndexHNSWFlat``. Distances to the candidates it returns are exact; a point for which it
        returns no candidate other than itself gets an exact search.
    ann_params : mapping, optional
        Overrides of the index parameters: for "ivf" ``nlist`` (default round(2 sqrt(n)), at most
        n // 39), ``nprobe`` (16), ``train_size`` (min(n, 64 nlist)), ``niter`` (10); for "hnsw"
        ``M`` (16), ``ef_construction`` (80), ``ef_search`` (64).
    seed : int, default 0
        Seeds the approximate index (IVF training sample and k-means; HNSW level draws). The
        HNSW graph is built on one thread, so a fixed seed gives the same partitions every run.
    block : int, default 4096
        Queries per faiss search call.
    verbose : bool, default False
        Log each level (count, seconds, exact or approximate) at INFO instead of DEBUG, on the
        ``segsort_unsup.discover.finch`` logger. Nothing is printed.

    Returns
    -------
    FinchResult
        ``partitions`` (N x L int32, level 0 finest), ``counts`` (L,), ``req_partition`` (N,)
        int32 or None.

    Notes
    -----
    Levels are kept exactly as the reference keeps them: recursion stops at the first level that
    has one cluster or fewer than two clusters less than the level below, and that level is not
    kept. So the last level has at least 2 clusters, unless level 0 already has one (N <= 2, or
    all points in one first-neighbour component), in which case the result is that one level.
    N = 1 gives ``partitions == [[0]]``.

    Raises
    ------
    ValueError
        On malformed input (not 2-D, no rows or columns, non-numeric or non-finite values, values
        beyond float32, ``req_clust`` outside 1..N, unknown ``distance``, ``ann`` or
        ``ann_params`` keys). The message says what to change.
    """
    x = _validate_data(data)
    n = x.shape[0]
    req = _validate_req(req_clust, n)
    if distance not in DISTANCES:
        raise ValueError(f"distance={distance!r} is not supported; use one of {DISTANCES}")
    params = _validate_ann(ann, ann_params)
    exact_limit = _validate_int("exact_limit", exact_limit, 0)
    block = _validate_int("block", block, 1)
    seed = _validate_int("seed", seed, 0)
    cosine = distance == "cosine"
    level_log = 20 if verbose else 10  # logging.INFO / logging.DEBUG

    def neighbours(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        exact = points.shape[0] <= exact_limit
        nn, dist = _first_neighbours(points, cosine, exact=exact, ann=ann, params=params, seed=seed, block=block)
        return nn, dist, exact

    # Level 0: first neighbours of the points.
    t0 = time.perf_counter()
    nn, dist, exact = neighbours(_search_space(x, cosine))
    labels = _components(nn)
    levels = [labels]
    counts = [int(labels.max()) + 1]
    _LOG.log(level_log, "FINCH level 0: %d points -> %d clusters (%s, %.2fs)", n, counts[0],
             "exact" if exact else ann, time.perf_counter() - t0)
    max_link = float(dist.max()) if ensure_early_exit and n > 1 else None

    # Recursion on the cluster means. The reference keeps a new level only if it has more than
    # one cluster and at least two fewer than the previous one, so nothing can follow k <= 3.
    while counts[-1] > 3:
        t0 = time.perf_counter()
        k = counts[-1]
        sums, sizes = _cluster_sums(x, labels, k)
        nn, dist, exact = neighbours(_search_space(sums / sizes[:, None], cosine))
        keep = None if max_link is None else dist <= max_link
        node_labels = _components(nn, keep)
        k_new = int(node_labels.max()) + 1
        _LOG.log(level_log, "FINCH level %d: %d means -> %d clusters (%s, %.2fs)%s", len(levels), k, k_new,
                 "exact" if exact else ann, time.perf_counter() - t0,
                 "" if k_new > 1 and k - k_new > 1 else "; stop, level not kept")
        if k_new == 1 or k - k_new <= 1:
            break
        labels = node_labels[labels]
        levels.append(labels)
        counts.append(k_new)

    partitions = np.empty((n, len(levels)), dtype=np.int32)
    for i, lab in enumerate(levels):
        partitions[:, i] = lab
    counts_arr = np.asarray(counts, dtype=np.int64)

    req_partition = None
    if req is not None:
        req_partition = _requested_partition(x, partitions, counts_arr, req, cosine)
    return FinchResult(partitions=partitions, counts=counts_arr, req_partition=req_partition)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _validate_data(data: Any) -> np.ndarray:
    if sp.issparse(data):
        raise ValueError("data is a scipy sparse matrix; pass a dense array (data.toarray())")
    arr = np.asarray(data)
    if arr.ndim != 2:
        hint = " (one feature per point: data.reshape(-1, 1))" if arr.ndim == 1 else ""
        raise ValueError(f"data must be a 2-D array of shape (N, D); got shape {arr.shape}{hint}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"data needs at least one row and one column; got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"data must be real numbers; got dtype {arr.dtype} (convert it, e.g. data.astype(np.float32))")
    finite = np.isfinite(arr) if arr.dtype.kind == "f" else np.ones(arr.shape, bool)
    if not finite.all():
        rows = np.flatnonzero(~finite.all(axis=1))
        raise ValueError(f"data has NaN or infinite values in {rows.size} row(s) (first: {rows[:5].tolist()}); "
                         "drop or impute those rows")
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(x).all():
        rows = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise ValueError(f"data has values beyond float32 range (|v| > 3.4e38) in {rows.size} row(s) "
                         f"(first: {rows[:5].tolist()}); rescale the features")
    return x


def _validate_req(req_clust: Any, n: int) -> int | None:
    if req_clust is None:
        return None
    if isinstance(req_clust, bool) or not isinstance(req_clust, numbers.Integral):
        raise ValueError(f"req_clust must be an integer or None; got {req_clust!r}")
    if not 1 <= int(req_clust) <= n:
        raise ValueError(f"req_clust={req_clust} is outside 1..N (N={n} points); pass a number of groups in that range")
    return int(req_clust)


def _validate_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    return int(value)


def _validate_ann(ann: str, ann_params: Mapping[str, int] | None) -> dict[str, int | None]:
    if ann not in ANN_METHODS:
        raise ValueError(f"ann={ann!r} is not supported; use one of {ANN_METHODS}")
    params = dict(_ANN_DEFAULTS[ann])
    for key, value in (ann_params or {}).items():
        if key not in params:
            raise ValueError(f"unknown ann_params key {key!r} for ann={ann!r}; known keys: {sorted(params)}")
        if value is not None:
            params[key] = _validate_int(f"ann_params[{key!r}]", value, 1)
    return params


# ----------------------------------------------------------------------------------------------
# First neighbours
# ----------------------------------------------------------------------------------------------


def _search_space(points: np.ndarray, cosine: bool) -> np.ndarray:
    """C-contiguous float32 rows to search: L2-normalised for cosine (zero rows stay zero)."""
    if cosine:
        norms = np.linalg.norm(points, axis=1)
        norms[norms == 0] = 1
        points = points / norms[:, None]
    return np.ascontiguousarray(points, dtype=np.float32)


def _first_neighbours(x: np.ndarray, cosine: bool, *, exact: bool, ann: str, params: dict[str, int | None],
                      seed: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """First neighbour (self excluded) of every row and the distance to it (1 - cos, or L2).

    ``n == 1`` gives the point itself at distance inf.
    """
    n = x.shape[0]
    if n == 1:
        return np.zeros(1, np.int64), np.full(1, np.inf)
    index = _flat_index(x, cosine) if exact else _ann_index(x, cosine, ann, params, seed)
    nn = np.empty(n, np.int64)
    score = np.empty(n, np.float64)
    for start in range(0, n, block):
        stop = min(n, start + block)
        values, ids = index.search(x[start:stop], 2)
        nn[start:stop], score[start:stop] = _best_candidate(values, ids, np.arange(start, stop), cosine)
    missing = np.flatnonzero(nn < 0)
    if missing.size:  # approximate index returned only the point itself (or nothing)
        del index
        flat = _flat_index(x, cosine)
        for start in range(0, missing.size, block):
            rows = missing[start:start + block]
            values, ids = flat.search(x[rows], 2)
            nn[rows], score[rows] = _best_candidate(values, ids, rows, cosine)
    dist = np.clip(1.0 - score, 0.0, 2.0) if cosine else np.sqrt(np.maximum(score, 0.0))
    return nn, dist


def _best_candidate(values: np.ndarray, ids: np.ndarray, rows: np.ndarray, cosine: bool) -> tuple[np.ndarray, np.ndarray]:
    """Best non-self candidate per row: highest inner product (lowest squared L2), then lowest id.

    Returns (ids, scores); id -1 where no candidate other than the row itself was returned.
    """
    valid = (ids >= 0) & (ids != rows[:, None])
    worst = -np.inf if cosine else np.inf
    vals = np.where(valid, values.astype(np.float64), worst)
    best = vals.max(axis=1) if cosine else vals.min(axis=1)
    tied = valid & (vals == best[:, None])
    nn = np.where(tied, ids, np.iinfo(np.int64).max).min(axis=1)
    nn[~valid.any(axis=1)] = -1
    return nn, best


def _flat_index(x: np.ndarray, cosine: bool):
    """Exact faiss index over ``x``. Its scan keeps, among equal scores, the lowest ids."""
    import faiss

    index = faiss.IndexFlatIP(x.shape[1]) if cosine else faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    return index


def _ann_index(x: np.ndarray, cosine: bool, ann: str, params: dict[str, int | None], seed: int):
    """Seeded approximate faiss index over ``x`` (deterministic for a fixed seed)."""
    import faiss

    n, d = x.shape
    metric = faiss.METRIC_INNER_PRODUCT if cosine else faiss.METRIC_L2
    if ann == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(params["M"]), metric)
        index.hnsw.rng = faiss.RandomGenerator(seed)
        index.hnsw.efConstruction = int(params["ef_construction"])
        index.hnsw.efSearch = int(params["ef_search"])
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # parallel insertion order varies from run to run
        try:
            index.add(x)
        finally:
            faiss.omp_set_num_threads(threads)
        return index
    nlist = params["nlist"] or int(round(2 * math.sqrt(n)))
    nlist = max(1, min(nlist, n // 39 if params["nlist"] is None else n))
    train_size = min(n, max(nlist, params["train_size"] or 64 * nlist))
    quantizer = faiss.IndexFlatIP(d) if cosine else faiss.IndexFlatL2(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, metric)
    index.cp.seed = seed
    index.cp.niter = int(params["niter"])
    index.cp.max_points_per_centroid = max(256, -(-train_size // nlist))  # no silent subsampling
    index.cp.min_points_per_centroid = 1  # small n (exact_limit=0) is the caller's choice: no stderr warning
    rng = np.random.default_rng(seed)
    sample = x if train_size >= n else x[np.sort(rng.choice(n, train_size, replace=False))]
    index.train(sample)
    index.add(x)
    index.nprobe = min(nlist, int(params["nprobe"]))
    return index


# ----------------------------------------------------------------------------------------------
# Graph and means
# ----------------------------------------------------------------------------------------------


def _components(nn: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Weakly connected components of the links i -> nn[i] (those with ``keep``), first-occurrence labels."""
    n = nn.shape[0]
    rows = np.arange(n)
    cols = nn
    if keep is not None:
        rows, cols = rows[keep], cols[keep]
    graph = sp.csr_matrix((np.ones(rows.size, np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=True, connection="weak", return_labels=True)
    return _first_occurrence(labels)


def _first_occurrence(labels: np.ndarray) -> np.ndarray:
    """Relabel to 0..k-1 in order of first occurrence."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.size, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse.reshape(-1)]


def _cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (float64, k x D) and sizes (k,) of the rows of ``x``: one sparse product."""
    n, d = x.shape
    member = sp.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(k, n))
    sums = np.empty((k, d), np.float64)
    width = max(1, min(d, _MEANS_CHUNK_BYTES // (8 * n)))
    for c0 in range(0, d, width):  # bounds the float64 copy of the data
        sums[:, c0:c0 + width] = member @ x[:, c0:c0 + width].astype(np.float64)
    return sums, np.bincount(labels, minlength=k).astype(np.float64)


# ----------------------------------------------------------------------------------------------
# req_clust: closest-pair merging
# ----------------------------------------------------------------------------------------------


def _requested_partition(x: np.ndarray, partitions: np.ndarray, counts: np.ndarray, req: int,
                         cosine: bool) -> np.ndarray:
    hit = np.flatnonzero(counts == req)
    if hit.size:
        return partitions[:, hit[0]].copy()
    above = np.flatnonzero(counts > req)
    if above.size:
        start = partitions[:, above[-1]].astype(np.int64)
        k = int(counts[above[-1]])
    else:  # req above the finest level: start from singletons
        start = np.arange(x.shape[0], dtype=np.int64)
        k = x.shape[0]
    sums, sizes = _cluster_sums(x, start, k)
    parent = _merge_closest_pairs(sums, sizes, req, cosine)
    root = parent.copy()
    while True:  # resolve the merge forest (each merged cluster points to a lower label)
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    return _first_occurrence(root[start]).astype(np.int32)


@njit(cache=True, inline="always")
def _score(v, a, b, cosine):
    """Similarity of rows a and b: dot product (cosine) or minus squared distance.

    Fixed summation order and commutative terms, so score(a, b) == score(b, a) bit for bit and
    identical rows score identically against any row.
    """
    d = v.shape[1]
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    j = 0
    if cosine:
        while j + 4 <= d:
            s0 += v[a, j] * v[b, j]
            s1 += v[a, j + 1] * v[b, j + 1]
            s2 += v[a, j + 2] * v[b, j + 2]
            s3 += v[a, j + 3] * v[b, j + 3]
            j += 4
        while j < d:
            s0 += v[a, j] * v[b, j]
            j += 1
    else:
        while j + 4 <= d:
            t0 = v[a, j] - v[b, j]
            t1 = v[a, j + 1] - v[b, j + 1]
            t2 = v[a, j + 2] - v[b, j + 2]
            t3 = v[a, j + 3] - v[b, j + 3]
            s0 += t0 * t0
            s1 += t1 * t1
            s2 += t2 * t2
            s3 += t3 * t3
            j += 4
        while j < d:
            t0 = v[a, j] - v[b, j]
            s0 += t0 * t0
            j += 1
    s = (s0 + s1) + (s2 + s3)
    return s if cosine else -s


@njit(cache=True, inline="always")
def _set_vector(v, sums, sizes, i, cosine):
    d = v.shape[1]
    norm = 0.0
    for j in range(d):
        v[i, j] = sums[i, j] / sizes[i]
        norm += v[i, j] * v[i, j]
    if cosine and norm > 0.0:
        norm = math.sqrt(norm)
        for j in range(d):
            v[i, j] /= norm


@njit(cache=True)
def _rescan(v, active, i, cosine):
    """Best other active row for row i: (index, score); ties -> lowest index; (-1, -inf) if none."""
    best = -np.inf
    arg = -1
    for j in range(v.shape[0]):
        if j != i and active[j]:
            s = _score(v, i, j, cosine)
            if s > best or arg < 0:
                best = s
                arg = j
    return arg, best


@njit(cache=True, parallel=True)
def _initial_neighbours(v, active, nn, best, cosine):
    for i in prange(v.shape[0]):
        nn[i], best[i] = _rescan(v, active, i, cosine)


@njit(cache=True)
def _merge_closest_pairs_kernel(sums, sizes, target, cosine, parent):
    k, d = sums.shape
    v = np.empty((k, d))
    for i in range(k):
        _set_vector(v, sums, sizes, i, cosine)
    active = np.ones(k, np.bool_)
    nn = np.empty(k, np.int64)
    best = np.empty(k)
    _initial_neighbours(v, active, nn, best, cosine)
    score = np.empty(k)
    remaining = k
    while remaining > target:
        # Closest pair: the highest score, lowest label on ties (its partner nn[a] > a then).
        a = -1
        for i in range(k):
            if active[i] and (a < 0 or best[i] > best[a]):
                a = i
        b = nn[a]
        lo = min(a, b)
        hi = max(a, b)
        for j in range(d):
            sums[lo, j] += sums[hi, j]
        sizes[lo] += sizes[hi]
        _set_vector(v, sums, sizes, lo, cosine)
        active[hi] = False
        parent[hi] = lo
        remaining -= 1
        # The merged cluster's own neighbour, and everyone else's against it.
        arg = -1
        top = -np.inf
        for j in range(k):
            if j != lo and active[j]:
                s = _score(v, lo, j, cosine)
                score[j] = s
                if s > top or arg < 0:
                    top = s
                    arg = j
        nn[lo] = arg
        best[lo] = top
        for j in range(k):
            if j == lo or not active[j]:
                continue
            if nn[j] == lo or nn[j] == hi:  # its neighbour moved or vanished: full rescan
                nn[j], best[j] = _rescan(v, active, j, cosine)
            elif score[j] > best[j] or (score[j] == best[j] and lo < nn[j]):
                nn[j] = lo
                best[j] = score[j]


def _merge_closest_pairs(sums: np.ndarray, sizes: np.ndarray, target: int, cosine: bool) -> np.ndarray:
    """Merge the closest pair of cluster means until ``target`` clusters remain.

    Returns ``parent``: each merged-away cluster points to the (lower) label it joined.
    """
    k = sums.shape[0]
    parent = np.arange(k, dtype=np.int64)
    if target < k:
        _merge_closest_pairs_kernel(np.ascontiguousarray(sums, np.float64), np.ascontiguousarray(sizes, np.float64),
                                    int(target), bool(cosine), parent)
    return parent
