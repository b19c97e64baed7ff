"""OWT-UCM: hierarchical segments from contour maps (Arbelaez et al., TPAMI 2011).

``owt`` (watershed regions and their RAG, oriented watershed transform), ``hierarchy`` (greedy merging by
mean boundary strength, ``ucm2``, cuts), ``stage`` (the ``ucm`` stage over a store), ``export``
(PNGs, overview pictures, BSDS ``.mat`` files). Kernels live in ``_kernels`` (numba).
"""

from .hierarchy import (Ucm, cut_labels, labels_from_ucm2, mean_boundary_hierarchy, ucm2_from_regions, ucm2_from_tree,
                        ucm2_values, ultrametric_contour_map)
from .owt import WatershedRag, watershed_rag

__all__ = [
    "Ucm",
    "WatershedRag",
    "cut_labels",
    "labels_from_ucm2",
    "mean_boundary_hierarchy",
    "ucm2_from_regions",
    "ucm2_from_tree",
    "ucm2_values",
    "ultrametric_contour_map",
    "watershed_rag",
]
