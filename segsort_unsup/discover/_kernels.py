"""Numba kernels of FINCH's ``req_clust`` refinement: merge the closest pair of cluster means.

The closest pair is the pair of active clusters with the highest score (dot product of unit
means for cosine, minus the squared distance for Euclidean), in float64; among equal scores the
lowest label wins. Each cluster keeps its best partner, so one merge costs O(k D) plus a rescan
for the clusters whose partner moved.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

__all__ = ["merge_closest_pairs"]


def merge_closest_pairs(sums: np.ndarray, sizes: np.ndarray, target: int, cosine: bool, threads: int) -> np.ndarray:
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
