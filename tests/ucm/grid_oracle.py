"""The per-grid-edge OWT-UCM: the tests' oracle for the kernels of ``segsort_unsup.ucm``.

The straightforward way to compute OWT-UCM keeps two arrays over the ``2 * H * W`` edges of the
4-adjacency graph: their weights and, on boundaries, their RAG edge. Every step then reads one
array: the watershed cut follows the lowest edge weights, the RAG numbers the cut edges, the
contours are traced along the edges that have a RAG edge, the OWT re-weights them in place, and
the ucm2 is painted edge by edge. The product kernels (``segsort_unsup/ucm/_kernels.py``) do the
same without those arrays (16 bytes per pixel), recomputing what they need from the pixel maps
and the label map; ``test_lean.py`` checks that both give the same regions, RAG, boundary sums,
merge tree and ucm2, bit for bit, and ``test_peer_higra.py`` feeds :func:`grid_edge_weights` to
higra. Shared helpers (grid geometry, polyline splitting, corners of the ucm2) are imported from
the product module, so only the per-grid-edge steps are written here.

Edge ids and vertex conventions are those of ``segsort_unsup/ucm/_kernels.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from segsort_unsup.ucm._kernels import (_corners_and_frame, _edge_point, _grown, _pixel_neighbor, _see, _seen,
                                        _split_polylines, _vertex_edge)
from segsort_unsup.ucm.owt import _check_map, _owt_options, rag_index_dtype


# --------------------------------------------------------------------------------------------
# Python side: validate, allocate, call the kernels below
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrientedWatershed:
    """Watershed regions of a contour map and their RAG, with the per-grid-edge arrays.

    Attributes
    ----------
    leaves : (H, W) int32 ndarray
        Watershed region of each pixel, ``0..n_regions-1`` in raster order of first pixel.
    n_regions : int
    sources, targets : (R,) int32 ndarray
        The RAG edges (``sources < targets``), sorted.
    edge_rag : (2 * H * W,) int32 ndarray (int64 above 2**30 pixels)
        RAG edge of each grid edge on a boundary, -1 elsewhere (ids as in ``_kernels``).
    weights : (2 * H * W,) float32 ndarray
        Boundary strength of each grid edge after the oriented watershed transform (0 off the
        boundaries); without an orientation (or a boundary), the plain edge weights.
    sums, lengths : (R,) float64 ndarray
        Sum of ``weights`` along each RAG edge's boundary, and the boundary's length in edges.
    """

    leaves: np.ndarray
    n_regions: int
    sources: np.ndarray
    targets: np.ndarray
    edge_rag: np.ndarray
    weights: np.ndarray
    sums: np.ndarray
    lengths: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.leaves.shape  # type: ignore[return-value]


def grid_edge_weights(edge: np.ndarray, orientation: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Weights (and orientations) of the 4-adjacency edges of an ``(H, W)`` contour map.

    An edge weighs the mean of its two pixels and takes the orientation of the stronger one.
    Returns ``(weights, orientations)``, float32 arrays of length ``2 * H * W``: the edge
    between pixels ``p`` and ``p + 1`` is entry ``p``, between ``p`` and ``p + W`` is ``H*W + p``
    (entries for missing neighbours are 0). ``orientations`` is None without ``orientation``.
    """
    edge = _check_map(edge, "edge")
    h, w = edge.shape
    weights = np.empty(2 * h * w, np.float32)
    pixel_edge_weights(edge.ravel(), h, w, weights)
    if orientation is None:
        return weights, None
    orientation = _check_map(orientation, "orientation")
    if orientation.shape != edge.shape:
        raise ValueError(f"orientation shape {orientation.shape} differs from edge shape {edge.shape}")
    orientations = np.empty(2 * h * w, np.float32)
    pixel_edge_orientations(edge.ravel(), orientation.ravel(), h, w, orientations)
    return weights, orientations


def _check_edges(values: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(values, dtype=np.float32).ravel())
    h, w = shape
    if arr.size != 2 * h * w:
        raise ValueError(f"{name} must hold 2*H*W = {2 * h * w} values for shape {shape}, got {arr.size}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} holds NaN or inf values")
    return arr


