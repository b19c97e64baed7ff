"""First neighbours for FINCH: the most similar other row of every row, with faiss.

- :func:`first_neighbours` picks the search: exact (faiss ``IndexFlatIP`` / ``IndexFlatL2``
  searched in blocks of queries, never an N x N matrix) or approximate above the caller's limit
  (a seeded inverted file of k-means cells, or faiss HNSW).
- :class:`Workers` runs the blocks on worker threads, each with OpenMP limited to one thread, and
  hands the results back in submission order, so nothing depends on the number of threads.

Scores are "higher is better": the inner product of unit rows (cosine) or minus the squared L2
distance. Among equal scores the lowest row index wins, in every search.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

from ..log import get_logger

__all__ = ["ANN_DEFAULTS", "ANN_METHODS", "Workers", "first_neighbours", "search_space"]

_LOG = get_logger("discover.finch")

ANN_METHODS = ("ivf", "hnsw")

# Defaults of the approximate indexes; ``None`` means "derived from the number of points".
ANN_DEFAULTS: dict[str, dict[str, int | None]] = {
    # IVF-Flat: nlist cells (default round(sqrt(n)), at most n // 39 so k-means has 39 training
    # points per cell), nprobe cells searched per query, k-means on train_size points (default
    # min(n, 40 * nlist)) for niter iterations.
    "ivf": {"nlist": None, "nprobe": 8, "train_size": None, "niter": 10},
    # IndexHNSWFlat: M links per node, efConstruction / efSearch beam widths.
    "hnsw": {"M": 16, "ef_construction": 80, "ef_search": 128},
}

_T = TypeVar("_T")
_R = TypeVar("_R")
Neighbours = tuple[np.ndarray, np.ndarray]  # (ids int64, scores float64), -1 / -inf for none


def search_space(points: np.ndarray, cosine: bool) -> np.ndarray:
    """C-contiguous float32 rows to search: L2-normalised for cosine (zero rows stay zero)."""
    if cosine:
        norms = np.linalg.norm(points, axis=1)
        norms[norms == 0] = 1
        points = points / norms[:, None]
    return np.ascontiguousarray(points, dtype=np.float32)


class Workers:
    """Worker threads for faiss calls, each with OpenMP limited to one thread.

    Work is split into blocks (of queries, or IVF lists) and spread over the threads; results come
    back in submission order, so the outcome does not depend on the number of threads. Single
    threaded faiss calls on several Python threads avoid OpenMP's barriers, which cost a lot on a
    machine whose cores are shared with other processes. Use it as a context manager.
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

    def __enter__(self) -> Workers:
        self._main_threads = self._faiss.omp_get_max_threads()
        self._faiss.omp_set_num_threads(1)  # OpenMP settings are per thread: this one's only
        return self

    def __exit__(self, *exc: object) -> None:
        self._faiss.omp_set_num_threads(self._main_threads)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def map(self, fn: Callable[[_T], _R], items: Iterable[_T]) -> Iterator[_R]:
        """``fn`` over ``items`` in order, at most 2 * threads blocks in flight."""
        if self._executor is None:
            yield from map(fn, items)
            return
        pending: deque = deque()
        for item in items:
            pending.append(self._executor.submit(fn, item))
            if len(pending) >= 2 * self.threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def first_neighbours(x: np.ndarray, cosine: bool, *, exact: bool, ann: str, params: dict[str, int | None],
                     seed: int, block: int, workers: Workers) -> tuple[np.ndarray, np.ndarray]:
    """First neighbour (self excluded) of every row of ``x`` and the distance to it.

    ``x`` comes from :func:`search_space`. Distances are ``1 - cos`` (clipped to 0..2) or L2.
    ``exact`` chooses the flat search; otherwise ``ann`` ("ivf" or "hnsw", with ``params`` as
    in :data:`ANN_DEFAULTS` and ``seed``); a row the index returns nothing for (but itself) gets
    an exact search. ``n == 1`` gives the point itself at distance inf.
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


def _best_candidate(values: np.ndarray, ids: np.ndarray, rows: np.ndarray, cosine: bool) -> Neighbours:
    """Best non-self candidate per row: highest inner product (lowest squared L2), then lowest id.

    ``values``/``ids`` are a faiss search's answer for the queries ``rows``. Returns (ids, scores)
    with scores "higher is better"; id -1 and score -inf where no candidate other than the row
    itself was returned.
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


