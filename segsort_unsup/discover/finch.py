"""FINCH: parameter-free clustering by first-neighbour relations (Sarfraz et al., CVPR 2019).

Every point is linked to its first neighbour (the most similar other point); the connected
components of that graph are the clusters of level 0. The same step runs again on the cluster
means (means of the original points), level after level, which gives a hierarchy of partitions
without any parameter. ``req_clust`` then cuts the hierarchy at an exact number of groups.

This module follows the reference implementation ``finch-clust`` (0.2.3) level for level, with
three differences, all documented on :func:`finch`: first neighbours come from faiss (exact
blocked inner-product search, or a seeded inverted-file / HNSW index for large inputs; never an
N x N matrix), the early-exit rule is applied as the paper and the reference intend (the
reference's version has no effect, see ``ensure_early_exit``), and the edge cases on which the
reference misbehaves have defined answers.

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
import os
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
    # IVF-Flat: nlist cells (default round(sqrt(n)), at most n // 39 so k-means has 39 training
    # points per cell), nprobe cells searched per query, k-means on train_size points (default
    # min(n, 40 * nlist)) for niter iterations.
    "ivf": {"nlist": None, "nprobe": 8, "train_size": None, "niter": 10},
    # IndexHNSWFlat: M links per node, efConstruction / efSearch beam widths.
    "hnsw": {"M": 16, "ef_construction": 80, "ef_search": 128},
}

_MEANS_CHUNK_BYTES = 1 << 27  # float64 copy of a column slice of the data when summing clusters


@dataclass(frozen=True, eq=False)
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
    threads: int | None = None,
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
        Approximate search above ``exact_limit``. "ivf": inverted file of k-means cells (faiss
        k-means, spherical for cosine); each point is stored in its nearest cell and compared
        with the points of its ``nprobe`` nearest cells, the same candidates as faiss
        ``IndexIVFFlat``, but scanned cell by cell with exact ``IndexFlat`` searches (one matrix
        product per cell, several times faster than per-query scans). "hnsw": faiss
        ``IndexHNSWFlat``. Scores of the candidates found are exact; a point with no candidate
        other than itself gets an exact search. Approximate first neighbours are reliable on
        clustered data (FINCH's use); on unclustered high-dimensional data many are wrong (for
        64-D Gaussian noise, IVF with the defaults finds about half), so raise ``exact_limit``
        or ``nprobe`` there.
    ann_params : mapping, optional
        Overrides of the index parameters: for "ivf" ``nlist`` (default round(sqrt(n)), at most
        n // 39), ``nprobe`` (8), ``train_size`` (min(n, 40 nlist)), ``niter`` (10); for "hnsw"
        ``M`` (16), ``ef_construction`` (80), ``ef_search`` (128).
    seed : int, default 0
        Seeds the approximate index (k-means sample and initialisation; HNSW level draws). The
        HNSW graph is built on one thread, so a fixed seed gives the same partitions every run.
    block : int, default 4096
        Queries per faiss search call.
    threads : int, optional
        Worker threads (default: the CPUs this process may use). Each runs faiss on one OpenMP
        thread; blocks are merged in a fixed order, so the result does not depend on ``threads``.
        Also caps numba's threads for the ``req_clust`` merging.
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
    threads = _validate_int("threads", _default_threads() if threads is None else threads, 1)
    cosine = distance == "cosine"
    level_log = 20 if verbose else 10  # logging.INFO / logging.DEBUG

    with _Workers(threads) as workers:
        partitions, counts = _hierarchy(x, cosine, ensure_early_exit, exact_limit, ann, params, seed, block, workers,
                                        level_log)
    req_partition = None
    if req is not None:
        req_partition = _requested_partition(x, partitions, counts, req, cosine, threads)
    return FinchResult(partitions=partitions, counts=counts, req_partition=req_partition)


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _hierarchy(x: np.ndarray, cosine: bool, ensure_early_exit: bool, exact_limit: int, ann: str,
               params: dict[str, int | None], seed: int, block: int, workers: _Workers,
               level_log: int) -> tuple[np.ndarray, np.ndarray]:
    """All kept levels: (partitions N x L int32, counts L int64)."""
    n = x.shape[0]

    def neighbours(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        exact = points.shape[0] <= exact_limit
        nn, dist = _first_neighbours(points, cosine, exact=exact, ann=ann, params=params, seed=seed, block=block,
                                     workers=workers)
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
    return partitions, np.asarray(counts, dtype=np.int64)


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


class _Workers:
    """Worker threads for faiss calls, each with OpenMP limited to one thread.

    Work is split into blocks (of queries, or IVF lists) and spread over the threads; results come
    back in submission order, so the outcome does not depend on the number of threads. Single
    threaded faiss calls on several Python threads avoid OpenMP's barriers, which cost a lot on a
    machine whose cores are shared with other processes.
    """

    def __init__(self, threads: int) -> None:
        import faiss

        self.threads = threads
        self._faiss = faiss
        self._executor = None
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(threads, thread_name_prefix="finch",
                                                initializer=faiss.omp_set_num_threads, initargs=(1,))

    def __enter__(self) -> "_Workers":
        self._main_threads = self._faiss.omp_get_max_threads()
        self._faiss.omp_set_num_threads(1)  # OpenMP settings are per thread: this one's only
        return self

    def __exit__(self, *exc: object) -> None:
        self._faiss.omp_set_num_threads(self._main_threads)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def map(self, fn, items):
        """``fn`` over ``items`` in order, at most 2 * threads blocks in flight."""
        if self._executor is None:
            yield from map(fn, items)
            return
        from collections import deque

        pending: deque = deque()
        for item in items:
            pending.append(self._executor.submit(fn, item))
            if len(pending) >= 2 * self.threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _first_neighbours(x: np.ndarray, cosine: bool, *, exact: bool, ann: str, params: dict[str, int | None],
                      seed: int, block: int, workers: _Workers) -> tuple[np.ndarray, np.ndarray]:
    """First neighbour (self excluded) of every row and the distance to it (1 - cos, or L2).

    ``n == 1`` gives the point itself at distance inf.
    """
    n = x.shape[0]
    if n == 1:
        return np.zeros(1, np.int64), np.full(1, np.inf)
    if exact:
        nn, score = _flat_neighbours(x, cosine, block, workers)
    elif ann == "hnsw":
        nn, score = _hnsw_neighbours(x, cosine, params, seed, block, workers)
    else:
        nn, score = _ivf_neighbours(x, cosine, params, seed, block, workers)
    missing = np.flatnonzero(nn < 0)
    if missing.size:  # the approximate index returned nothing but the point itself
        nn[missing], score[missing] = _flat_neighbours(x, cosine, block, workers, rows=missing)
    dist = np.clip(1.0 - score, 0.0, 2.0) if cosine else np.sqrt(np.maximum(-score, 0.0))
    return nn, dist


def _best_candidate(values: np.ndarray, ids: np.ndarray, rows: np.ndarray, cosine: bool) -> tuple[np.ndarray, np.ndarray]:
    """Best non-self candidate per row: highest inner product (lowest squared L2), then lowest id.

    Returns (ids, scores) with scores "higher is better" (inner product, or minus squared L2);
    id -1 and score -inf where no candidate other than the row itself was returned.
    """
    valid = (ids >= 0) & (ids != rows[:, None])
    vals = np.where(valid, values.astype(np.float64) if cosine else -values.astype(np.float64), -np.inf)
    best = vals.max(axis=1)
    tied = valid & (vals == best[:, None])
    nn = np.where(tied, ids, np.iinfo(np.int64).max).min(axis=1)
    nn[~valid.any(axis=1)] = -1
    return nn, best


def _blocks(n: int, block: int) -> list[tuple[int, int]]:
    """Spans of at most ``block`` rows; at least 8 spans (of >= 256 rows) so that worker threads
    share the work evenly. Independent of the thread count, like the result."""
    size = max(1, min(block, max(256, -(-n // 8))))
    return [(start, min(n, start + size)) for start in range(0, n, size)]


def _flat_neighbours(x: np.ndarray, cosine: bool, block: int, workers: _Workers,
                     rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact first neighbours of ``x[rows]`` (default: all rows) among all rows of ``x``.

    faiss scans the database in index order and replaces a kept candidate only by a strictly
    better one, so among equal scores the lowest ids are returned.
    """
    import faiss

    index = faiss.IndexFlatIP(x.shape[1]) if cosine else faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    rows = np.arange(x.shape[0]) if rows is None else rows

    def search(span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        q = rows[span[0]:span[1]]
        values, ids = index.search(x[q], 2)
        return _best_candidate(values, ids, q, cosine)

    parts = list(workers.map(search, _blocks(rows.size, block)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _hnsw_neighbours(x: np.ndarray, cosine: bool, params: dict[str, int | None], seed: int, block: int,
                     workers: _Workers) -> tuple[np.ndarray, np.ndarray]:
    """faiss HNSW over ``x``, built on one thread (parallel insertion order varies between runs)."""
    import faiss

    index = faiss.IndexHNSWFlat(x.shape[1], int(params["M"]), faiss.METRIC_INNER_PRODUCT if cosine else faiss.METRIC_L2)
    index.hnsw.rng = faiss.RandomGenerator(seed)
    index.hnsw.efConstruction = int(params["ef_construction"])
    index.hnsw.efSearch = int(params["ef_search"])
    index.add(x)  # the calling thread runs faiss with one OpenMP thread (see _Workers)

    def search(span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        values, ids = index.search(x[span[0]:span[1]], 2)
        return _best_candidate(values, ids, np.arange(*span), cosine)

    parts = list(workers.map(search, _blocks(x.shape[0], block)))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _ivf_neighbours(x: np.ndarray, cosine: bool, params: dict[str, int | None], seed: int, block: int,
                    workers: _Workers) -> tuple[np.ndarray, np.ndarray]:
    """IVF-Flat first neighbours, searched cell by cell.

    Cells: seeded k-means (spherical for cosine) on a seeded sample. Each point lives in its
    nearest cell and its query scans its ``nprobe`` nearest cells, as in faiss ``IndexIVFFlat``,
    with the same result; but the scan goes cell by cell, all queries that probe a cell being
    searched against its members in one exact ``IndexFlat`` call (a matrix product). Queries
    first scan their own cell; another probed cell is then skipped when a bound (angle to the
    cell's centre minus the cell's angular radius, or the triangle inequality for Euclidean) shows
    that none of its points can match what the query has already found.
    """
    import faiss

    n, d = x.shape
    nlist = params["nlist"] or int(round(math.sqrt(n)))
    nlist = max(1, min(nlist, n // 39 if params["nlist"] is None else n))
    nprobe = min(nlist, int(params["nprobe"]))
    train_size = min(n, max(nlist, params["train_size"] or 40 * nlist))
    rng = np.random.default_rng(seed)
    sample = x if train_size >= n else x[np.sort(rng.choice(n, train_size, replace=False))]
    kmeans = faiss.Kmeans(d, nlist, niter=int(params["niter"]), seed=seed, spherical=cosine,
                          min_points_per_centroid=1, max_points_per_centroid=max(256, -(-train_size // nlist)))
    kmeans.train(sample)
    centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
    if cosine:
        centroids = _search_space(centroids, True)  # unit centres: cell scores are cosines
    quantizer = faiss.IndexFlatIP(d) if cosine else faiss.IndexFlatL2(d)
    quantizer.add(centroids)

    parts = list(workers.map(lambda span: quantizer.search(x[span[0]:span[1]], nprobe), _blocks(n, block)))
    cell_score = np.concatenate([p[0] for p in parts]).astype(np.float64)  # (n, nprobe), nearest first
    cells = np.concatenate([p[1] for p in parts])
    del parts
    own = cells[:, 0]
    members = np.argsort(own, kind="stable")  # each cell's points in index order
    member_bounds = np.searchsorted(own[members], np.arange(nlist + 1))

    def scan_cells(pair_cell: np.ndarray, pair_query: np.ndarray, nn: np.ndarray, best: np.ndarray) -> None:
        """Search each query against the members of its paired cell; keep improvements (in cell order)."""
        order = np.argsort(pair_cell, kind="stable")
        pair_cell, pair_query = pair_cell[order], pair_query[order]
        bounds = np.searchsorted(pair_cell, np.arange(nlist + 1))

        def scan(cell: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
            mem = members[member_bounds[cell]:member_bounds[cell + 1]]
            qs = pair_query[bounds[cell]:bounds[cell + 1]]
            if mem.size == 0 or qs.size == 0:
                return None
            index = faiss.IndexFlatIP(d) if cosine else faiss.IndexFlatL2(d)
            index.add(x[mem])
            found, scores = [], []
            for start in range(0, qs.size, block):
                q = qs[start:start + block]
                values, local = index.search(x[q], 2)
                ids = np.where(local >= 0, mem[np.maximum(local, 0)], -1)
                cand, score = _best_candidate(values, ids, q, cosine)
                found.append(cand)
                scores.append(score)
            return qs, np.concatenate(found), np.concatenate(scores)

        for part in workers.map(scan, range(nlist)):  # merged in cell order: deterministic
            if part is None:
                continue
            qs, cand, score = part
            better = (cand >= 0) & ((score > best[qs]) | ((score == best[qs]) & (cand < nn[qs])))
            nn[qs[better]] = cand[better]
            best[qs[better]] = score[better]

    nn = np.full(n, -1, np.int64)
    best = np.full(n, -np.inf)
    scan_cells(own, np.arange(n), nn, best)  # own cell first
    if nprobe > 1:
        # Bounds on the best score a probed cell can offer, padded for float32 rounding.
        slack = 1e-5 + 2e-7 * d
        nonempty = member_bounds[1:] > member_bounds[:-1]
        own_score = cell_score[members, 0]
        starts = member_bounds[:-1][nonempty]
        other, score = cells[:, 1:], cell_score[:, 1:]
        if cosine:  # angle(q, y) >= angle(q, centre) - max angle(member, centre)
            radius = np.zeros(nlist)
            radius[nonempty] = np.arccos(np.clip(np.minimum.reduceat(own_score, starts) - slack, -1, 1))
            gap = np.arccos(np.clip(score + slack, -1, 1)) - radius[other]
            reachable = np.cos(np.clip(gap, 0, np.pi)) + slack >= best[:, None]
        else:  # |q - y| >= |q - centre| - max |member - centre|
            radius = np.zeros(nlist)
            radius[nonempty] = np.sqrt(np.maximum.reduceat(own_score, starts))
            gap = np.sqrt(score) - radius[other]
            scale = 1 + np.sqrt(score) + radius[other]
            reachable = gap <= np.sqrt(np.maximum(-best, 0))[:, None] + slack * scale
        pair_query, rank = np.nonzero(reachable)
        _LOG.debug("IVF: %d points, %d cells, nprobe %d: %.1f%% of the other probed cells scanned", n, nlist, nprobe,
                   100 * pair_query.size / max(1, reachable.size))
        scan_cells(other[pair_query, rank], pair_query, nn, best)
    return nn, best


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
                         cosine: bool, threads: int) -> np.ndarray:
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
    parent = _merge_closest_pairs(sums, sizes, req, cosine, threads)
    root = parent.copy()
    while True:  # resolve the merge forest (each merged cluster points to a lower label)
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    return _first_occurrence(root[start]).astype(np.int32)


@njit(cache=True, nogil=True, inline="always")
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


@njit(cache=True, nogil=True, inline="always")
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


@njit(cache=True, nogil=True)
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


@njit(cache=True, nogil=True, parallel=True)
def _initial_neighbours(v, active, nn, best, cosine):
    for i in prange(v.shape[0]):
        nn[i], best[i] = _rescan(v, active, i, cosine)


@njit(cache=True, nogil=True)
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


def _merge_closest_pairs(sums: np.ndarray, sizes: np.ndarray, target: int, cosine: bool, threads: int) -> np.ndarray:
    """Merge the closest pair of cluster means until ``target`` clusters remain.

    Returns ``parent``: each merged-away cluster points to the (lower) label it joined.
    """
    import numba

    k = sums.shape[0]
    parent = np.arange(k, dtype=np.int64)
    if target < k:
        previous = numba.get_num_threads()
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        try:
            _merge_closest_pairs_kernel(np.ascontiguousarray(sums, np.float64), np.ascontiguousarray(sizes, np.float64),
                                        int(target), bool(cosine), parent)
        finally:
            numba.set_num_threads(previous)
    return parent
