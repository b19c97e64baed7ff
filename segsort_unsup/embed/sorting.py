"""Pixel sorting: spherical (von Mises-Fisher) k-means of pixel embeddings with location features.

As the reference (``network/segsort/common_utils.py``: ``initialize_cluster_labels``,
``generate_location_features``, ``kmeans_with_initial_labels``; used per image in
``train_utils.add_segsort_loss`` and ``eval_utils.extract_trained_prototypes``):

1. Features: the unit embedding ``e`` (D) concatenated with the pixel's location ``(y/H, x/W)``
   (both in [0, 1); unweighted in the reference, ``location_weight`` here scales them), then
   L2-normalised as one (D+2)-vector.
2. Initial labels: a ``gy x gx`` grid (5 x 5): cells of ``ceil(H/gy)`` rows by ``ceil(W/gx)``
   columns, numbered ``row_band + n_row_bands * column_band`` (so a small map can have fewer
   bands than asked).
3. ``iterations`` (10) rounds of M-step (prototype = normalised sum of its pixels' features) and
   E-step (each pixel takes the prototype of largest cosine; ties go to the lowest index).
4. Pixels to ignore are dropped before clustering and get label -1.
5. Labels are renumbered 0..K-1 in order of first appearance in raster order (the reference's
   ``tf.unique``).

Empty clusters: a cluster with no pixels has no prototype. In the reference its normalised sum
is 0/0 = NaN, which never wins the argmax, so the cluster stays empty for the remaining
iterations; here its similarity is -inf, the same outcome. Clusters are never re-seeded.

Images of a batch are clustered independently but in one batched computation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

DEFAULT_GRID = (5, 5)
DEFAULT_ITERATIONS = 10


def grid_labels(height: int, width: int, *, grid: tuple[int, int] = DEFAULT_GRID,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The reference's uniform initial partition: ``(H, W)`` int64 cluster ids.

    Cells are ``ceil(H/gy)`` x ``ceil(W/gx)`` pixels; id = ``row_band + n_row_bands * column_band``.
    """
    gy, gx = _check_grid(grid)
    if height < 1 or width < 1:
        raise InputError(f"grid_labels needs a non-empty map, got {height} x {width}")
    y = torch.arange(height, device=device) // math.ceil(height / gy)
    x = torch.arange(width, device=device) // math.ceil(width / gx)
    return y[:, None] + (int(y[-1]) + 1) * x[None, :]