def _concatenate(parts: Iterable[Neighbours]) -> Neighbours:
    parts = list(parts)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _flat_index(d: int, cosine: bool) -> Any:
    import faiss

    return faiss.IndexFlatIP(d) if cosine else faiss.IndexFlatL2(d)


def _flat_neighbours(x: np.ndarray, cosine: bool, block: int, workers: Workers,
                     rows: np.ndarray | None = None) -> Neighbours:
    """Exact first neighbours of ``x[rows]`` (default: all rows) among all rows of ``x``.

    faiss scans the database in index order and replaces a kept candidate only by a strictly
    better one, so among equal scores the lowest ids are returned.
    """
    index = _flat_index(x.shape[1], cosine)
    index.add(x)
    rows = np.arange(x.shape[0]) if rows is None else rows

    def search(span: tuple[int, int]) -> Neighbours:
        q = rows[span[0]:span[1]]
        values, ids = index.search(x[q], 2)
        return _best_candidate(values, ids, q, cosine)

    return _concatenate(workers.map(search, _blocks(rows.size, block)))


def _hnsw_neighbours(x: np.ndarray, cosine: bool, params: dict[str, int | None], seed: int, block: int,
                     workers: Workers) -> Neighbours:
    """faiss HNSW over ``x``, built on one thread (parallel insertion order varies between runs)."""
    import faiss

    index = faiss.IndexHNSWFlat(x.shape[1], int(params["M"]), faiss.METRIC_INNER_PRODUCT if cosine else faiss.METRIC_L2)
    index.hnsw.rng = faiss.RandomGenerator(seed)
    index.hnsw.efConstruction = int(params["ef_construction"])
    index.hnsw.efSearch = int(params["ef_search"])
    index.add(x)  # the calling thread runs faiss with one OpenMP thread (see Workers)

    def search(span: tuple[int, int]) -> Neighbours:
        values, ids = index.search(x[span[0]:span[1]], 2)
        return _best_candidate(values, ids, np.arange(*span), cosine)

    return _concatenate(workers.map(search, _blocks(x.shape[0], block)))


# ----------------------------------------------------------------------------------------------
# IVF: k-means cells scanned cell by cell, other cells pruned by a bound
# ----------------------------------------------------------------------------------------------


