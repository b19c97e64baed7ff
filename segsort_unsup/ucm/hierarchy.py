"""Ultrametric contour maps: greedy merging by mean boundary strength, cuts, ``ucm2``.

A hierarchy is ``(parents, altitudes)``: ``2n - 1`` nodes, leaves ``0..n-1`` are the watershed
regions (pixels map to leaves through the ``leaves`` map of
:class:`~segsort_unsup.ucm.owt.WatershedRag`), node ``n + t`` is the ``t``-th merge, the
root is its own parent, and altitudes never decrease towards the root. The ultrametric
contour map (ucm) gives each boundary the altitude at which its two regions merge; on the
doubled grid ``ucm2`` of shape ``(2H + 1, 2W + 1)`` (the BSDS layout) pixel ``(i, j)`` is
``ucm2[2i + 1, 2j + 1]`` and boundaries sit on the even rows/columns, so
``label(ucm2 <= t)[1::2, 1::2]`` is the segmentation at ``t`` (:func:`labels_from_ucm2`). The outer
frame repeats its neighbouring row/column, as in BSR's ucm2 files and higra's Khalimsky grids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _kernels as k
from .owt import WatershedRag, rag_index_dtype, watershed_rag


def _check_tree(parents: np.ndarray, altitudes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C-contiguous int32 parents (int64 above 2**31 nodes) and float32 (as stored) or float64
    altitudes: a stored tree goes to the kernels without copies."""
    parents = np.asarray(parents)
    altitudes = np.asarray(altitudes)
    if parents.ndim != 1 or parents.shape != altitudes.shape or parents.size % 2 != 1:
        raise ValueError(
            f"parents and altitudes must be 1-D of the same odd length 2n-1, got {parents.shape} and {altitudes.shape}"
        )
    if parents.dtype.kind not in "iu" or parents.max() >= parents.size:
        raise ValueError("parents must hold integer node indices below the number of nodes")
    parents = np.ascontiguousarray(parents, dtype=np.int32 if parents.size < 2**31 else np.int64)
    altitudes = np.ascontiguousarray(altitudes, dtype=np.float32 if altitudes.dtype == np.float32 else np.float64)
    if (parents < np.arange(parents.size, dtype=parents.dtype)).any() or parents[-1] != parents.size - 1:
        raise ValueError("parents must point to higher node indices and the last node must be the root")
    return parents, altitudes


def _n_leaves(parents: np.ndarray) -> int:
    return (parents.size + 1) // 2