def location_features(height: int, width: int, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """``(2, H, W)`` location features ``(y/H, x/W)``, as the reference's training pipeline."""
    y = torch.arange(height, dtype=dtype, device=device) / height
    x = torch.arange(width, dtype=dtype, device=device) / width
    return torch.stack([y[:, None].expand(height, width), x[None, :].expand(height, width)])


def spherical_kmeans(features: torch.Tensor, init: torch.Tensor, *, iterations: int = DEFAULT_ITERATIONS,
                     valid: torch.Tensor | None = None, num_clusters: int | None = None) -> torch.Tensor:
    """Batched spherical k-means from initial labels.

    Parameters
    ----------
    features : (N, P, C) tensor
        Unit-norm rows (not normalised here).
    init : (N, P) integer tensor
        Initial cluster of each point, in ``0..K-1``.
    valid : (N, P) bool tensor, optional
        Points to cluster; the others get -1 and take no part.
    num_clusters
        ``K`` (the reference's ``max_label``); default: the largest initial label + 1. Clusters
        without initial points start (and stay) empty.

    Returns
    -------
    (N, P) int64 tensor: final cluster ids (not renumbered; emptied clusters leave gaps), -1 where
    not valid.
    """
    if features.ndim != 3:
        raise InputError(f"features must be (N, P, C), got shape {tuple(features.shape)}")
    n, p, c = features.shape
    if init.shape != (n, p):
        raise InputError(f"init must have shape {(n, p)}, got {tuple(init.shape)}")
    if valid is not None and valid.shape != (n, p):
        raise InputError(f"valid must have shape {(n, p)}, got {tuple(valid.shape)}")
    if iterations < 0:
        raise InputError(f"iterations must be >= 0, got {iterations}")
    init = init.long()
    used = init if valid is None else init[valid]
    if used.numel() and int(used.min()) < 0:
        raise InputError("initial labels of valid points must be >= 0 (mark points to drop with `valid`)")
    k = int(used.max()) + 1 if used.numel() else 1
    if num_clusters is not None:
        if num_clusters < k:
            raise InputError(f"num_clusters={num_clusters} but the initial labels go up to {k - 1}")
        k = num_clusters
    dump = k  # invalid points are parked in an extra cluster that never gets a prototype
    labels = init if valid is None else torch.where(valid, init, dump)
    x = features
    for _ in range(iterations):
        # M-step as the reference's one-hot^T @ x: a matmul (a scatter-add over P x C values is
        # ~10x slower for wide features at full resolution)
        one_hot = F.one_hot(labels, k + 1)[..., :k].to(x.dtype)  # (N, P, K)
        sums = torch.bmm(one_hot.transpose(1, 2), x)
        counts = one_hot.sum(dim=1)
        prototypes = F.normalize(sums, dim=-1)
        similarity = torch.bmm(x, prototypes.transpose(1, 2))  # (N, P, K)
        similarity.masked_fill_((counts == 0).unsqueeze(1), float("-inf"))
        labels = similarity.argmax(dim=-1)
        if valid is not None:
            labels = torch.where(valid, labels, dump)
    return torch.where(labels == dump, -1, labels)


def consecutive_labels(labels: torch.Tensor) -> torch.Tensor:
    """Renumber each row of ``(N, P)`` labels to ``0..m-1`` in order of first appearance; -1 stays."""
    n, p = labels.shape
    if p == 0:
        return labels.clone()
    k = int(labels.max()) + 2  # one spare slot for -1
    lab = torch.where(labels < 0, k - 1, labels)
    positions = torch.arange(p, device=labels.device).expand(n, p)
    first = torch.full((n, k), p, dtype=torch.long, device=labels.device)
    first.scatter_reduce_(1, lab, positions, reduce="amin")
    first[:, k - 1] = p + 1  # -1 ranks last, after every real cluster
    rank = torch.empty_like(first).scatter_(1, first.argsort(dim=1, stable=True),
                                            torch.arange(k, device=labels.device).expand(n, k).contiguous())
    out = rank.gather(1, lab)
    return torch.where(labels < 0, -1, out)


@torch.no_grad()
def pixel_sort(embedding: torch.Tensor, *, valid: torch.Tensor | None = None,
               grid: tuple[int, int] = DEFAULT_GRID, iterations: int = DEFAULT_ITERATIONS,
               init: torch.Tensor | None = None, locations: torch.Tensor | None = None,
               location_weight: float = 1.0) -> torch.Tensor:
    """Segment pixel embeddings by spherical k-means on ``[embedding, location]`` (see module doc).

    Parameters
    ----------
    embedding : (N, D, H, W) float tensor
        Pixel embeddings (normalised here).
    valid : (N, H, W) bool tensor, optional
        Pixels to use; the others are dropped and labelled -1.
    grid
        ``(gy, gx)`` cells of the initial partition (ignored when ``init`` is given).
    init : (N, H, W) or (H, W) integer tensor, optional
        Initial labels instead of the grid (the reference's training crops carry the grid of the
        whole image, cropped with it).
    locations : (N, 2, H, W) or (2, H, W) float tensor, optional
        Location features instead of ``(y/H, x/W)`` of this map (again: those of the whole image).
    location_weight
        Scale of the location features before the joint normalisation (1 in the reference).

    Returns
    -------
    (N, H, W) int64 tensor: cluster ids ``0..m-1`` per image in order of first appearance, -1 for
    dropped pixels.
    """
    if embedding.ndim != 4:
        raise InputError(f"embedding must be (N, D, H, W), got shape {tuple(embedding.shape)}")
    if not embedding.is_floating_point():
        raise InputError(f"embedding must be a float tensor, got {embedding.dtype}")
    n, d, h, w = embedding.shape
    dtype = embedding.dtype if embedding.dtype in (torch.float32, torch.float64) else torch.float32
    dev = embedding.device
    if locations is None:
        locations = location_features(h, w, dtype=dtype, device=dev)
    if locations.shape not in ((2, h, w), (n, 2, h, w)):
        raise InputError(f"locations must be (2, {h}, {w}) or ({n}, 2, {h}, {w}), got {tuple(locations.shape)}")
    if init is None:
        init = grid_labels(h, w, grid=grid, device=dev)
    if init.shape not in ((h, w), (n, h, w)):
        raise InputError(f"init must be ({h}, {w}) or ({n}, {h}, {w}), got {tuple(init.shape)}")
    if valid is not None:
        if valid.shape != (n, h, w):
            raise InputError(f"valid must be ({n}, {h}, {w}), got {tuple(valid.shape)}")
        valid = valid.to(device=dev, dtype=torch.bool).reshape(n, h * w)
    with torch.autocast(dev.type, enabled=False):
        e = F.normalize(embedding.to(dtype), dim=1)
        loc = (locations.to(device=dev, dtype=dtype) * location_weight).expand(n, 2, h, w)
        x = F.normalize(torch.cat([e, loc], dim=1), dim=1)
        x = x.permute(0, 2, 3, 1).reshape(n, h * w, d + 2)
        init = init.to(dev).long().expand(n, h, w).reshape(n, h * w)
        labels = spherical_kmeans(x, init, iterations=iterations, valid=valid)
    return consecutive_labels(labels).reshape(n, h, w)


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    try:
        gy, gx = (int(g) for g in grid)
    except (TypeError, ValueError):
        raise InputError(f"grid must be two positive integers (gy, gx), got {grid!r}") from None
    if gy < 1 or gx < 1:
        raise InputError(f"grid must be two positive integers (gy, gx), got {grid!r}")
    return gy, gx
