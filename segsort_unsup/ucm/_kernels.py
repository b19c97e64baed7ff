"""Numba kernels for OWT-UCM: no I/O, no objects; inputs already validated by ``owt.py``/``hierarchy.py``.

Grid conventions shared by every kernel (``H`` rows, ``W`` columns, ``N = H * W`` pixels, pixel
``p = i * W + j``):

- edges of the 4-adjacency graph have ids in ``[0, 2N)``: the horizontal edge between pixels
  ``p`` and ``p + 1`` has id ``p`` (valid when ``j < W - 1``), the vertical edge between ``p`` and
  ``p + W`` has id ``N + p`` (valid when ``i < H - 1``); per-edge arrays have length ``2N`` and
  their invalid entries are ignored;
- contour vertices (corners between pixels, the 0-faces of the Khalimsky grid) are
  ``(a, b)`` with ``0 <= a <= H``, ``0 <= b <= W``; vertex ``(a, b)`` is ``ucm2[2a, 2b]``.

No per-grid-edge array is ever allocated (it would cost 16 bytes per pixel): an edge weighs the
mean of its two pixels and is recomputed from the pixel map when needed, whether it is a
boundary (cut) edge is read from the two pixels' labels, and its RAG edge is found by binary
search in the sorted RAG. The tests keep a straightforward per-grid-edge implementation of the
same steps as the oracle these kernels must equal bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from .._heap import heap_pop, heap_push

# --------------------------------------------------------------------------------------------
# Grid helpers
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _pixel_neighbor(p, k, h, w):
    """Neighbour ``k`` (0 up, 1 left, 2 right, 3 down) of pixel ``p``: (pixel, edge id) or (-1, -1)."""
    n = h * w
    i = p // w
    j = p - i * w
    if k == 0:
        if i == 0:
            return -1, -1
        return p - w, n + p - w
    if k == 1:
        if j == 0:
            return -1, -1
        return p - 1, p - 1
    if k == 2:
        if j == w - 1:
            return -1, -1
        return p + 1, p
    if i == h - 1:
        return -1, -1
    return p + w, n + p


@njit(cache=True, nogil=True, inline="always")
def _vertex_edge(a, b, k, h, w):
    """Contour edge ``k`` (0 up, 1 left, 2 right, 3 down) at vertex ``(a, b)``: (edge id, a2, b2) or (-1, 0, 0)."""
    n = h * w
    if k == 0:
        if a >= 1 and 1 <= b <= w - 1:
            return (a - 1) * w + b - 1, a - 1, b
    elif k == 1:
        if b >= 1 and 1 <= a <= h - 1:
            return n + (a - 1) * w + b - 1, a, b - 1
    elif k == 2:
        if b <= w - 1 and 1 <= a <= h - 1:
            return n + (a - 1) * w + b, a, b + 1
    else:
        if a <= h - 1 and 1 <= b <= w - 1:
            return a * w + b - 1, a + 1, b
    return -1, 0, 0


@njit(cache=True, nogil=True, inline="always")
def _in_grid(e, h, w):
    """Whether edge id ``e`` (in ``[0, 2N)``) joins two pixels: not past the last column or row."""
    n = h * w
    if e < n:
        return (e % w) < w - 1
    return e - n + w < n


@njit(cache=True, nogil=True, inline="always")
def _edge_point(e, h, w):
    """Position (row, col) of an edge: the midpoint of the two pixel centres it links."""
    n = h * w
    if e < n:
        i = e // w
        return np.float64(i), np.float64(e - i * w) + 0.5
    p = e - n
    i = p // w
    return np.float64(i) + 0.5, np.float64(p - i * w)


# --------------------------------------------------------------------------------------------
# Pixel maps: float32, or float16 as its uint16 bits (decoded exactly, no float32 copy)
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _half(bits):
    """The float32 value of float16 ``bits`` (exact; inf/NaN are refused before the kernels run)."""
    b = np.int64(bits)
    e = (b >> 10) & 0x1F
    m = b & 0x3FF
    if e == 0:
        v = math.ldexp(np.float64(m), -24)
    else:
        v = math.ldexp(np.float64(m + 1024), e - 25)
    return np.float32(-v if b & 0x8000 else v)


def _value(values, p):  # pragma: no cover - replaced by the overload in compiled code
    raise NotImplementedError


@overload(_value, jit_options={"nogil": True})
def _value_impl(values, p):
    """Pixel ``p`` of a float32 map, or of a float16 map given as its uint16 bits, as float32."""
    if values.dtype == types.uint16:
        def from_bits(values, p):
            return _half(values[p])

        return from_bits

    def as_float32(values, p):
        return np.float32(values[p])

    return as_float32


@njit(cache=True, nogil=True, inline="always")
def _edge_pixels(e, h, w):
    """The two pixels of grid edge ``e`` (a valid edge)."""
    n = h * w
    if e < n:
        return e, e + 1
    return e - n, e - n + w


@njit(cache=True, nogil=True, inline="always")
def _edge_weight(values, e, h, w):
    """Weight of grid edge ``e``: as ``pixel_edge_weights`` gives it."""
    p, q = _edge_pixels(e, h, w)
    return np.float32(0.5 * (_value(values, p) + _value(values, q)))


@njit(cache=True, nogil=True, inline="always")
def _edge_orientation(values, orientation, e, h, w):
    """Orientation of grid edge ``e``: that of the stronger of its two pixels (ties: the first)."""
    p, q = _edge_pixels(e, h, w)
    return _value(orientation, p) if _value(values, p) >= _value(values, q) else _value(orientation, q)


@njit(cache=True, nogil=True, inline="always")
def _is_cut(labels, e, h, w):
    """Whether valid grid edge ``e`` joins two regions of ``labels``."""
    p, q = _edge_pixels(e, h, w)
    return labels[p] != labels[q]


@njit(cache=True, nogil=True)
def any_half_nonfinite(bits):
    """Whether float16 ``bits`` hold an inf or NaN (exponent all ones)."""
    for i in range(bits.size):
        if (bits[i] & 0x7C00) == 0x7C00:
            return True
    return False


# --------------------------------------------------------------------------------------------
# Watershed cut (drop of water principle)
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _grown(buffer, used):
    """``buffer`` with twice the room, its first ``used`` entries kept."""
    bigger = np.empty(2 * buffer.size, buffer.dtype)
    bigger[:used] = buffer[:used]
    return bigger


@njit(cache=True, nogil=True, inline="always")
def _lowest_pixel_edge(values, p, h, w):
    best = np.float32(np.inf)
    for k in range(4):
        q, e = _pixel_neighbor(p, k, h, w)
        if q >= 0:
            v = _edge_weight(values, e, h, w)
            if v < best:
                best = v
    return best


@njit(cache=True, nogil=True)
def watershed_cut_pixels(values, h, w, labels):
    """Label the catchment basins of the pixel map's 4-adjacency graph; returns the region count.

    Cousty et al.'s stream algorithm (watershed cuts, drop of water principle, PAMI 2009): from
    each unlabelled pixel, follow steepest-descent edges (the pixel's lowest incident edge
    weight) depth-first until reaching a labelled pixel (join its basin) or exhausting a
    regional minimum (new basin). Linear time. Labels are ``0..n-1`` in raster order of each
    basin's first pixel; neighbours are visited up, left, right, down.

    Working memory is the current stream only (grown as needed; ``labels`` marks its pixels
    ``-2``); edge weights and each pixel's lowest edge weight are recomputed from ``values``
    when needed: no full-size temporaries besides ``labels``.
    """
    n = h * w
    labels[:] = -1
    stream = np.empty(min(n, 4096), np.int32)
    stack = np.empty(min(n, 4096), np.int32)
    n_labels = 0
    for x in range(n):
        if labels[x] >= 0:
            continue
        n_stream = 1
        stream[0] = x
        n_stack = 1
        stack[0] = x
        labels[x] = -2
        found = -1
        while n_stack > 0 and found < 0:
            n_stack -= 1
            y = stack[n_stack]
            fy = _lowest_pixel_edge(values, y, h, w)
            for k in range(4):
                z, e = _pixel_neighbor(y, k, h, w)
                if z < 0 or labels[z] == -2 or _edge_weight(values, e, h, w) != fy:
                    continue
                if labels[z] >= 0:
                    found = labels[z]
                    break
                if n_stream == stream.size:
                    stream = _grown(stream, n_stream)
                stream[n_stream] = z
                n_stream += 1
                labels[z] = -2
                if _lowest_pixel_edge(values, z, h, w) < fy:
                    stack[0] = z
                    n_stack = 1
                    break
                if n_stack == stack.size:
                    stack = _grown(stack, n_stack)
                stack[n_stack] = z
                n_stack += 1
        if found < 0:
            found = n_labels
            n_labels += 1
        for t in range(n_stream):
            labels[stream[t]] = found
    return n_labels


# --------------------------------------------------------------------------------------------
# Region adjacency graph (RAG)
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def rag_from_labels(labels, h, w, n_regions, index):
    """The RAG of a label map: ``(sources, targets, offsets)``, numbered by (smaller region, larger
    region). Cut edges are bucketed by their smaller region (counting sort) and each bucket's few
    distinct larger regions sorted by insertion: RAG edges of region ``a`` (as source) are
    ``offsets[a]:offsets[a + 1]``, their targets increasing. Counts are held in ``index``'s dtype;
    working memory 4 bytes per cut edge."""
    n = h * w
    idx = index.dtype
    count = np.zeros(n_regions + 1, idx)
    for p in range(n):
        if (p % w) < w - 1 and labels[p] != labels[p + 1]:
            count[min(labels[p], labels[p + 1]) + 1] += 1
        if p + w < n and labels[p] != labels[p + w]:
            count[min(labels[p], labels[p + w]) + 1] += 1
    for r in range(n_regions):
        count[r + 1] += count[r]
    other = np.empty(count[n_regions], np.int32)
    fill = count[:-1].copy()
    for p in range(n):
        if (p % w) < w - 1 and labels[p] != labels[p + 1]:
            a = min(labels[p], labels[p + 1])
            other[fill[a]] = max(labels[p], labels[p + 1])
            fill[a] += 1
        if p + w < n and labels[p] != labels[p + w]:
            a = min(labels[p], labels[p + w])
            other[fill[a]] = max(labels[p], labels[p + w])
            fill[a] += 1
    seen = np.full(n_regions, -1, idx)
    offsets = np.zeros(n_regions + 1, idx)
    n_rag = 0
    # the sorted distinct targets are written over ``other``: a bucket's entries are read in
    # order and targets only go to [first, n_rag), where n_rag - 1 <= the entry just read
    for a in range(n_regions):
        first = n_rag
        for t in range(count[a], count[a + 1]):
            b = other[t]
            if seen[b] < first:  # new neighbour of a (seen[b] >= first: b is in this bucket)
                i = n_rag
                n_rag += 1
                while i > first and other[i - 1] > b:
                    other[i] = other[i - 1]
                    seen[other[i]] = i
                    i -= 1
                other[i] = b
                seen[b] = i
        offsets[a + 1] = n_rag
    targets = other[:n_rag].copy()
    sources = np.empty(n_rag, np.int32)
    for a in range(n_regions):
        for r in range(offsets[a], offsets[a + 1]):
            sources[r] = a
    return sources, targets, offsets


@njit(cache=True, nogil=True, inline="always")
def _rag_id(offsets, targets, a, b):
    """RAG edge of regions ``a < b``: binary search among ``a``'s targets."""
    lo = offsets[a]
    hi = offsets[a + 1]
    while lo < hi:
        mid = (lo + hi) >> 1
        if targets[mid] < b:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def rag_mean_labels(labels, values, h, w, offsets, targets, oriented, out, sums, lengths):
    """Sum and count the weights of each RAG edge's cut edges, in grid order: the RAG edge of a cut
    edge found by search, its weight taken from ``out`` (``oriented``; cut edges in grid order) or
    from the pixel map."""
    n = h * w
    sums[:] = 0.0
    lengths[:] = 0.0
    k = 0
    for e in range(2 * n):
        if not _in_grid(e, h, w):
            continue
        p, q = _edge_pixels(e, h, w)
        a = labels[p]
        b = labels[q]
        if a == b:
            continue
        if a > b:
            a, b = b, a
        r = _rag_id(offsets, targets, a, b)
        wv = out[k] if oriented else _edge_weight(values, e, h, w)
        k += 1
        sums[r] += wv
        lengths[r] += 1.0


