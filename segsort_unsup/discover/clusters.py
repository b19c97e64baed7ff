"""Label-free cluster maps of a prototypes store: the unsupervised protocol of PiCIE and STEGO.

Every prototype of the scored set is put in one of ``groups`` clusters, without any label:
spherical k-means (faiss, ``method = "kmeans"``) or FINCH's partition with exactly that many
groups (``method = "finch"``, its ``req_clust``). Every pixel then takes the cluster of its
segment (summed over views like :func:`~segsort_unsup.transfer.stage.pixel_labels`), and the
result is one cluster-id PNG per image. The ``semantic`` stage with ``hungarian = true`` matches
clusters to classes one-to-one on the scored set (the Hungarian algorithm on the pixel confusion)
and reports mIoU and pixel accuracy: labels are read by that final matching only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import SEED_MAX, StageConfig, config_hash, setting
from ..errors import InputError, StoreError
from ..io.outdir import OutputFolder
from ..io.sources import store_content
from ..log import get_logger, progress
from ..parallel import Executor
from ..stages import Stage, StageSummary, failure_reason

log = get_logger("cluster")

METHODS = ("kmeans", "finch")


def cluster_rows(x: np.ndarray, groups: int, *, method: str = "kmeans", seed: int = 0,
                 iterations: int = 50) -> np.ndarray:
    """``(N,)`` int64 cluster of each unit row of ``x`` ``(N, D)``, in ``0 .. groups - 1``.

    ``kmeans``: spherical k-means (cosine), faiss, ``iterations`` Lloyd steps from each of ten
    seeded samples of rows, the best kept. ``finch``: FINCH's hierarchy refined to exactly ``groups`` clusters.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or not len(x):
        raise ValueError(f"expected a non-empty (N, D) table, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("the prototypes hold NaN or infinite values")
    if not 1 <= groups <= len(x):
        raise ValueError(f"cannot make {groups} clusters of {len(x)} prototypes")
    if method == "kmeans":
        return _spherical_kmeans(x, groups, seed=seed, iterations=iterations)
    if method == "finch":
        from .finch import finch

        return finch(x, req_clust=groups, seed=seed).req_partition.astype(np.int64)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def _spherical_kmeans(x: np.ndarray, groups: int, *, seed: int, iterations: int) -> np.ndarray:
    import faiss

    # Ten seeded restarts, the lowest-cost one kept: one random start often splits a group and merges two.
    kmeans = faiss.Kmeans(x.shape[1], groups, niter=iterations, seed=seed, spherical=True, nredo=10,
                          max_points_per_centroid=max(256, -(-len(x) // groups)))
    kmeans.train(x)
    _, nearest = kmeans.index.search(x, 1)
    return nearest[:, 0].astype(np.int64)


def one_hot(clusters: np.ndarray, groups: int) -> np.ndarray:
    """``(N, groups)`` float32 votes of rows whose clusters are ``clusters``."""
    votes = np.zeros((len(clusters), groups), np.float32)
    votes[np.arange(len(clusters)), clusters] = 1.0
    return votes


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterConfig(StageConfig):
    """Settings of the cluster stage (label-free cluster maps for the Hungarian-matched mIoU).

    groups : clusters made (the number of classes scored, e.g. 11 for CamVid).
    method : ``kmeans`` (spherical, faiss) or ``finch`` (FINCH refined to exactly ``groups``).
    """

    stage = "cluster"

    groups: int = setting(11, help="Clusters made: as many as the classes that will be scored.", low=2)
    method: str = setting("kmeans", help="kmeans: spherical k-means; finch: FINCH refined to exactly --groups.",
                          choices=("kmeans", "finch"))
    seed: int = setting(0, help="Seed of every random choice (same seed, same result).", low=0, high=SEED_MAX)

    def validate(self) -> None:
        if self.groups < 2:
            raise self.bad_value("groups", "must be >= 2")
        if self.method not in METHODS:
            raise self.bad_value("method", f"choose one of {', '.join(METHODS)}")


def run(config: ClusterConfig, inputs: Any, output: str | os.PathLike, *,
        executor: Executor | None = None, overwrite: bool | str = False) -> StageSummary:
    """A cluster-id PNG per image of the prototypes store ``inputs``; ``executor`` is unused."""
    from ..transfer.stage import open_prototypes

    store = open_prototypes(inputs, "scored")
    with store:
        table, failed = store.stack("prototypes")
        if not len(table.keys):
            raise StoreError(store.root, "no item of the prototypes store can be read")
        try:
            clusters = cluster_rows(table.array, config.groups, method=config.method, seed=config.seed)
        except ValueError as exc:
            raise InputError(f"{store.root}: {exc}") from None
        identity = config.identity(source_identity=store.config_hash, source_content=store_content(store))
        with OutputFolder(output, kind="clusters", identity=identity, overwrite=overwrite,
                          meta={"prototypes": str(inputs)}) as folder:
            summary = _write_maps(config, folder, store, table, clusters)
    summary.failed[:0] = [(key, reason) for key, reason in failed]
    summary.total += len(failed)
    summary.identity_hash = config_hash(identity)
    return summary


def _write_maps(config: ClusterConfig, folder: OutputFolder, store: Any, table: Any,
                clusters: np.ndarray) -> StageSummary:
    from ..transfer.stage import write_label_map

    summary = StageSummary("cluster", output=str(folder.path), total=len(table.keys))
    log.info("cluster: %d prototypes of %d images into %d groups (%s)", len(clusters), len(table.keys),
             config.groups, config.method)
    for i, key in enumerate(progress(table.keys, desc="cluster", unit="img")):
        try:
            target = folder.file_for(key, ".png")
            if folder.is_complete(target):  # resumed with the same identity: a re-run rewrites nothing
                summary.skipped += 1
                continue
            item = store.read(key)
            votes = one_hot(clusters[table.offsets[i]:table.offsets[i + 1]], config.groups)
            write_label_map(folder, target, item, votes, fill=255)
            summary.done += 1
        except Exception as exc:  # noqa: BLE001 - one bad item never stops the run
            reason = failure_reason(exc)
            log.warning("cluster: %s: %s", key, reason)
            summary.failed.append((key, reason))
    return summary


STAGE = Stage("cluster", ClusterConfig, run, sources=("embed",), output="clusters", optional=True, arguments=("prototypes",), executor=False,
              help="label-free cluster maps (k-means or FINCH) for the Hungarian-matched mIoU")
