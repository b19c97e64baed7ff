"""Re-export of :mod:`segsort_unsup.edgemaps`, kept until the stage modules import from edgemaps."""

from ..edgemaps import edge_nms, edge_orientation, triangle_smooth  # noqa: F401
