"""FINCH: parameter-free clustering by first-neighbour relations (Sarfraz et al., CVPR 2019).

Every point is linked to its first neighbour (the most similar other point); the connected
components of that graph are the clusters of level 0. The same step runs again on the cluster
means (means of the original points), level after level, which gives a hierarchy of partitions
without any parameter. ``req_clust`` then cuts the hierarchy at an exact number of groups.

The algorithm reads as in the reference ``finch-clust`` (0.2.3): first neighbours
(:mod:`.neighbours`) -> components (:func:`_components`) -> cluster means
(:func:`_cluster_sums`) -> again, in :func:`_hierarchy`; then the ``req_clust`` refinement
(:func:`_requested_partition`, merging in :mod:`._kernels`). The levels equal the reference's,
with these differences:

- First neighbours come from faiss (exact blocked inner-product search, or a seeded
  inverted-file / HNSW index for large inputs; never an N x N matrix).
- The early-exit rule is applied as the paper and the reference intend; the reference's version
  has no effect (see ``ensure_early_exit``).
- ``req_clust`` always gets exactly that many groups. The reference ranks the pairs of cluster
  means by their cosine distance rounded to float32 and, in each step, keeps the two shortest
  first-neighbour links: normally both links of the closest pair, but when two different pairs
  tie at the smallest float32 distance (pairs about 1e-8 apart, a few times in a thousand merges
  on random data) it keeps one link of each and merges both pairs in one step, so it returns
  ``req_clust - 1`` groups (the partition we return for ``req_clust - 1``); which two tied links
  it keeps depends on numpy's unstable ``argsort``. Here the pairs are ranked in float64 and
  one pair merges per step. Away from such ties the partitions are identical.
- Edge cases on which the reference misbehaves (``req_clust`` above the finest level, N <= 2)
  have defined answers.

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

import numbers
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from ..log import get_logger
from ._kernels import merge_closest_pairs
from .neighbours import ANN_DEFAULTS, ANN_METHODS, Workers, first_neighbours, search_space

__all__ = ["ANN_METHODS", "DISTANCES", "FinchResult", "finch"]

_LOG = get_logger("discover.finch")

DISTANCES = ("cosine", "euclidean")

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


def finch(data: Any, *, req_clust: int | None = None, distance: str = "cosine", ensure_early_exit: bool = False,
          exact_limit: int = 20_000, ann: str = "ivf", ann_params: Mapping[str, int] | None = None, seed: int = 0,
          block: int = 4096, threads: int | None = None, verbose: bool = False) -> FinchResult:
    """Cluster the rows of ``data`` with FINCH and return every level of the hierarchy.

    Parameters
    ----------
    data : array_like, shape (N, D)
        Real, finite feature vectors, one per row (N >= 1, D >= 1); cast to C-contiguous float32.
    req_clust : int, optional
        Also return a partition with exactly this many groups (1 <= req_clust <= N): the level
        with that many clusters if there is one, else the coarsest level with more clusters
        refined by merging the closest pair of cluster means (same ``distance``; means of the
        original points), one pair at a time. Above the finest level's count the merging starts
        from singletons (the reference returns level 0 then). Cost O((k - req_clust) k D).
    distance : {"cosine", "euclidean"}
        Cosine (the reference's default; data are L2-normalised for the search) or Euclidean.
    ensure_early_exit : bool, default False
        From level 1 on, drop every first-neighbour link longer than the longest link of level 0.
        finch-clust 0.2.3 defaults to True, but marks the dropped links as explicit zeros, which
        ``scipy.sparse.csgraph`` still counts as edges, so its rule never changes its output:
        False reproduces the reference's default partitions; True applies the rule, at any N.
    exact_limit : int, default 20000
        Levels with at most this many points (or cluster means) get exact first neighbours
        (faiss flat search in blocks of ``block`` queries, memory O(N D + block)); larger levels
        use the approximate index ``ann``.
    ann : {"ivf", "hnsw"}, default "ivf"
        "ivf": an inverted file of k-means cells, the same candidates as faiss ``IndexIVFFlat``,
        scanned cell by cell with exact searches; "hnsw": faiss ``IndexHNSWFlat``. Scores of the
        candidates are exact. Reliable on clustered data (FINCH's use); on unclustered
        high-dimensional data many are wrong (for 64-D Gaussian noise IVF finds about half):
        raise ``exact_limit`` or ``nprobe`` there.
    ann_params : mapping, optional
        Index parameters: "ivf" ``nlist`` (round(sqrt(n)), at most n // 39), ``nprobe`` (8),
        ``train_size`` (min(n, 40 nlist)), ``niter`` (10); "hnsw" ``M`` (16),
        ``ef_construction`` (80), ``ef_search`` (128).
    seed, block : int, default 0 and 4096
        Seed of the approximate index (k-means sample and start; HNSW levels, built on one
        thread); queries per faiss search call.
    threads : int, optional
        Worker threads (default: the CPUs this process may use), each running faiss on one
        OpenMP thread; the result does not depend on it. Also caps numba's threads.
    verbose : bool, default False
        Log each level at INFO instead of DEBUG (logger ``segsort_unsup.discover.finch``).

    Returns
    -------
    FinchResult
        As in the reference, recursion stops at the first level with one cluster or fewer than
        two clusters less than the level below, and that level is not kept; N = 1 gives
        ``partitions == [[0]]``.

    Raises
    ------
    ValueError
        On malformed input (not 2-D, empty, non-finite, beyond float32, ``req_clust`` outside
        1..N, unknown ``distance``, ``ann`` or ``ann_params`` keys), saying what to change.
    """
    x = _validate_data(data)
    req = _validate_req(req_clust, x.shape[0])
    if distance not in DISTANCES:
        raise ValueError(f"distance={distance!r} is not supported; use one of {DISTANCES}")
    threads = _validate_int("threads", _default_threads() if threads is None else threads, 1)
    search = _Search(cosine=distance == "cosine", exact_limit=_validate_int("exact_limit", exact_limit, 0), ann=ann,
                     params=_validate_ann(ann, ann_params), seed=_validate_int("seed", seed, 0),
                     block=_validate_int("block", block, 1))
    with Workers(threads) as workers:
        partitions, counts = _hierarchy(x, search, workers, ensure_early_exit, 20 if verbose else 10)
    req_partition = None
    if req is not None:
        req_partition = _requested_partition(x, partitions, counts, req, search.cosine, threads)
    return FinchResult(partitions=partitions, counts=counts, req_partition=req_partition)


@dataclass(frozen=True)
class _Search:
    """How first neighbours are searched (see :func:`finch`)."""

    cosine: bool
    exact_limit: int
    ann: str
    params: dict[str, int | None]
    seed: int
    block: int

    def neighbours(self, points: np.ndarray, workers: Workers) -> tuple[np.ndarray, np.ndarray, str]:
        """First neighbour and distance of every row of ``points``, and the search's name."""
        exact = points.shape[0] <= self.exact_limit
        nn, dist = first_neighbours(search_space(points, self.cosine), self.cosine, exact=exact, ann=self.ann,
                                    params=self.params, seed=self.seed, block=self.block, workers=workers)
        return nn, dist, "exact" if exact else self.ann


def _hierarchy(x: np.ndarray, search: _Search, workers: Workers, ensure_early_exit: bool,
               level_log: int) -> tuple[np.ndarray, np.ndarray]:
    """All kept levels: (partitions N x L int32, counts L int64)."""
    n = x.shape[0]
    # Level 0: first neighbours of the points.
    t0 = time.perf_counter()
    nn, dist, how = search.neighbours(x, workers)
    labels = _components(nn)
    levels = [labels]
    counts = [int(labels.max()) + 1]
    _LOG.log(level_log, "FINCH level 0: %d points -> %d clusters (%s, %.2fs)", n, counts[0], how,
             time.perf_counter() - t0)
    max_link = float(dist.max()) if ensure_early_exit and n > 1 else None

    # Recursion on the cluster means. The reference keeps a new level only if it has more than
    # one cluster and at least two fewer than the previous one, so nothing can follow k <= 3.
    while counts[-1] > 3:
        t0 = time.perf_counter()
        k = counts[-1]
        sums, sizes = _cluster_sums(x, labels, k)
        nn, dist, how = search.neighbours(sums / sizes[:, None], workers)
        node_labels = _components(nn, None if max_link is None else dist <= max_link)
        k_new = int(node_labels.max()) + 1
        kept = k_new > 1 and k - k_new > 1
        _LOG.log(level_log, "FINCH level %d: %d means -> %d clusters (%s, %.2fs)%s", len(levels), k, k_new, how,
                 time.perf_counter() - t0, "" if kept else "; stop, level not kept")
        if not kept:
            break
        labels = node_labels[labels]
        levels.append(labels)
        counts.append(k_new)
    partitions = np.empty((n, len(levels)), dtype=np.int32)
    for i, lab in enumerate(levels):
        partitions[:, i] = lab
    return partitions, np.asarray(counts, dtype=np.int64)


def _requested_partition(x: np.ndarray, partitions: np.ndarray, counts: np.ndarray, req: int,
                         cosine: bool, threads: int) -> np.ndarray:
    """The partition with ``req`` groups: a level, or the next finer level (or singletons) merged down."""
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
    parent = merge_closest_pairs(sums, sizes, req, cosine, threads)
    root = parent.copy()
    while True:  # resolve the merge forest (each merged cluster points to a lower label)
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    return _first_occurrence(root[start]).astype(np.int32)


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
# Validation
# ----------------------------------------------------------------------------------------------


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


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
    params = dict(ANN_DEFAULTS[ann])
    for key, value in (ann_params or {}).items():
        if key not in params:
            raise ValueError(f"unknown ann_params key {key!r} for ann={ann!r}; known keys: {sorted(params)}")
        if value is not None:
            params[key] = _validate_int(f"ann_params[{key!r}]", value, 1)
    return params