def mean_boundary_hierarchy(ows: WatershedRag, *,
                            consume: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge tree of the watershed regions, weakest mean boundary first (BSR's ``ucm_mean_pb``).

    ``consume=True`` merges in ``ows.sums``/``ows.lengths``/``ows.sources`` themselves (20 bytes per
    RAG edge less; they hold no meaning afterwards; ``targets`` and ``offsets`` are kept).

    Returns ``(parents int32, altitudes float32, boundary_altitudes float32)``; the last gives,
    for each RAG edge of ``ows``, the altitude at which its two regions merge.
    """
    n = max(ows.n_regions, 1)
    # written straight in their stored types (float64 strengths round to float32 on assignment,
    # as astype would): no float64/int64 copies of the tree
    parents = np.empty(2 * n - 1, np.int32)
    altitudes = np.empty(2 * n - 1, np.float32)
    rag_alt = np.empty(ows.sources.size, np.float32)
    index = np.empty(0, np.int32 if 2 * max(ows.sources.size, 2 * n) + 16 < 2**31 else np.int64)
    # the kernel overwrites the edges' ends as regions merge: a consumed RAG lends its sources
    end0 = ows.sources if consume and ows.sources.dtype == index.dtype else ows.sources.astype(index.dtype)
    end1 = ows.targets.astype(index.dtype)
    k.mean_boundary_merge(n, end0, end1, ows.sums, ows.lengths, parents, altitudes, rag_alt, index, bool(consume))
    return parents, altitudes, rag_alt


def cut_labels(parents: np.ndarray, altitudes: np.ndarray, *, threshold: float) -> np.ndarray:
    """Leaf labels of the cut at ``threshold``: leaves joined by nodes of altitude ``<= threshold``.

    Returns an int32 array with one label per leaf, ``0..k-1`` in order of each region's
    smallest leaf (raster order, when leaves are watershed regions). Index it with the
    ``leaves`` map to get a pixel label map.
    """
    parents, altitudes = _check_tree(parents, altitudes)
    labels = np.empty(_n_leaves(parents), np.int32)
    k.cut_leaves(parents, altitudes, float(threshold), labels.size, labels)
    return labels


def ucm2_from_tree(parents: np.ndarray, altitudes: np.ndarray, leaves: np.ndarray) -> np.ndarray:
    """The ``(2H + 1, 2W + 1)`` float32 ucm2 of a merge tree over the regions of ``leaves``.

    Each boundary between two leaves takes the altitude of their lowest common ancestor;
    corners take the largest of their four boundaries; pixels are 0; the outer frame repeats
    its neighbouring row/column.
    """
    parents, altitudes = _check_tree(parents, altitudes)
    leaves = np.ascontiguousarray(np.asarray(leaves), dtype=np.int32)
    if leaves.ndim != 2:
        raise ValueError(f"leaves must be a 2-D (H, W) label map, got shape {leaves.shape}")
    n = _n_leaves(parents)
    if leaves.size and (leaves.min() < 0 or leaves.max() >= n):
        raise ValueError(f"leaves holds labels outside 0..{n - 1} (the tree's leaves)")
    h, w = leaves.shape
    sources, targets, offsets = k.rag_from_labels(leaves.reshape(-1), h, w, n, np.empty(0, rag_index_dtype(h, w)))
    values = np.empty(sources.size, np.float64)
    k.lca_altitudes(parents, altitudes, sources, targets, values)
    return ucm2_from_regions(leaves, offsets, targets, values.astype(np.float32))


def ucm2_from_regions(leaves: np.ndarray, offsets: np.ndarray, targets: np.ndarray,
                      rag_values: np.ndarray) -> np.ndarray:
    """The ``(2H + 1, 2W + 1)`` ucm2 with each RAG edge's value painted on its boundary.

    ``leaves``, ``offsets``, ``targets`` are the regions and sorted RAG of a
    :class:`~segsort_unsup.ucm.owt.WatershedRag`, ``rag_values`` one value per RAG edge (e.g. the
    third output of :func:`mean_boundary_hierarchy`); each boundary's RAG edge is found from the
    two regions it separates, and corners take the largest of their four boundaries. float32
    values paint a float32 ucm2; uint16 ``rag_values`` (:func:`quantise_ucm2`) paint a uint16 ucm2
    (8 bytes per pixel instead of 16), equal to the quantised float32 ucm2 (corners: max of
    quantised = quantised max)."""
    leaves = np.ascontiguousarray(leaves, dtype=np.int32)
    if leaves.ndim != 2:
        raise ValueError(f"leaves must be a 2-D (H, W) label map, got shape {leaves.shape}")
    h, w = leaves.shape
    targets = np.ascontiguousarray(targets, dtype=np.int32)
    offsets = np.asarray(offsets)
    if offsets.ndim != 1 or offsets.dtype.kind != "i" or offsets.size < 2 or offsets[-1] != targets.size:
        raise ValueError("offsets must index targets by source region (WatershedRag.offsets)")
    if leaves.size and (leaves.min() < 0 or leaves.max() >= offsets.size - 1):
        raise ValueError(f"leaves holds labels outside 0..{offsets.size - 2} (the RAG's regions)")
    rag_values = np.asarray(rag_values)
    dtype = np.uint16 if rag_values.dtype == np.uint16 else np.float32
    rag_values = np.ascontiguousarray(rag_values, dtype=dtype)
    if rag_values.shape != targets.shape:
        raise ValueError(f"rag_values must hold one value per RAG edge ({targets.size}), got {rag_values.shape}")
    ucm2 = np.zeros((2 * h + 1, 2 * w + 1), dtype)
    k.paint_ucm2_labels(leaves.reshape(-1), offsets, targets, rag_values, h, w, ucm2)
    return ucm2


#: Item attribute of a uint16-quantised ucm2: the altitude of one quantisation step.
UCM2_SCALE_ATTR = "ucm2_scale"
UCM2_LEVELS = 65535


def ucm2_scale(altitudes: np.ndarray) -> float:
    """Quantisation step of a tree's ucm2: altitudes ``[0, max]`` map to ``0..65535`` (1.0 when all are 0)."""
    top = float(np.max(altitudes)) if np.size(altitudes) else 0.0
    return top / UCM2_LEVELS if top > 0 else 1.0


def quantise_ucm2(values: np.ndarray, scale: float) -> np.ndarray:
    """uint16 ``round(values / scale)`` (values in ``[0, 65535 * scale]``; negatives clip to 0)."""
    q = np.rint(np.asarray(values, np.float64) / scale)
    return np.clip(q, 0, UCM2_LEVELS).astype(np.uint16)


def ucm2_values(ucm2: np.ndarray, attrs: Mapping[str, Any] | None = None) -> np.ndarray:
    """The float32 altitudes of a stored ucm2: the one accessor for every reader of ``ucm2``.

    A float32 ucm2 is returned as it is (no copy); a uint16-quantised one (huge maps, see
    ``UcmConfig.ucm2_dtype``) as ``q * attrs["ucm2_scale"]`` rounded to float32: within half a step
    (``scale / 2``, ``max altitude / 131070``) of the float altitudes, up to that rounding, so a cut
    at ``t`` agrees with the float ucm2's except for boundaries within half a step of ``t``. Exact
    cuts at any threshold come from the stored tree: ``cut_labels(parents, altitudes, threshold=t)[leaves]``.
    """
    ucm2 = np.asarray(ucm2)
    if ucm2.dtype != np.uint16:
        return ucm2
    if attrs is None or UCM2_SCALE_ATTR not in attrs:
        raise ValueError(f"a uint16 ucm2 needs its {UCM2_SCALE_ATTR!r} attribute (the quantisation step)")
    out = np.empty(ucm2.shape, np.float32)
    # computed in float64 a buffer at a time, rounded once to float32: no full-size float64 copy
    np.multiply(ucm2, float(attrs[UCM2_SCALE_ATTR]), out=out, casting="unsafe")
    return out


def labels_from_ucm2(ucm2: np.ndarray, threshold: float, *, connectivity: int = 4, order: str = "C") -> np.ndarray:
    """Segmentation of a ucm2 at ``threshold``: connected regions of ``ucm2 <= threshold`` on the
    doubled grid, read at the pixels ``[1::2, 1::2]``; int32 ``(H, W)`` labels from 0.

    ``connectivity=4`` (default) joins cells through shared sides only, so two pixels join exactly
    when a boundary cell between them is at or below the threshold: for the ucm2s of this package
    that is the cut of the merge tree (``cut_labels(parents, altitudes, threshold=t)[leaves]``).
    ``connectivity=8`` is BSR's ``bwlabel(ucm2 <= t)(2:2:end, 2:2:end)`` (MATLAB's default
    8-connectivity): diagonal cells join too, so where a ucm2 from another tool has a corner lower
    than its boundaries, pixels touching at that corner merge; the region benchmarks need it to
    score such files as BSR does. ``order`` is the scan that numbers the regions: ``"C"`` row-major,
    ``"F"`` column-major (MATLAB's, so ``+ 1`` gives BSR's ids). A pixel whose own cell is above the
    threshold (none in a ucm2 whose pixels are 0) gets ``-1``; boundary cells that form a region
    without pixels (only in ucm2s whose corners are below their boundaries) leave a gap in the ids.
    """
    from scipy import ndimage

    ucm2 = np.asarray(ucm2)
    if ucm2.ndim != 2 or ucm2.shape[0] % 2 != 1 or ucm2.shape[1] % 2 != 1:
        raise ValueError(f"ucm2 must be (2H+1, 2W+1), got shape {ucm2.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' (row-major) or 'F' (column-major), got {order!r}")
    inside = ucm2 <= threshold
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    if order == "F":  # scipy numbers regions in row-major scan order: label the transpose
        labels = ndimage.label(inside.T, structure=structure)[0].T
    else:
        labels = ndimage.label(inside, structure=structure)[0]
    return (labels[1::2, 1::2] - 1).astype(np.int32)


@dataclass(frozen=True)
class Ucm:
    """An ultrametric contour map with its merge tree.

    ``leaves`` (H, W) int32 maps pixels to tree leaves; pixel labels at any threshold are
    ``cut_labels(parents, altitudes, threshold=t)[leaves]``.
    """

    ucm2: np.ndarray
    parents: np.ndarray
    altitudes: np.ndarray
    leaves: np.ndarray

    def labels(self, threshold: float) -> np.ndarray:
        """Pixel labels ``(H, W)`` int32 at ``threshold``."""
        return cut_labels(self.parents, self.altitudes, threshold=threshold)[self.leaves]


def ultrametric_contour_map(
    edge: np.ndarray,
    orientation: np.ndarray | None = None,
    *,
    epsilon: float = 0.1,
    min_size: float = 2.0,
    single_edge_angle: float | None = 0.0,
) -> Ucm:
    """OWT-UCM of a contour map: oriented watershed, then greedy merging by mean boundary strength.

    ``edge`` (H, W) contour strength; ``orientation`` (H, W) contour normal in radians (optional,
    enables the oriented watershed transform); the keywords are those of
    :func:`~segsort_unsup.ucm.owt.watershed_rag`. Altitudes are mean boundary strengths on the
    scale of ``edge`` (no sigmoid calibration as in BSR's gPb ``normalize_output``).
    """
    rag = watershed_rag(edge, orientation, epsilon=epsilon, min_size=min_size, single_edge_angle=single_edge_angle)
    parents, altitudes, rag_alt = mean_boundary_hierarchy(rag)
    return Ucm(ucm2_from_regions(rag.leaves, rag.offsets, rag.targets, rag_alt), parents, altitudes, rag.leaves)