def watershed_regions(weights: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Watershed cut of the edge-weighted 4-adjacency graph of an ``(H, W)`` grid.

    ``weights`` as from :func:`grid_edge_weights`. Returns ``(leaves, n_regions)``: an ``(H, W)``
    int32 map of catchment basins (one per regional minimum), numbered in raster order.
    """
    h, w = int(shape[0]), int(shape[1])
    weights = _check_edges(weights, (h, w), "weights")
    labels = np.empty(h * w, np.int32)
    n = watershed_cut(weights, h, w, labels)
    return labels.reshape(h, w), int(n)


def oriented_watershed(
    edge: np.ndarray,
    orientation: np.ndarray | None = None,
    *,
    epsilon: float = 0.1,
    min_size: float = 2.0,
    single_edge_angle: float | None = 0.0,
) -> OrientedWatershed:
    """``segsort_unsup.ucm.owt.watershed_rag`` through per-grid-edge arrays (same parameters)."""
    single = _owt_options(epsilon, min_size, single_edge_angle)
    edge = _check_map(edge, "edge")
    if orientation is not None:
        orientation = _check_map(orientation, "orientation")
        if orientation.shape != edge.shape:
            raise ValueError(f"orientation shape {orientation.shape} differs from edge shape {edge.shape}")
    weights, _ = grid_edge_weights(edge)  # per-edge orientations are read from the pixel maps when needed
    h, w = edge.shape
    labels = np.empty(h * w, np.int32)
    n = int(watershed_cut(weights, h, w, labels))
    edge_rag = np.empty(2 * h * w, rag_index_dtype(h, w))
    sources, targets = region_adjacency(labels, h, w, max(n, 1), edge_rag)
    if orientation is not None and sources.size:
        elements, offsets = trace_contours(edge_rag, h, w)
        oriented_reweight(elements, offsets, weights, edge.ravel(), orientation.ravel(), h, w, float(epsilon),
                            float(min_size), single, edge_rag)
        del elements, offsets
    sums = np.empty(sources.size, np.float64)
    lengths = np.empty(sources.size, np.float64)
    rag_mean(edge_rag, weights, sources.size, sums, lengths)
    return OrientedWatershed(labels.reshape(h, w), n, sources, targets, edge_rag, weights, sums, lengths)


def ucm2_from_rag(edge_rag: np.ndarray, rag_values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The ``(2H + 1, 2W + 1)`` float32 ucm2 with each RAG edge's value painted on its boundary.

    ``edge_rag`` is :attr:`OrientedWatershed.edge_rag`, ``rag_values`` one value per RAG edge
    (e.g. the third output of ``mean_boundary_hierarchy``); corners take the largest of their
    four boundaries.
    """
    h, w = int(shape[0]), int(shape[1])
    ucm2 = np.zeros((2 * h + 1, 2 * w + 1), np.float32)
    paint_ucm2(np.ascontiguousarray(edge_rag), np.ascontiguousarray(rag_values, dtype=np.float32), h, w, ucm2)
    return ucm2


# --------------------------------------------------------------------------------------------
# Per-grid-edge kernels
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def pixel_edge_weights(values, h, w, out):
    """Edge weight = mean of the two pixel values (``values`` flat, length N; ``out`` length 2N)."""
    n = h * w
    for p in range(n):
        j = p % w
        out[p] = 0.5 * (values[p] + values[p + 1]) if j < w - 1 else 0.0
        out[n + p] = 0.5 * (values[p] + values[p + w]) if p + w < n else 0.0


@njit(cache=True, nogil=True)
def pixel_edge_orientations(values, orientation, h, w, out):
    """Edge orientation = orientation of the stronger of its two pixels (ties: the first pixel)."""
    n = h * w
    for p in range(n):
        j = p % w
        if j < w - 1:
            out[p] = orientation[p] if values[p] >= values[p + 1] else orientation[p + 1]
        else:
            out[p] = 0.0
        if p + w < n:
            out[n + p] = orientation[p] if values[p] >= values[p + w] else orientation[p + w]
        else:
            out[n + p] = 0.0


@njit(cache=True, nogil=True, inline="always")
def _lowest_edge(weights, p, h, w):
    """The smallest weight of the edges at pixel ``p`` (``inf`` for a pixel without neighbours)."""
    best = np.float32(np.inf)
    for k in range(4):
        q, e = _pixel_neighbor(p, k, h, w)
        if q >= 0 and weights[e] < best:
            best = weights[e]
    return best


@njit(cache=True, nogil=True)
def watershed_cut(weights, h, w, labels):
    """Label the catchment basins of an edge-weighted 4-adjacency graph; returns the region count.

    Cousty et al.'s stream algorithm (watershed cuts, drop of water principle, PAMI 2009): from
    each unlabelled pixel, follow steepest-descent edges (the pixel's lowest incident edge
    weight) depth-first until reaching a labelled pixel (join its basin) or exhausting a
    regional minimum (new basin). Linear time. Labels are ``0..n-1`` in raster order of each
    basin's first pixel; neighbours are visited up, left, right, down.

    Working memory is the current stream only (grown as needed; ``labels`` marks its pixels
    ``-2``), and each pixel's lowest edge weight is recomputed when needed rather than stored:
    no full-size temporaries besides ``labels``.
    """
    n = h * w
    labels[:] = -1  # -2: in the stream being followed
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
            fy = _lowest_edge(weights, y, h, w)
            for k in range(4):
                z, e = _pixel_neighbor(y, k, h, w)
                if z < 0 or labels[z] == -2 or weights[e] != fy:
                    continue
                if labels[z] >= 0:
                    found = labels[z]
                    break
                if n_stream == stream.size:
                    stream = _grown(stream, n_stream)
                stream[n_stream] = z
                n_stream += 1
                labels[z] = -2
                if _lowest_edge(weights, z, h, w) < fy:
                    # steeper descent from z: continue from there only
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


@njit(cache=True, nogil=True)
def region_adjacency(labels, h, w, n_regions, edge_rag):
    """Fill ``edge_rag`` (length 2N) with the RAG edge of each cut edge (-1 elsewhere).

    RAG edges are numbered by (smaller region, larger region): cut edges are bucketed by their
    smaller region (counting sort), and each bucket's few distinct larger regions are sorted
    by insertion. Returns ``(sources, targets)``.
    """
    n = h * w
    edge_rag[:] = -1
    index = edge_rag.dtype  # int32 while 2N < 2**31: every count and id below fits
    count = np.zeros(n_regions + 1, index)
    for p in range(n):
        if (p % w) < w - 1 and labels[p] != labels[p + 1]:
            count[min(labels[p], labels[p + 1]) + 1] += 1
        if p + w < n and labels[p] != labels[p + w]:
            count[min(labels[p], labels[p + w]) + 1] += 1
    for r in range(n_regions):
        count[r + 1] += count[r]
    total = count[n_regions]
    fill = count[:-1].copy()
    cut = np.empty(total, index)
    other = np.empty(total, np.int32)
    for p in range(n):
        if (p % w) < w - 1 and labels[p] != labels[p + 1]:
            a = min(labels[p], labels[p + 1])
            cut[fill[a]] = p
            other[fill[a]] = max(labels[p], labels[p + 1])
            fill[a] += 1
        if p + w < n and labels[p] != labels[p + w]:
            a = min(labels[p], labels[p + w])
            cut[fill[a]] = n + p
            other[fill[a]] = max(labels[p], labels[p + w])
            fill[a] += 1
    sources = np.empty(total, np.int32)
    targets = np.empty(total, np.int32)
    seen = np.full(n_regions, -1, index)  # rag id of (a, b) while bucket a is processed
    n_rag = 0
    for a in range(n_regions):
        first = n_rag
        for t in range(count[a], count[a + 1]):
            b = other[t]
            if seen[b] < first:  # new neighbour of a: insert b in order among this bucket's
                i = n_rag
                n_rag += 1
                while i > first and targets[i - 1] > b:
                    targets[i] = targets[i - 1]
                    seen[targets[i]] = i
                    i -= 1
                targets[i] = b
                sources[n_rag - 1] = a  # every edge of the bucket has source a
                seen[b] = i
        for t in range(count[a], count[a + 1]):
            edge_rag[cut[t]] = seen[other[t]]
    return sources[:n_rag].copy(), targets[:n_rag].copy()


@njit(cache=True, nogil=True)
def rag_mean(edge_rag, weights, n_rag, sums, lengths):
    """Sum and count the weights of each RAG edge's cut edges."""
    sums[:] = 0.0
    lengths[:] = 0.0
    for e in range(edge_rag.size):
        r = edge_rag[e]
        if r >= 0:
            sums[r] += weights[e]
            lengths[r] += 1.0


@njit(cache=True, nogil=True, inline="always")
def _vertex_degree(edge_rag, a, b, h, w):
    """Number of cut edges at contour vertex ``(a, b)``."""
    d = 0
    for k in range(4):
        e, _, _ = _vertex_edge(a, b, k, h, w)
        if e >= 0 and edge_rag[e] >= 0:
            d += 1
    return d


@njit(cache=True, nogil=True)
def _walk(edge_rag, h, w, visited, e, a2, b2, elements, n_el):
    """Follow a contour from edge ``e`` (arriving at vertex ``(a2, b2)``) to a junction or back to its start."""
    while True:
        elements[n_el] = e
        n_el += 1
        _see(visited, e)
        if _vertex_degree(edge_rag, a2, b2, h, w) != 2:
            return n_el
        nxt = -1
        na = 0
        nb = 0
        for k2 in range(4):
            e2, a3, b3 = _vertex_edge(a2, b2, k2, h, w)
            if e2 >= 0 and edge_rag[e2] >= 0 and not _seen(visited, e2):
                nxt = e2
                na = a3
                nb = b3
                break
        if nxt < 0:  # closed loop back at its start
            return n_el
        e = nxt
        a2 = na
        b2 = nb


@njit(cache=True, nogil=True)
def trace_contours(edge_rag, h, w):
    """Split the cut edges into polylines running between junctions (or around closed loops).

    Returns ``(elements, offsets)`` in ``edge_rag``'s dtype: polyline ``t`` is
    ``elements[offsets[t]:offsets[t + 1]]``, consecutive edges along the contour. Junctions are
    contour vertices of degree other than two (image-border vertices included). Vertices are
    scanned in raster order, directions in the order left, right, up, down: a junction starts
    one polyline per untraced direction; an untraced vertex inside a polyline (or a loop) is
    traced both ways and the first part reversed. This is higra's ``fit_contour_2d`` order, so
    straight pieces split identically. Vertex degrees are recomputed when needed and traced edges
    are marked in a bit set: besides the output, N / 4 bytes of working memory.
    """
    total = 0
    for a in range(h + 1):
        for b in range(w + 1):
            total += _vertex_degree(edge_rag, a, b, h, w)
    total //= 2
    elements = np.empty(total, edge_rag.dtype)  # edge ids: int32 while 2N < 2**31
    offsets = np.empty(total + 1, edge_rag.dtype)
    visited = np.zeros((edge_rag.size + 7) // 8, np.uint8)
    order = (1, 2, 0, 3)  # left, right, up, down
    n_el = 0
    n_poly = 0
    for a in range(h + 1):
        for b in range(w + 1):
            d = _vertex_degree(edge_rag, a, b, h, w)
            if d == 0:
                continue
            if d != 2:
                for k in order:
                    e, a2, b2 = _vertex_edge(a, b, k, h, w)
                    if e >= 0 and edge_rag[e] >= 0 and not _seen(visited, e):
                        offsets[n_poly] = n_el
                        n_poly += 1
                        n_el = _walk(edge_rag, h, w, visited, e, a2, b2, elements, n_el)
                continue
            first = True
            for k in order:
                e, a2, b2 = _vertex_edge(a, b, k, h, w)
                if e < 0 or edge_rag[e] < 0 or _seen(visited, e):
                    continue
                if first:
                    offsets[n_poly] = n_el
                    n_poly += 1
                    start = n_el
                    n_el = _walk(edge_rag, h, w, visited, e, a2, b2, elements, n_el)
                    elements[start:n_el] = elements[start:n_el][::-1].copy()
                    first = False
                else:
                    n_el = _walk(edge_rag, h, w, visited, e, a2, b2, elements, n_el)
    offsets[n_poly] = n_el
    return elements, offsets[: n_poly + 1]


@njit(cache=True, nogil=True, inline="always")
def _edge_orientation(values, orientation, e, h, w):
    """Orientation of grid edge ``e``: that of the stronger of its two pixels (ties: the first),
    as :func:`pixel_edge_orientations` gives it."""
    n = h * w
    p = e if e < n else e - n
    q = p + 1 if e < n else p + w
    return orientation[p] if values[p] >= values[q] else orientation[q]


@njit(cache=True, nogil=True)
def oriented_reweight(elements, offsets, weights, values, orientation, h, w, epsilon, min_size, single_angle, edge_rag):
    """Oriented watershed transform of the traced polylines (Arbelaez et al. PAMI 2011, sec. 4.1), in place.

    Each polyline is split recursively at its element farthest from the chord (while that
    distance is ``>= epsilon * chord length`` and ``> min_size`` pixels), giving approximately
    straight pieces. Each edge of a piece takes ``max(0, weight * |cos(orientation - pi/2 - angle)|)``,
    the edge-map strength projected on the piece's normal, where ``angle`` is the direction of
    the piece's chord and ``orientation`` the edge's (:func:`_edge_orientation` of the pixel maps
    ``values`` and ``orientation``); an edge shared by two pieces keeps the larger value.
    ``weights`` (length 2N) is overwritten: boundary edges get their new value, the others
    (``edge_rag < 0``) 0. Working memory: one flag per element and a stack as deep as the longest
    polyline, instead of full-size copies of the weights and the per-edge orientations.
    """
    half_pi = np.pi / 2
    split = _split_polylines(elements, offsets, h, w, epsilon, min_size)
    for t in range(offsets.size - 1):
        s = offsets[t]
        f = offsets[t + 1] - 1
        # Pieces run in order along the polyline, and consecutive pieces share one element: its
        # original weight is kept aside, since the first piece overwrites it.
        first = s
        w_first = weights[elements[s]]
        for i in range(s + 1, f + 1):
            if not split[i]:
                continue
            r0, c0 = _edge_point(elements[first], h, w)
            r1, c1 = _edge_point(elements[i], h, w)
            angle = np.arctan2(r0 - r1, c0 - c1) % np.pi
            w_last = weights[elements[i]]
            for q in range(first, i + 1):
                e = elements[q]
                wq = w_first if q == first else (w_last if q == i else weights[e])
                v = wq * abs(np.cos(_edge_orientation(values, orientation, e, h, w) - half_pi - angle))
                if q == first and first != s:  # shared with the previous piece: keep the larger
                    if v > weights[e]:
                        weights[e] = v
                else:
                    weights[e] = v if v > 0.0 else 0.0
            first = i
            w_first = w_last
        if f == s:  # one-edge polyline: its own direction (a horizontal edge's contour is vertical)
            e = elements[s]
            angle = single_angle if single_angle >= 0.0 else (half_pi if e < h * w else 0.0)
            v = weights[e] * abs(np.cos(_edge_orientation(values, orientation, e, h, w) - half_pi - angle))
            weights[e] = v if v > 0.0 else 0.0
    for e in range(weights.size):
        if edge_rag[e] < 0:
            weights[e] = 0.0


@njit(cache=True, nogil=True)
def paint_ucm2(edge_rag, rag_values, h, w, ucm2):
    """Write RAG edge values on the doubled grid: 1-faces from edges, 0-faces = max of their 1-faces, frame = copy of its neighbours."""
    n = h * w
    for p in range(n):
        i = p // w
        j = p - i * w
        if j < w - 1 and edge_rag[p] >= 0:
            ucm2[2 * i + 1, 2 * j + 2] = rag_values[edge_rag[p]]
        if i < h - 1 and edge_rag[n + p] >= 0:
            ucm2[2 * i + 2, 2 * j + 1] = rag_values[edge_rag[n + p]]
    _corners_and_frame(ucm2, h, w)