# --------------------------------------------------------------------------------------------
# Oriented watershed transform
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _seen(visited, e):
    """Bit ``e`` of the packed flags ``visited`` (one bit per grid edge: N / 4 bytes in all)."""
    return (visited[e >> 3] >> (e & 7)) & 1 == 1


@njit(cache=True, nogil=True, inline="always")
def _see(visited, e):
    visited[e >> 3] |= np.uint8(1 << (e & 7))


@njit(cache=True, nogil=True, inline="always")
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return np.int64((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@njit(cache=True, nogil=True, inline="always")
def _rank(bits, base, e):
    """Number of cut edges before grid edge ``e`` (in grid order)."""
    k = e >> 6
    mask = (np.uint64(1) << np.uint64(e & 63)) - np.uint64(1)
    return base[k] + _popcount(bits[k] & mask)


@njit(cache=True, nogil=True)
def cut_edge_ranks(labels, h, w):
    """Rank structure of the cut edges in grid order: ``(bits, base)``, one bit per grid edge in
    uint64 words and the number of cut edges before each word (0.375 bytes per pixel)."""
    n = h * w
    words = (2 * n + 63) >> 6
    bits = np.zeros(words, np.uint64)
    base = np.zeros(words + 1, np.int64)
    for e in range(2 * n):
        if _in_grid(e, h, w) and _is_cut(labels, e, h, w):
            bits[e >> 6] |= np.uint64(1) << np.uint64(e & 63)
    for k in range(words):
        base[k + 1] = base[k] + _popcount(bits[k])
    return bits, base


@njit(cache=True, nogil=True, inline="always")
def _vertex_degree(labels, a, b, h, w):
    d = 0
    for k in range(4):
        e, _, _ = _vertex_edge(a, b, k, h, w)
        if e >= 0 and _is_cut(labels, e, h, w):
            d += 1
    return d


@njit(cache=True, nogil=True)
def _walk(labels, h, w, visited, e, a2, b2, elements, n_el):
    """Follow a contour from edge ``e`` (arriving at vertex ``(a2, b2)``) to a junction or back to its start."""
    while True:
        elements[n_el] = e
        n_el += 1
        _see(visited, e)
        if _vertex_degree(labels, a2, b2, h, w) != 2:
            return n_el
        nxt = -1
        na = 0
        nb = 0
        for k2 in range(4):
            e2, a3, b3 = _vertex_edge(a2, b2, k2, h, w)
            if e2 >= 0 and _is_cut(labels, e2, h, w) and not _seen(visited, e2):
                nxt = e2
                na = a3
                nb = b3
                break
        if nxt < 0:
            return n_el
        e = nxt
        a2 = na
        b2 = nb


@njit(cache=True, nogil=True)
def trace_contours_labels(labels, h, w, total, index):
    """Split the ``total`` cut edges of a label map into polylines running between junctions (or
    around closed loops).

    Returns ``(elements, offsets)`` in ``index``'s dtype: polyline ``t`` is
    ``elements[offsets[t]:offsets[t + 1]]``, consecutive edges along the contour. Junctions are
    contour vertices of degree other than two (image-border vertices included). Vertices are
    scanned in raster order, directions in the order left, right, up, down: a junction starts
    one polyline per untraced direction; an untraced vertex inside a polyline (or a loop) is
    traced both ways and the first part reversed. This is higra's ``fit_contour_2d`` order, so
    straight pieces split identically. Vertex degrees are recomputed when needed, traced edges
    are marked in a bit set (N / 4 bytes) and offsets grown as needed.
    """
    elements = np.empty(total, index.dtype)
    offsets = np.empty(min(total + 1, 1024), index.dtype)
    visited = np.zeros((2 * h * w + 7) // 8, np.uint8)
    order = (1, 2, 0, 3)
    n_el = 0
    n_poly = 0
    for a in range(h + 1):
        for b in range(w + 1):
            d = _vertex_degree(labels, a, b, h, w)
            if d == 0:
                continue
            if d != 2:
                for k in order:
                    e, a2, b2 = _vertex_edge(a, b, k, h, w)
                    if e >= 0 and _is_cut(labels, e, h, w) and not _seen(visited, e):
                        if n_poly + 1 >= offsets.size:
                            offsets = _grown(offsets, n_poly)
                        offsets[n_poly] = n_el
                        n_poly += 1
                        n_el = _walk(labels, h, w, visited, e, a2, b2, elements, n_el)
                continue
            first = True
            for k in order:
                e, a2, b2 = _vertex_edge(a, b, k, h, w)
                if e < 0 or not _is_cut(labels, e, h, w) or _seen(visited, e):
                    continue
                if first:
                    if n_poly + 1 >= offsets.size:
                        offsets = _grown(offsets, n_poly)
                    offsets[n_poly] = n_el
                    n_poly += 1
                    start = n_el
                    n_el = _walk(labels, h, w, visited, e, a2, b2, elements, n_el)
                    elements[start:n_el] = elements[start:n_el][::-1].copy()
                    first = False
                else:
                    n_el = _walk(labels, h, w, visited, e, a2, b2, elements, n_el)
    offsets[n_poly] = n_el
    return elements, offsets[: n_poly + 1].copy()


@njit(cache=True, nogil=True)
def _chord_distance(r0, c0, r1, c1, r, c):
    length = np.sqrt((r1 - r0) ** 2 + (c1 - c0) ** 2)
    if length == 0.0:
        return np.sqrt((r - r0) ** 2 + (c - c0) ** 2)
    return abs((r1 - r0) * c - (c1 - c0) * r + c1 * r0 - r1 * c0) / length


@njit(cache=True, nogil=True)
def _split_polylines(elements, offsets, h, w, epsilon, min_size):
    """Split points of the traced polylines: each is split recursively at its element farthest from
    the chord while that distance is ``>= epsilon * chord length`` and ``> min_size`` pixels.
    Returns one flag per element (ends of polylines and of pieces); a stack as deep as the longest
    polyline is the only other memory."""
    split = np.zeros(elements.size, np.bool_)
    longest = 0
    for t in range(offsets.size - 1):
        longest = max(longest, offsets[t + 1] - offsets[t])
    stack = np.empty((longest + 2, 2), offsets.dtype)  # each pop pushes at most two sub-ranges
    for t in range(offsets.size - 1):
        s = offsets[t]
        f = offsets[t + 1] - 1
        split[s] = True
        split[f] = True
        stack[0, 0] = s
        stack[0, 1] = f
        n_stack = 1
        while n_stack > 0:
            n_stack -= 1
            first = stack[n_stack, 0]
            last = stack[n_stack, 1]
            if last - first < 2:
                continue
            r0, c0 = _edge_point(elements[first], h, w)
            r1, c1 = _edge_point(elements[last], h, w)
            best = epsilon * np.sqrt((r1 - r0) ** 2 + (c1 - c0) ** 2)
            at = -1
            for i in range(first + 1, last):
                r, c = _edge_point(elements[i], h, w)
                d = _chord_distance(r0, c0, r1, c1, r, c)
                if d >= best and d > min_size:
                    best = d
                    at = i
            if at >= 0:
                split[at] = True
                stack[n_stack, 0] = first
                stack[n_stack, 1] = at
                stack[n_stack + 1, 0] = at
                stack[n_stack + 1, 1] = last
                n_stack += 2
    return split


@njit(cache=True, nogil=True)
def oriented_weights(elements, offsets, values, orientation, h, w, epsilon, min_size, single_angle, bits, base, out):
    """Oriented watershed transform of the traced polylines (Arbelaez et al. PAMI 2011, sec. 4.1).

    Each polyline is split recursively at its element farthest from the chord (while that
    distance is ``>= epsilon * chord length`` and ``> min_size`` pixels), giving approximately
    straight pieces. Each edge of a piece takes ``max(0, weight * |cos(orientation - pi/2 - angle)|)``,
    the edge-map strength projected on the piece's normal, where ``angle`` is the direction of
    the piece's chord and ``orientation`` the edge's (:func:`_edge_orientation`); an edge shared
    by two pieces keeps the larger value. The new weight of cut edge ``e`` goes to
    ``out[rank of e among the cut edges in grid order]`` (``bits``, ``base``: :func:`cut_edge_ranks`).
    """
    half_pi = np.pi / 2
    split = _split_polylines(elements, offsets, h, w, epsilon, min_size)
    for t in range(offsets.size - 1):
        s = offsets[t]
        f = offsets[t + 1] - 1
        first = s
        for i in range(s + 1, f + 1):
            if not split[i]:
                continue
            r0, c0 = _edge_point(elements[first], h, w)
            r1, c1 = _edge_point(elements[i], h, w)
            angle = np.arctan2(r0 - r1, c0 - c1) % np.pi
            for q in range(first, i + 1):
                e = elements[q]
                v = _edge_weight(values, e, h, w) * abs(
                    np.cos(_edge_orientation(values, orientation, e, h, w) - half_pi - angle))
                slot = _rank(bits, base, e)
                if q == first and first != s:  # shared with the previous piece: keep the larger
                    if v > out[slot]:
                        out[slot] = v
                else:
                    out[slot] = v if v > 0.0 else 0.0
            first = i
        if f == s:
            e = elements[s]
            angle = single_angle if single_angle >= 0.0 else (half_pi if e < h * w else 0.0)
            v = _edge_weight(values, e, h, w) * abs(
                np.cos(_edge_orientation(values, orientation, e, h, w) - half_pi - angle))
            out[_rank(bits, base, e)] = v if v > 0.0 else 0.0


# --------------------------------------------------------------------------------------------
# Greedy merging by mean boundary strength (average linkage on the RAG)
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _mean(sums, lengths, r):
    """Mean strength of RAG edge ``r`` (recomputed rather than stored: the same float64 every time)."""
    return sums[r] / lengths[r] if lengths[r] > 0 else 0.0


@njit(cache=True, nogil=True)
def mean_boundary_merge(n_regions, end0, end1, sums, lengths, parents, altitudes, rag_altitudes, index,
                        in_place):
    """Merge the regions greedily, weakest mean boundary first; fills the binary merge tree.

    ``parents``/``altitudes`` have ``2 * n_regions - 1`` entries: leaves ``0..n-1``, then one node
    per merge in merge order; the root is its own parent. A merged region's boundary with each
    neighbour is the length-weighted mean of the two boundaries it replaces (BSR's
    ``ucm_mean_pb``). Ties go to the lower RAG edge index. ``rag_altitudes[r]`` receives the
    altitude at which RAG edge ``r``'s two regions merge (the ucm value of that boundary).
    Altitudes are made non-decreasing against float rounding. Returns the number of nodes
    used (``2n - 1`` for a connected RAG; components left apart are joined at the top).
    Node and edge indices are held in ``index``'s dtype (an empty int32 array while
    ``2 * R + 16 < 2**31``), as are ``end0``/``end1`` (the RAG edges' two regions: overwritten as
    regions merge). With the strengths in float64, about 50 bytes per RAG edge, 16 less with
    ``in_place`` (``sums`` and ``lengths`` are then merged in place: the caller's are spent).
    """
    n_rag = end0.size
    n_nodes = 2 * n_regions - 1
    for x in range(n_nodes):
        parents[x] = x
        altitudes[x] = 0.0
    # adjacency: one half-edge per (edge, endpoint) in singly linked lists per node
    idx = index.dtype
    he_next = np.full(2 * n_rag, -1, idx)
    head = np.full(n_nodes, -1, idx)
    tail = np.full(n_nodes, -1, idx)
    alive = np.ones(n_rag, np.bool_)
    merged_into = np.full(n_rag, -1, idx)
    # rag_altitudes[r] holds the altitude of popped edge r (float32, as returned) until the end
    s = sums if in_place else sums.copy()
    ln = lengths if in_place else lengths.copy()
    capacity = n_rag + 16  # every edge once; grown below when updates outnumber the pops
    hkeys = np.empty(capacity, np.float64)
    hids = np.empty(capacity, idx)
    size = 0
    for r in range(n_rag):
        for side in range(2):
            x = end0[r] if side == 0 else end1[r]
            h = 2 * r + side
            if head[x] < 0:
                head[x] = h
            else:
                he_next[tail[x]] = h
            tail[x] = h
        size = heap_push(hkeys, hids, size, _mean(s, ln, r), r)
    stamp = np.full(n_nodes, -1, idx)
    slot = np.empty(n_nodes, idx)
    changed = np.zeros(n_rag, np.bool_)
    touched = np.empty(min(n_rag, 1024), idx)  # grown as needed (a merge touches few edges)
    next_node = n_regions
    last_alt = 0.0
    while size > 0 and next_node < n_nodes:
        key = hkeys[0]
        r = hids[0]
        size = heap_pop(hkeys, hids, size)
        if not alive[r] or key != _mean(s, ln, r):  # stale: the edge was merged or updated since
            continue
        a = end0[r]
        b = end1[r]
        c = next_node
        next_node += 1
        alt = key if key > last_alt else last_alt
        last_alt = alt
        parents[a] = c
        parents[b] = c
        altitudes[c] = alt
        alive[r] = False
        rag_altitudes[r] = alt
        n_touched = 0
        for side in range(2):
            x = a if side == 0 else b
            h = head[x]
            while h >= 0:
                nxt = he_next[h]
                e = h >> 1
                if alive[e]:
                    if end0[e] == x:
                        end0[e] = c
                        other = end1[e]
                    else:
                        end1[e] = c
                        other = end0[e]
                    if stamp[other] != c:
                        stamp[other] = c
                        slot[other] = e
                        he_next[h] = -1
                        if head[c] < 0:
                            head[c] = h
                        else:
                            he_next[tail[c]] = h
                        tail[c] = h
                    else:
                        keep = slot[other]
                        s[keep] += s[e]
                        ln[keep] += ln[e]
                        alive[e] = False
                        merged_into[e] = keep
                        if not changed[keep]:
                            changed[keep] = True
                            if n_touched == touched.size:
                                touched = _grown(touched, n_touched)
                            touched[n_touched] = keep
                            n_touched += 1
                h = nxt
        for t in range(n_touched):
            e = touched[t]
            changed[e] = False
            if size >= capacity:
                capacity *= 2
                k2 = np.empty(capacity, np.float64)
                i2 = np.empty(capacity, idx)
                k2[:size] = hkeys[:size]
                i2[:size] = hids[:size]
                hkeys = k2
                hids = i2
            size = heap_push(hkeys, hids, size, _mean(s, ln, e), e)
    # a disconnected RAG (not produced by a grid) leaves several roots: chain them at the top
    top = next_node - 1
    for x in range(next_node):
        if parents[x] == x and x != top and next_node < n_nodes:
            c = next_node
            next_node += 1
            parents[x] = c
            parents[top] = c
            altitudes[c] = last_alt
            top = c
    for r in range(n_rag):
        q = r
        while merged_into[q] >= 0:
            q = merged_into[q]
        # a chain ends at a popped or still alive edge; merged edges are never chain ends, so their
        # slots (overwritten here) are not read again, and a popped edge's slot keeps its altitude
        rag_altitudes[r] = rag_altitudes[q] if not alive[q] else last_alt
    return next_node


# --------------------------------------------------------------------------------------------
# Tree -> cuts and ucm2
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def cut_leaves(parents, altitudes, threshold, n_leaves, out):
    """Label leaves by the highest ancestor reachable through nodes of altitude <= threshold.

    Labels are ``0..k-1`` in order of each region's smallest leaf; returns ``k``.
    """
    n_nodes = parents.size
    rep = np.empty(n_nodes, parents.dtype)  # node ids in the tree's own index type
    for x in range(n_nodes - 1, -1, -1):
        p = parents[x]
        if p == x or altitudes[p] > threshold:
            rep[x] = x
        else:
            rep[x] = rep[p]
    relabel = np.full(n_nodes, -1, parents.dtype)
    k = 0
    for leaf in range(n_leaves):
        r = rep[leaf]
        if relabel[r] < 0:
            relabel[r] = k
            k += 1
        out[leaf] = relabel[r]
    return k


@njit(cache=True, nogil=True)
def lca_altitudes(parents, altitudes, sources, targets, out):
    """Altitude of the lowest common ancestor of each (source, target) leaf pair."""
    n_nodes = parents.size
    depth = np.zeros(n_nodes, parents.dtype)
    for x in range(n_nodes - 1, -1, -1):
        p = parents[x]
        depth[x] = 0 if p == x else depth[p] + 1
    for t in range(sources.size):
        u = np.int64(sources[t])
        v = np.int64(targets[t])
        while depth[u] > depth[v]:
            u = parents[u]
        while depth[v] > depth[u]:
            v = parents[v]
        while u != v:
            u = parents[u]
            v = parents[v]
        out[t] = altitudes[u]


@njit(cache=True, nogil=True)
def _corners_and_frame(ucm2, h, w):
    """Finish a ucm2 whose boundaries (1-faces) are painted: each corner (0-face) takes the largest
    of its four boundaries; the outer frame copies its neighbouring row/column, as in BSR's ucm2
    files (boundaries reach the border, and labelling ``ucm2 <= t`` cannot join regions through it)."""
    for a in range(1, h):
        for b in range(1, w):
            y = 2 * a
            x = 2 * b
            v = ucm2[y - 1, x]
            if ucm2[y + 1, x] > v:
                v = ucm2[y + 1, x]
            if ucm2[y, x - 1] > v:
                v = ucm2[y, x - 1]
            if ucm2[y, x + 1] > v:
                v = ucm2[y, x + 1]
            ucm2[y, x] = v
    ucm2[0, :] = ucm2[1, :]
    ucm2[2 * h, :] = ucm2[2 * h - 1, :]
    ucm2[:, 0] = ucm2[:, 1]
    ucm2[:, 2 * w] = ucm2[:, 2 * w - 1]


@njit(cache=True, nogil=True)
def paint_ucm2_labels(labels, offsets, targets, rag_values, h, w, ucm2):
    """Write RAG edge values on the doubled grid: 1-faces between two labels get their RAG edge's
    value (found by search), 0-faces the max of their 1-faces, the frame a copy of its neighbours."""
    n = h * w
    for p in range(n):
        i = p // w
        j = p - i * w
        if j < w - 1 and labels[p] != labels[p + 1]:
            a = min(labels[p], labels[p + 1])
            b = max(labels[p], labels[p + 1])
            ucm2[2 * i + 1, 2 * j + 2] = rag_values[_rag_id(offsets, targets, a, b)]
        if i < h - 1 and labels[p] != labels[p + w]:
            a = min(labels[p], labels[p + w])
            b = max(labels[p], labels[p + w])
            ucm2[2 * i + 2, 2 * j + 1] = rag_values[_rag_id(offsets, targets, a, b)]
    _corners_and_frame(ucm2, h, w)