class _Cells:
    """The inverted file: seeded k-means cells, each point stored in its nearest cell.

    ``cells`` (n, nprobe) are each point's probed cells, nearest first, ``cell_score`` the scores
    to their centres (inner product with unit centres, or squared L2); ``members`` lists each
    cell's points in index order, cell ``c`` being ``members[bounds[c]:bounds[c + 1]]``.
    """

    def __init__(self, x: np.ndarray, cosine: bool, params: dict[str, int | None], seed: int, block: int,
                 workers: Workers) -> None:
        import faiss

        n, d = x.shape
        nlist = params["nlist"] or int(round(math.sqrt(n)))
        self.nlist = nlist = max(1, min(nlist, n // 39 if params["nlist"] is None else n))
        self.nprobe = nprobe = min(nlist, int(params["nprobe"]))
        train_size = min(n, max(nlist, params["train_size"] or 40 * nlist))
        rng = np.random.default_rng(seed)
        sample = x if train_size >= n else x[np.sort(rng.choice(n, train_size, replace=False))]
        kmeans = faiss.Kmeans(d, nlist, niter=int(params["niter"]), seed=seed, spherical=cosine,
                              min_points_per_centroid=1, max_points_per_centroid=max(256, -(-train_size // nlist)))
        kmeans.train(sample)
        centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
        if cosine:
            centroids = search_space(centroids, True)  # unit centres: cell scores are cosines
        quantizer = _flat_index(d, cosine)
        quantizer.add(centroids)

        parts = list(workers.map(lambda span: quantizer.search(x[span[0]:span[1]], nprobe), _blocks(n, block)))
        self.cell_score = np.concatenate([p[0] for p in parts]).astype(np.float64)
        self.cells = np.concatenate([p[1] for p in parts])
        own = self.cells[:, 0]
        self.members = np.argsort(own, kind="stable")
        self.bounds = np.searchsorted(own[self.members], np.arange(nlist + 1))

    def reachable(self, best: np.ndarray, cosine: bool, d: int) -> np.ndarray:
        """(n, nprobe - 1) mask of the other probed cells that may hold a point scoring ``best`` or better.

        A bound on the best score a cell can offer, padded for float32 rounding: cosine,
        angle(q, y) >= angle(q, centre) - max angle(member, centre); Euclidean, |q - y| >=
        |q - centre| - max |member - centre|.
        """
        slack = 1e-5 + 2e-7 * d
        nonempty = self.bounds[1:] > self.bounds[:-1]
        own_score = self.cell_score[self.members, 0]
        starts = self.bounds[:-1][nonempty]
        other, score = self.cells[:, 1:], self.cell_score[:, 1:]
        radius = np.zeros(self.nlist)
        if cosine:
            radius[nonempty] = np.arccos(np.clip(np.minimum.reduceat(own_score, starts) - slack, -1, 1))
            gap = np.arccos(np.clip(score + slack, -1, 1)) - radius[other]
            return np.cos(np.clip(gap, 0, np.pi)) + slack >= best[:, None]
        radius[nonempty] = np.sqrt(np.maximum.reduceat(own_score, starts))
        gap = np.sqrt(score) - radius[other]
        scale = 1 + np.sqrt(score) + radius[other]
        return gap <= np.sqrt(np.maximum(-best, 0))[:, None] + slack * scale


def _ivf_neighbours(x: np.ndarray, cosine: bool, params: dict[str, int | None], seed: int, block: int,
                    workers: Workers) -> Neighbours:
    """IVF-Flat first neighbours, searched cell by cell.

    Cells: seeded k-means (spherical for cosine) on a seeded sample. Each point lives in its
    nearest cell and its query scans its ``nprobe`` nearest cells, as in faiss ``IndexIVFFlat``,
    with the same result; but the scan goes cell by cell, all queries that probe a cell being
    searched against its members in one exact ``IndexFlat`` call (a matrix product). Queries
    first scan their own cell; another probed cell is then skipped when a bound (angle to the
    cell's centre minus the cell's angular radius, or the triangle inequality for Euclidean) shows
    that none of its points can match what the query has already found.
    """
    n, d = x.shape
    cells = _Cells(x, cosine, params, seed, block, workers)
    nn = np.full(n, -1, np.int64)
    best = np.full(n, -np.inf)
    _scan_cells(x, cosine, cells, cells.cells[:, 0], np.arange(n), nn, best, block, workers)  # own cell first
    if cells.nprobe > 1:
        reachable = cells.reachable(best, cosine, d)
        pair_query, rank = np.nonzero(reachable)
        _LOG.debug("IVF: %d points, %d cells, nprobe %d: %.1f%% of the other probed cells scanned", n, cells.nlist,
                   cells.nprobe, 100 * pair_query.size / max(1, reachable.size))
        _scan_cells(x, cosine, cells, cells.cells[:, 1:][pair_query, rank], pair_query, nn, best, block, workers)
    return nn, best


def _scan_cells(x: np.ndarray, cosine: bool, cells: _Cells, pair_cell: np.ndarray, pair_query: np.ndarray,
                nn: np.ndarray, best: np.ndarray, block: int, workers: Workers) -> None:
    """Search each query against the members of its paired cell; keep improvements (in cell order)."""
    order = np.argsort(pair_cell, kind="stable")
    pair_cell, pair_query = pair_cell[order], pair_query[order]
    bounds = np.searchsorted(pair_cell, np.arange(cells.nlist + 1))

    def scan(cell: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        mem = cells.members[cells.bounds[cell]:cells.bounds[cell + 1]]
        qs = pair_query[bounds[cell]:bounds[cell + 1]]
        if mem.size == 0 or qs.size == 0:
            return None
        index = _flat_index(x.shape[1], cosine)
        index.add(x[mem])
        found = []
        for start in range(0, qs.size, block):
            q = qs[start:start + block]
            values, local = index.search(x[q], 2)
            ids = np.where(local >= 0, mem[np.maximum(local, 0)], -1)
            found.append(_best_candidate(values, ids, q, cosine))
        return (qs, *_concatenate(found))

    for part in workers.map(scan, range(cells.nlist)):  # merged in cell order: deterministic
        if part is None:
            continue
        qs, cand, score = part
        better = (cand >= 0) & ((score > best[qs]) | ((score == best[qs]) & (cand < nn[qs])))
        nn[qs[better]] = cand[better]
        best[qs[better]] = score[better]
