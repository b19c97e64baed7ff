"""Numba kernels for the BSDS benchmarks: pixel correspondence, thinning, label tables.

No I/O, logging or objects here; the public wrappers in ``boundaries.py`` and ``regions.py``
validate and cast inputs (C-contiguous, fixed dtypes) before calling these.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .._heap import heap_pop, heap_push

_INF = np.int64(1) << 60


# --------------------------------------------------------------------------------------
# Pixel correspondence (BSR correspondPixels): min-cost assignment with outlier costs
# --------------------------------------------------------------------------------------


# The relaxation step (lower a column's distance, remember the column, push it) stays written out
# at each of its sites in _augment and _repair_after_removal: as a shared inlined helper returning
# (n_touched, size) it made the matching of real BSDS maps 20-40% slower (numba 0.68).


@njit(cache=True, nogil=True, inline="always")
def _forget(touched, n_touched, dist, pred, done):
    """Reset the Dijkstra labels of the columns a search touched (the others were never changed)."""
    for t in range(n_touched):
        x = touched[t]
        dist[x] = _INF
        pred[x] = -1
        done[x] = False


@njit(cache=True, nogil=True, inline="always")
def _shift_potentials(finalized, n_final, end_dist, dist, sign, u, v, col_to_row):
    """Move every finalized column by ``sign * (end_dist - dist)`` and its row (if any) the opposite
    way, so that reduced costs stay >= 0 and matched edges tight."""
    for t in range(n_final):
        x = finalized[t]
        delta = sign * (end_dist - dist[x])
        v[x] += delta
        i = col_to_row[x]
        if i >= 0:
            u[i] -= delta


@njit(cache=True, nogil=True)
def _augment(s, indptr, cols, costs, n_cols, outlier_cost, u, v, row_to_col, col_to_row,
             dist, pred, done, touched, finalized, heap_keys, heap_vals):
    """Assign free row ``s`` by one shortest augmenting path (Dijkstra on reduced costs).

    Columns ``0..n_cols-1`` are real; column ``n_cols + i`` is row i's private outlier, which only
    row i can take, at ``outlier_cost``. Keeps the invariants of successive shortest paths:
    reduced costs ``c - u - v >= 0``, matched edges tight, free columns at ``v == 0``. Columns at
    equal distance are settled in column order (the shared heap breaks ties by id), so among
    equally cheap augmenting paths the choice never depends on the order of the pushes.
    """
    n_touched = 0
    n_final = 0
    size = 0
    for k in range(indptr[s], indptr[s + 1]):
        j = cols[k]
        d = costs[k] - u[s] - v[j]
        if d < dist[j]:
            if dist[j] == _INF:
                touched[n_touched] = j
                n_touched += 1
            dist[j] = d
            pred[j] = s
            size = heap_push(heap_keys, heap_vals, size, d, j)
    j = n_cols + s
    dist[j] = outlier_cost - u[s] - v[j]
    pred[j] = s
    touched[n_touched] = j
    n_touched += 1
    size = heap_push(heap_keys, heap_vals, size, dist[j], j)
    end = -1
    end_dist = _INF
    while size > 0:
        dj = heap_keys[0]
        j = heap_vals[0]
        size = heap_pop(heap_keys, heap_vals, size)
        if done[j] or dj != dist[j]:
            continue
        if col_to_row[j] < 0:
            end = j
            end_dist = dj
            break
        done[j] = True
        finalized[n_final] = j
        n_final += 1
        q = col_to_row[j]
        for k in range(indptr[q], indptr[q + 1]):
            jj = cols[k]
            if done[jj]:
                continue
            d = dj + costs[k] - u[q] - v[jj]
            if d < dist[jj]:
                if dist[jj] == _INF:
                    touched[n_touched] = jj
                    n_touched += 1
                dist[jj] = d
                pred[jj] = q
                size = heap_push(heap_keys, heap_vals, size, d, jj)
        jj = n_cols + q
        d = dj + outlier_cost - u[q] - v[jj]
        if d < dist[jj]:
            if dist[jj] == _INF:
                touched[n_touched] = jj
                n_touched += 1
            dist[jj] = d
            pred[jj] = q
            size = heap_push(heap_keys, heap_vals, size, d, jj)
    # new potentials: finalized columns (dist < D) and their rows; then augment
    u[s] += end_dist
    _shift_potentials(finalized, n_final, end_dist, dist, -1, u, v, col_to_row)
    j = end
    while True:
        i = pred[j]
        prev = row_to_col[i]
        row_to_col[i] = j
        col_to_row[j] = i
        if i == s:
            break
        j = prev
    _forget(touched, n_touched, dist, pred, done)


@njit(cache=True, nogil=True)
def _repair_after_removal(r, indptr, cols, costs, rev_indptr, rev_rows, rev_costs, n_cols, outlier_cost,
                          is_active, u, v, row_to_col, col_to_row,
                          dist, pred, done, touched, finalized, heap_keys, heap_vals):
    """Delete row ``r`` and restore optimality for the rows left.

    If ``r`` held real column ``j``, that column is now free but priced ``v[j] < 0``. Any
    improvement is a cycle through ``j`` and the sink: some rows shift one column towards ``j``
    and the column at the far end (a real one, or an outlier: an unmatched row gets matched) is
    freed. A Dijkstra run backwards from ``j`` on reduced costs, cut at the price deficit
    ``B = -v[j]``, finds the cheapest such cycle; it is applied only when it gains (distance < B).
    Potentials are then shifted so that reduced costs stay >= 0 and free columns sit at 0.
    """
    j = row_to_col[r]
    is_active[r] = False
    row_to_col[r] = -1
    u[r] = 0
    col_to_row[n_cols + r] = -1
    v[n_cols + r] = 0
    if j < 0 or j >= n_cols:
        return
    col_to_row[j] = -1
    bound = -v[j]
    if bound <= 0:
        return
    sink = dist.shape[0] - 1
    n_touched = 0
    n_final = 0
    size = 0
    dist[j] = 0
    touched[n_touched] = j
    n_touched += 1
    size = heap_push(heap_keys, heap_vals, size, 0, j)
    end_dist = bound
    best_col = -1
    while size > 0:
        dx = heap_keys[0]
        x = heap_vals[0]
        size = heap_pop(heap_keys, heap_vals, size)
        if dx >= end_dist:
            break
        if x == sink:
            if dx == dist[sink]:
                end_dist = dx
                best_col = pred[sink]
                break
            continue
        if done[x] or dx != dist[x]:
            continue
        done[x] = True
        finalized[n_final] = x
        n_final += 1
        if x != j:
            # x is matched: close the cycle through the sink (arc sink -> x costs -v[x])
            d = dx - v[x]
            if d < dist[sink]:
                if dist[sink] == _INF:
                    touched[n_touched] = sink
                    n_touched += 1
                dist[sink] = d
                pred[sink] = x
                size = heap_push(heap_keys, heap_vals, size, d, sink)
        # rows i with a free arc i -> x move into x; their own column k follows at the same distance
        if x < n_cols:
            lo = rev_indptr[x]
            hi = rev_indptr[x + 1]
        else:
            lo = 0
            hi = 0
            q = x - n_cols
            if is_active[q] and row_to_col[q] != x:
                k = row_to_col[q]
                d = dx + outlier_cost - u[q] - v[x]
                if not done[k] and d < dist[k]:
                    if dist[k] == _INF:
                        touched[n_touched] = k
                        n_touched += 1
                    dist[k] = d
                    pred[k] = x
                    size = heap_push(heap_keys, heap_vals, size, d, k)
        for kk in range(lo, hi):
            i = rev_rows[kk]
            if not is_active[i] or row_to_col[i] == x:
                continue
            k = row_to_col[i]
            if done[k]:
                continue
            d = dx + rev_costs[kk] - u[i] - v[x]
            if d < dist[k]:
                if dist[k] == _INF:
                    touched[n_touched] = k
                    n_touched += 1
                dist[k] = d
                pred[k] = x
                size = heap_push(heap_keys, heap_vals, size, d, k)
    # potentials: every finalized column (and the row on it) moves by end_dist - its distance
    _shift_potentials(finalized, n_final, end_dist, dist, 1, u, v, col_to_row)
    if best_col >= 0:
        cur = best_col
        i = col_to_row[cur]
        col_to_row[cur] = -1
        while True:
            nxt = pred[cur]
            old = col_to_row[nxt]
            row_to_col[i] = nxt
            col_to_row[nxt] = i
            if nxt == j:
                break
            i = old
            cur = nxt
    _forget(touched, n_touched, dist, pred, done)


@njit(cache=True, nogil=True)
def match_incremental(active, indptr, cols, costs, rev_indptr, rev_rows, rev_costs, n_cols, outlier_cost, acc,
                      objective):
    """Optimal outlier assignments for a sequence of row subsets, reusing work between them.

    ``active`` (T, n_rows) bool: the machine pixels present at each step (thresholds from the
    sparsest map down, so rows are mostly added). An added row is inserted by one shortest
    augmenting path; a row that disappears (thinning can drop a pixel as the threshold falls) is
    deleted by :func:`_repair_after_removal`; each step ends at an exact optimum.
    ``rev_indptr``/``rev_rows``/``rev_costs``: column -> rows adjacency. ORs the matched rows
    of step t into ``acc[t]``; returns the matched count of every step. If ``objective`` has
    T entries it receives each step's assignment cost (for checks against a fresh solve).
    :func:`match_state` and :func:`match_steps` do the same a few steps at a time.
    """
    n_steps, n_rows = active.shape
    state = match_state(n_rows, n_cols, costs.shape[0])
    counts = np.zeros(n_steps, np.int64)
    match_steps(0, n_steps, active, np.arange(n_rows), indptr, cols, costs, rev_indptr, rev_rows, rev_costs, n_cols,
                outlier_cost, acc, objective, counts, state)
    return counts


@njit(cache=True, nogil=True)
def match_state(n_rows, n_cols, n_edges):
    """The working arrays of :func:`match_steps`, empty (nothing matched yet)."""
    n_all = n_cols + n_rows
    heap_cap = 2 * n_edges + 4 * n_rows + 16
    return (np.zeros(n_rows, np.int64), np.zeros(n_all, np.int64), np.full(n_rows, -1, np.int64),
            np.full(n_all, -1, np.int64), np.full(n_all + 1, _INF, np.int64), np.full(n_all + 1, -1, np.int64),
            np.zeros(n_all + 1, np.bool_), np.empty(n_all + 1, np.int64), np.empty(n_all + 1, np.int64),
            np.empty(heap_cap, np.int64), np.empty(heap_cap, np.int64), np.zeros(n_rows, np.bool_))


@njit(cache=True, nogil=True)
def match_steps(t0, t1, active, rows, indptr, cols, costs, rev_indptr, rev_rows, rev_costs, n_cols, outlier_cost,
                acc, objective, counts, state):
    """Steps ``t0 .. t1 - 1`` of :func:`match_incremental`, continuing from ``state``
    (:func:`match_state`); ``counts[t]`` receives each step's matched count. Row ``r`` of the graph
    is column ``rows[r]`` of ``active`` and ``acc`` (a subset of a larger pixel set, without copies)."""
    u, v, row_to_col, col_to_row, dist, pred, done, touched, finalized, heap_keys, heap_vals, is_active = state
    n_steps = active.shape[0]
    n_rows = rows.shape[0]
    for t in range(t0, t1):
        for r in range(n_rows):
            if is_active[r] and not active[t, rows[r]]:
                _repair_after_removal(r, indptr, cols, costs, rev_indptr, rev_rows, rev_costs, n_cols,
                                      outlier_cost, is_active, u, v, row_to_col, col_to_row,
                                      dist, pred, done, touched, finalized, heap_keys, heap_vals)
        for r in range(n_rows):
            if active[t, rows[r]] and not is_active[r]:
                is_active[r] = True
                u[r] = 0
                _augment(r, indptr, cols, costs, n_cols, outlier_cost, u, v, row_to_col, col_to_row,
                         dist, pred, done, touched, finalized, heap_keys, heap_vals)
        c = 0
        for r in range(n_rows):
            if is_active[r]:
                j = row_to_col[r]
                if j >= 0 and j < n_cols:
                    acc[t, rows[r]] = True
                    c += 1
        counts[t] = c
        if objective.shape[0] == n_steps:
            total = 0
            for r in range(n_rows):
                if is_active[r]:
                    j = row_to_col[r]
                    if j >= n_cols:
                        total += outlier_cost
                    else:
                        for k in range(indptr[r], indptr[r + 1]):
                            if cols[k] == j:
                                total += costs[k]
                                break
            objective[t] = total


@njit(cache=True, nogil=True)
def assign_with_outliers(indptr, cols, costs, n_cols, outlier_cost, row_to_col):
    """Min-cost assignment where every row may instead take a private outlier at ``outlier_cost``.

    Rows ``i`` have edges ``cols[indptr[i]:indptr[i+1]]`` with int64 ``costs``; each real column
    takes at most one row. Minimises ``sum(costs of matched edges) + outlier_cost * unmatched``,
    which is BSR's objective (``n * outlier - sum(outlier - cost)``), exactly (integer costs).
    Writes each row's real column (or -1) into ``row_to_col``; returns the number matched.
    """
    n_rows = indptr.shape[0] - 1
    n_all = n_cols + n_rows
    u = np.zeros(n_rows, np.int64)
    v = np.zeros(n_all, np.int64)
    col_to_row = np.full(n_all, -1, np.int64)
    for i in range(n_rows):
        row_to_col[i] = -1
    dist = np.full(n_all, _INF, np.int64)
    pred = np.full(n_all, -1, np.int64)
    done = np.zeros(n_all, np.bool_)
    touched = np.empty(n_all, np.int64)
    finalized = np.empty(n_all, np.int64)
    heap_cap = costs.shape[0] + 2 * n_rows + 16
    heap_keys = np.empty(heap_cap, np.int64)
    heap_vals = np.empty(heap_cap, np.int64)
    for s in range(n_rows):
        _augment(s, indptr, cols, costs, n_cols, outlier_cost, u, v, row_to_col, col_to_row,
                 dist, pred, done, touched, finalized, heap_keys, heap_vals)
    matched = 0
    for i in range(n_rows):
        if row_to_col[i] >= n_cols:
            row_to_col[i] = -1
        elif row_to_col[i] >= 0:
            matched += 1
    return matched


@njit(cache=True, nogil=True)
def _half_width(dy, r2):
    """The largest ``dx >= 0`` with ``dy² + dx² <= r2`` (compared in float64), or -1."""
    rest = r2 - dy * dy
    if rest < 0:
        return -1
    dxm = int(np.sqrt(rest))
    while float(dy * dy + (dxm + 1) * (dxm + 1)) <= r2:
        dxm += 1
    while dxm >= 0 and float(dy * dy + dxm * dxm) > r2:
        dxm -= 1
    return dxm


@njit(cache=True, nogil=True)
def candidate_edges(ys, xs, row_ptr, row_x, radius, indptr, cols, costs):
    """CSR edges from machine pixels (ys, xs) to the human pixels within ``radius`` (``dy² + dx² <=
    radius²``), in the order of the offsets (dy, then dx, ascending).

    Human pixels are given row by row: those of row ``y`` are ``row_ptr[y] .. row_ptr[y + 1] - 1``
    (their ids, raster order) with columns ``row_x`` (ascending). Each machine pixel costs
    O(radius x log) plus its edges, not a scan of the whole disk. With empty ``cols`` only
    ``indptr`` (n + 1) is filled (a counting pass, so the edges are allocated once at their exact
    size); then ``cols`` and ``costs`` (int32, ``rint(100 x distance)``) receive the edges.
    """
    n = ys.shape[0]
    height = row_ptr.shape[0] - 1
    r2 = radius * radius
    reach = int(np.ceil(radius))
    fill = cols.shape[0] > 0
    m = 0
    indptr[0] = 0
    for i in range(n):
        y = ys[i]
        x = xs[i]
        for dy in range(-reach, reach + 1):
            yy = y + dy
            if yy < 0 or yy >= height:
                continue
            lo = row_ptr[yy]
            hi = row_ptr[yy + 1]
            if lo == hi:
                continue
            dxm = _half_width(dy, r2)
            if dxm < 0:
                continue
            k = lo + np.searchsorted(row_x[lo:hi], x - dxm)
            while k < hi and row_x[k] <= x + dxm:
                if fill:
                    dx = row_x[k] - x
                    cols[m] = k
                    costs[m] = np.int32(np.rint(np.sqrt(float(dy * dy + dx * dx)) * 100.0))
                m += 1
                k += 1
        indptr[i + 1] = m


# --------------------------------------------------------------------------------------
# Morphological thinning (MATLAB bwmorph 'thin', Inf): Lam, Lee & Suen 1992, p. 879
# --------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _thin_lut():
    """Deletion tables of the two sub-iterations, indexed by the 8-neighbourhood code.

    Neighbours x1..x8 start east and go counter-clockwise (x1=E, x2=NE, x3=N, ...); bit k-1 of
    the code is x_k. Conditions G1 (crossing number 1), G2 (2 <= min(n1, n2) <= 3) and G3 / G3'.
    """
    lut1 = np.zeros(256, np.bool_)
    lut2 = np.zeros(256, np.bool_)
    x = np.zeros(10, np.int64)
    for code in range(256):
        for k in range(8):
            x[k + 1] = (code >> k) & 1
        x[9] = x[1]
        # G1: X_H = sum b_i, b_i = 1 if x_{2i-1} == 0 and (x_{2i} == 1 or x_{2i+1} == 1)
        xh = 0
        for i in range(1, 5):
            if x[2 * i - 1] == 0 and (x[2 * i] == 1 or x[2 * i + 1] == 1):
                xh += 1
        n1 = 0
        n2 = 0
        for k in range(1, 5):
            n1 += 1 if (x[2 * k - 1] == 1 or x[2 * k] == 1) else 0
            n2 += 1 if (x[2 * k] == 1 or x[2 * k + 1] == 1) else 0
        g2 = min(n1, n2) >= 2 and min(n1, n2) <= 3
        g1 = xh == 1
        # G3: (x2 | x3 | ~x8) & x1 == 0 ; G3': (x6 | x7 | ~x4) & x5 == 0
        g3 = ((x[2] | x[3] | (1 - x[8])) & x[1]) == 0
        g3p = ((x[6] | x[7] | (1 - x[4])) & x[5]) == 0
        lut1[code] = g1 and g2 and g3
        lut2[code] = g1 and g2 and g3p
    return lut1, lut2


@njit(cache=True, nogil=True)
def thin_kernel(image, lut1, lut2):
    """Thin a boolean image in place until stable (zero padding outside)."""
    height, width = image.shape
    # candidate list: foreground pixels (sized to them: a boundary map is a few percent of the image)
    n = 0
    for y in range(height):
        for x in range(width):
            if image[y, x]:
                n += 1
    ys = np.empty(n, np.int64)
    xs = np.empty(n, np.int64)
    dele = np.empty(n, np.bool_)
    n = 0
    for y in range(height):
        for x in range(width):
            if image[y, x]:
                ys[n] = y
                xs[n] = x
                n += 1
    changed = True
    while changed:
        changed = False
        for sub in range(2):
            lut = lut1 if sub == 0 else lut2
            for t in range(n):
                y = ys[t]
                x = xs[t]
                dele[t] = False
                if not image[y, x]:
                    continue
                code = 0
                # x1=E, x2=NE, x3=N, x4=NW, x5=W, x6=SW, x7=S, x8=SE
                if x + 1 < width and image[y, x + 1]:
                    code |= 1
                if y > 0 and x + 1 < width and image[y - 1, x + 1]:
                    code |= 2
                if y > 0 and image[y - 1, x]:
                    code |= 4
                if y > 0 and x > 0 and image[y - 1, x - 1]:
                    code |= 8
                if x > 0 and image[y, x - 1]:
                    code |= 16
                if y + 1 < height and x > 0 and image[y + 1, x - 1]:
                    code |= 32
                if y + 1 < height and image[y + 1, x]:
                    code |= 64
                if y + 1 < height and x + 1 < width and image[y + 1, x + 1]:
                    code |= 128
                dele[t] = lut[code]
            for t in range(n):
                if dele[t]:
                    image[ys[t], xs[t]] = False
                    changed = True
            # compact the candidate list
            m = 0
            for t in range(n):
                if image[ys[t], xs[t]]:
                    ys[m] = ys[t]
                    xs[m] = xs[t]
                    m += 1
            n = m
    return image


# --------------------------------------------------------------------------------------
# Label tables for the region benchmarks
# --------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def contingency(a, b, na, nb):
    """Joint histogram of two int64 label maps with labels in [0, na) and [0, nb)."""
    table = np.zeros((na, nb), np.int64)
    fa = a.ravel()
    fb = b.ravel()
    for k in range(fa.shape[0]):
        table[fa[k], fb[k]] += 1
    return table


@njit(cache=True, nogil=True)
def first_in_column_order(leaves, out):
    """``out[l]`` = the smallest column-major index ``j * H + i`` of a pixel of leaf ``l`` (``out``
    comes filled with a value above every index: leaves without pixels keep it)."""
    h, w = leaves.shape
    for i in range(h):
        for j in range(w):
            leaf = leaves[i, j]
            v = j * h + i
            if v < out[leaf]:
                out[leaf] = v


@njit(cache=True, nogil=True)
def ids_in_visit_order(labels, order, n_valid, ids):
    """``ids[r]`` = 1, 2, ... for the regions ``labels[leaf]`` in the order their first leaf comes in
    ``order[:n_valid]``; 0 for regions with no leaf there. Returns the number of regions met."""
    ids[:] = 0
    k = 0
    for i in range(n_valid):
        r = labels[order[i]]
        if ids[r] == 0:
            k += 1
            ids[r] = k
    return k


@njit(cache=True, nogil=True)
def reverse_edges(indptr, cols, costs, rev_indptr, rev_rows, rev_costs):
    """Column -> rows adjacency of CSR edges (rows ascending within a column, as a stable sort
    by column gives), filled in place: ``rev_indptr`` holds each column's start (n_cols + 1)."""
    pos = rev_indptr[:-1].copy()
    for r in range(indptr.shape[0] - 1):
        for k in range(indptr[r], indptr[r + 1]):
            c = cols[k]
            rev_rows[pos[c]] = r
            rev_costs[pos[c]] = costs[k]
            pos[c] += 1
