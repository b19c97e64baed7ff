"""A deterministic binary min-heap for numba kernels (Dijkstra in evaluate, merging in ucm).

The heap lives in two caller-owned arrays, ``keys`` and ``ids``, of capacity at least the
number of entries ever held at once; ``size`` is passed in and the new size returned. Entries
are ordered by ``(key, id)``: equal keys pop in increasing ``id``, so the pop order depends only
on the entries held, never on the order they were pushed. Stale entries (lazy deletion) are the
caller's business. Works for any numeric ``keys`` dtype (int64 costs, float64 strengths).
"""

from __future__ import annotations

from numba import njit

__all__ = ["heap_pop", "heap_push"]


@njit(cache=True, nogil=True, inline="always")
def _before(ka, ia, kb, ib):
    """Whether entry ``(ka, ia)`` pops before ``(kb, ib)``."""
    return ka < kb or (ka == kb and ia < ib)


@njit(cache=True, nogil=True)
def heap_push(keys, ids, size, key, ident):
    """Add ``(key, ident)``; returns the new size (the arrays must have room for it)."""
    i = size
    keys[i] = key
    ids[i] = ident
    while i > 0:
        parent = (i - 1) >> 1
        if _before(keys[i], ids[i], keys[parent], ids[parent]):
            keys[i], keys[parent] = keys[parent], keys[i]
            ids[i], ids[parent] = ids[parent], ids[i]
            i = parent
        else:
            break
    return size + 1


@njit(cache=True, nogil=True)
def heap_pop(keys, ids, size):
    """Remove the smallest entry (read ``keys[0]``, ``ids[0]`` first); returns the new size."""
    size -= 1
    keys[0] = keys[size]
    ids[0] = ids[size]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        child = left
        right = left + 1
        if right < size and _before(keys[right], ids[right], keys[left], ids[left]):
            child = right
        if _before(keys[child], ids[child], keys[i], ids[i]):
            keys[i], keys[child] = keys[child], keys[i]
            ids[i], ids[child] = ids[child], ids[i]
            i = child
        else:
            break
    return size
