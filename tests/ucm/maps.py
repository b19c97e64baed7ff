"""Real contour maps for the ucm tests and benchmark: BSDS500 human boundaries, averaged and blurred.

HED maps are not available to the tests, so the contour map of a BSDS500 test image is the
mean of its annotators' boundary maps, blurred by a Gaussian (sigma 1.5 px) and scaled to a
maximum of 1: a real, soft, multi-pixel-wide contour map like an edge detector's output.
Orientation comes from :func:`segsort_unsup.edgemaps.edge_orientation`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from scipy import ndimage as ndi

from segsort_unsup.edgemaps import edge_orientation

TEST_IDS = ("100007", "100039", "100099", "10081", "101027", "102062", "103006", "103029", "104010", "105027")


def gt_contour_map(gt_file: Path, sigma: float = 1.5) -> np.ndarray:
    """Mean of the annotators' boundaries, blurred and scaled to [0, 1] (float32 (H, W))."""
    cells = scipy.io.loadmat(gt_file)["groundTruth"][0]
    mean = np.mean([c["Boundaries"][0, 0].astype(np.float32) for c in cells], axis=0)
    blurred = ndi.gaussian_filter(mean, sigma)
    return (blurred / max(float(blurred.max()), 1e-6)).astype(np.float32)


def bsds_maps(bsds: Path, ids=TEST_IDS) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(id, edge, orientation)`` for BSDS500 test images."""
    out = []
    for image_id in ids:
        edge = gt_contour_map(bsds / "groundTruth" / "test" / f"{image_id}.mat")
        out.append((image_id, edge, edge_orientation(edge)))
    return out


def sobel_map(image_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Sobel gradient magnitude of a photo (scaled to [0, 1]) and its orientation: a noisy map
    whose watershed has thousands of regions, the hard case for speed and ties."""
    from skimage import color, filters, io

    grad = filters.sobel(color.rgb2gray(io.imread(image_path))).astype(np.float32)
    grad /= max(float(grad.max()), 1e-6)
    return grad, edge_orientation(grad)
