"""The shared numba heap: pops in (key, id) order, whatever the order of the pushes."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from segsort_unsup._heap import heap_pop, heap_push


@njit(cache=False)
def _drain(keys_in, ids_in):
    n = keys_in.size
    keys = np.empty(n, keys_in.dtype)
    ids = np.empty(n, np.int64)
    size = 0
    for i in range(n):
        size = heap_push(keys, ids, size, keys_in[i], ids_in[i])
    out_k = np.empty(n, keys_in.dtype)
    out_i = np.empty(n, np.int64)
    for i in range(n):
        out_k[i] = keys[0]
        out_i[i] = ids[0]
        size = heap_pop(keys, ids, size)
    return out_k, out_i


@pytest.mark.parametrize("dtype", [np.int64, np.float64])
def test_pop_order_is_key_then_id_for_any_insertion_order(dtype):
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 5, 300).astype(dtype)  # many ties
    ids = rng.permutation(300).astype(np.int64)
    expected = sorted(zip(keys.tolist(), ids.tolist()))
    for _ in range(5):
        order = rng.permutation(300)
        got_k, got_i = _drain(keys[order], ids[order])
        assert list(zip(got_k.tolist(), got_i.tolist())) == expected


def test_interleaved_pushes_and_pops():
    rng = np.random.default_rng(1)
    keys = np.empty(64, np.float64)
    ids = np.empty(64, np.int64)
    size = 0
    held: list[tuple[float, int]] = []
    for step in range(400):
        if size < 64 and (size == 0 or rng.random() < 0.6):
            entry = (float(rng.integers(0, 4)), int(rng.integers(0, 50)))
            size = heap_push(keys, ids, size, entry[0], entry[1])
            held.append(entry)
        else:
            smallest = min(held)
            assert (keys[0], ids[0]) == smallest, step
            held.remove(smallest)
            size = heap_pop(keys, ids, size)
        assert size == len(held)
