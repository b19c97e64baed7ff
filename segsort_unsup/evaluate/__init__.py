"""Benchmarks: BSDS boundaries (P/R, ODS/OIS/AP/R50) and regions (Covering, PRI, VI), semantic mIoU.

``boundaries`` and ``regions`` reproduce BSR (Arbelaez et al. 2011) numerically; ``bsds`` runs them
over a dataset and writes BSR's result files; ``semantic`` scores label maps.
"""

from .boundaries import (
    BoundaryCounts,
    BoundarySummary,
    boundary_counts_pb,
    boundary_counts_segs,
    correspond_pixels,
    summarize_boundaries,
)
from .bsds import BenchOptions, run_benchmark
from .regions import RegionCounts, RegionSummary, region_counts, region_counts_ucm2, summarize_regions
from .semantic import confusion_matrix, run_semantic, semantic_scores

__all__ = [
    "BenchOptions",
    "BoundaryCounts",
    "BoundarySummary",
    "RegionCounts",
    "RegionSummary",
    "boundary_counts_pb",
    "boundary_counts_segs",
    "confusion_matrix",
    "correspond_pixels",
    "region_counts",
    "region_counts_ucm2",
    "run_benchmark",
    "run_semantic",
    "semantic_scores",
    "summarize_boundaries",
    "summarize_regions",
]
