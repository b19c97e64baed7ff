"""Tests of the SegSort core, and what they share: real embeddings of BSDS500 images, and the
NumPy restatement of the reference's k-means (``network/segsort/common_utils.py``)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

IMAGE_IDS = ("101085", "101087")  # two BSDS500 val images of the same size (481 x 321)
PAD_ROWS = 40  # the second image's last rows play crop padding (mean colour, segment -1, ignore label)
IGNORE = 255


@functools.lru_cache(maxsize=2)
def real_batch(bsds: Path, hed_h5: Path) -> dict[str, np.ndarray]:
    """Embeddings of two BSDS500 val images from the untrained vgg16-hed trunk (conv5_3, stride
    8) and a fixed random 1x1 projection to 32 dims, with real groupings on the embedding grid:

    ``emb`` (2, 32, 61, 41) float32 unit vectors; ``slic`` (2, 61, 41) SLIC superpixels (crop
    padding = -1); ``gt`` (2, 61, 41) classes = regions of the first human segmentation, 255
    on human boundaries and padding.
    """
    import torch
    from skimage.segmentation import slic

    from segsort_unsup.contours.hed import MEAN_BGR
    from segsort_unsup.embed.backbones import build_backbone
    from segsort_unsup.embed.losses import segments_to_grid
    from segsort_unsup.evaluate.inputs import load_ground_truth
    from segsort_unsup.io.images import read_image

    images = np.stack([read_image(bsds / "images" / "val" / f"{k}.jpg") for k in IMAGE_IDS]).astype(np.float32)
    images[1, -PAD_ROWS:] = np.array(MEAN_BGR[::-1], np.float32)
    segs, classes = [], []
    for i, key in enumerate(IMAGE_IDS):
        s = slic(images[i] / 255.0, n_segments=60, compactness=10, start_label=0).astype(np.int64)
        truth = load_ground_truth(bsds / "groundTruth" / "val" / f"{key}.mat")
        c = truth.segmentations[0].copy()
        c[truth.boundaries[0]] = IGNORE
        if i == 1:
            s[-PAD_ROWS:] = -1
            c[-PAD_ROWS:] = IGNORE
        segs.append(s)
        classes.append(c)
    trunk = build_backbone("vgg16-hed", weights=hed_h5, feature_layer="conv5_3").eval()
    with torch.no_grad():
        feats = trunk(torch.from_numpy(images).permute(0, 3, 1, 2))
        proj = np.random.default_rng(0).standard_normal((32, feats.shape[1])).astype(np.float32)
        emb = torch.nn.functional.conv2d(feats, torch.from_numpy(proj)[:, :, None, None])
        emb = torch.nn.functional.normalize(emb, dim=1)
    size = tuple(emb.shape[-2:])
    return {
        "emb": emb.numpy(),
        "slic": segments_to_grid(torch.from_numpy(np.stack(segs)), size).numpy(),
        "gt": segments_to_grid(torch.from_numpy(np.stack(classes)), size).numpy(),
    }


# -- NumPy restatement of the reference k-means --------------------------------------------------
def np_grid_labels(height: int, width: int, grid=(5, 5)) -> np.ndarray:
    """``initialize_cluster_labels``: cell = ceil(dim / n) pixels, id = y_band + (max y_band + 1) * x_band."""
    yr, xr = math.ceil(height / grid[0]), math.ceil(width / grid[1])
    y = (np.arange(height) // yr).reshape(-1, 1)
    x = (np.arange(width) // xr).reshape(1, -1)
    return y + (y.max() + 1) * x


def np_kmeans(features: np.ndarray, init: np.ndarray, num_clusters: int, iterations: int = 10,
              *, return_similarity: bool = False):
    """``kmeans_with_initial_labels`` on (P, C) unit rows: one-hot^T @ x, divide by the norm
    (0/0 = NaN for an empty cluster), argmax of x @ prototypes^T skipping NaN (TF's argmax never
    picks a NaN). With ``return_similarity``: also the (P, K) cosines of the last E-step."""
    labels = init.copy()
    similarity = np.full((len(labels), num_clusters), np.nan)
    for _ in range(iterations):
        one_hot = np.eye(num_clusters)[labels]
        sums = one_hot.T @ features
        with np.errstate(invalid="ignore", divide="ignore"):
            prototypes = sums / np.linalg.norm(sums, axis=1, keepdims=True)
        similarity = features @ prototypes.T
        labels = np.nanargmax(similarity, axis=1)
    return (labels, similarity) if return_similarity else labels


def np_unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``tf.unique``: (unique values in order of first appearance, index of each value)."""
    _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return values[np.sort(first)], rank[inverse.ravel()]


def np_pixel_sort(emb: np.ndarray, valid: np.ndarray | None = None, grid=(5, 5), iterations: int = 10,
                  *, return_similarity: bool = False):
    """One image, as ``add_segsort_loss`` / ``extract_trained_prototypes`` do it: (D, H, W) -> (H, W)
    labels (tf.unique numbering, -1 where not valid). With ``return_similarity``: also the
    (H*W, m) cosines of the last E-step with columns in the labels' numbering (NaN rows where not
    valid)."""
    d, h, w = emb.shape
    e = emb.reshape(d, -1).T.astype(np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    yy, xx = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
    x = np.concatenate([e, np.stack([yy.ravel(), xx.ravel()], 1)], 1)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    init = np_grid_labels(h, w, grid).ravel()
    keep = np.ones(h * w, bool) if valid is None else valid.ravel()
    labels, sim = np_kmeans(x[keep], init[keep], grid[0] * grid[1], iterations, return_similarity=True)
    uniq, renumbered = np_unique_inverse(labels)
    out = np.full(h * w, -1)
    out[keep] = renumbered
    if not return_similarity:
        return out.reshape(h, w)
    similarity = np.full((h * w, len(uniq)), np.nan)
    similarity[keep] = sim[:, uniq]
    return out.reshape(h, w), similarity


NEAR_TIE = 1e-6  # cosines this close may be ordered differently by another summation order


def assert_segments_match(got: np.ndarray, emb: np.ndarray, valid: np.ndarray | None = None, **options) -> np.ndarray:
    """``got`` equals the NumPy reference k-means of ``emb`` except at documented near-ties: a
    pixel may take another segment only where its last-E-step cosines to the two segments agree
    within ``NEAR_TIE`` (another CPU's matmul, e.g. oneDNN on AMX, sums in another order), and
    such pixels stay rare (<= 0.1%). Returns the reference labels."""
    expected, similarity = np_pixel_sort(emb, valid, return_similarity=True, **options)
    got = np.asarray(got)
    assert got.shape == expected.shape
    differ = np.flatnonzero(got.ravel() != expected.ravel())
    if differ.size:
        g, e = got.ravel()[differ], expected.ravel()[differ]
        assert (g >= 0).all() and (e >= 0).all() and (g < similarity.shape[1]).all(), \
            f"{differ.size} pixels differ, some in validity or numbering"
        gap = np.abs(similarity[differ, g] - similarity[differ, e])
        assert gap.max() <= NEAR_TIE, f"{differ.size} pixels differ, cosine gaps up to {gap.max():.2e} (not near-ties)"
        assert differ.size <= max(1, 1e-3 * got.size), f"{differ.size} near-ties of {got.size} pixels"
    return expected
