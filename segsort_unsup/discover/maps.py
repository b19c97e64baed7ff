"""2-D maps of prototypes (the SegSort paper's figures 9 and 10): t-SNE, or PCA as a fallback.

:func:`embed_2d` places the rows of a feature table in the plane; :func:`snap_to_grid` keeps one
point per cell of a grid laid over that plane (the gallery draws each kept point's segment as a
thumbnail in its cell); :func:`group_colours` gives distinguishable frame colours.
"""

from __future__ import annotations

import numpy as np

from ..log import get_logger

log = get_logger("discover.maps")

METHODS = ("auto", "tsne", "pca")


def pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components of the rows of ``x`` (signs fixed: largest |loading| positive)."""
    x = np.asarray(x, np.float64)
    centred = x - x.mean(axis=0)
    if x.shape[0] < 2:
        return np.zeros((x.shape[0], 2), np.float32)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    vt = vt[:2]
    signs = np.sign(vt[np.arange(vt.shape[0]), np.abs(vt).argmax(axis=1)])
    out = centred @ (vt * signs[:, None]).T
    if out.shape[1] < 2:
        out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    return out.astype(np.float32)


def embed_2d(x: np.ndarray, *, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """Rows of ``x`` (N x D) placed in the plane; returns ``(xy, method used)``.

    ``"tsne"``: scikit-learn's t-SNE (PCA initialisation, perplexity min(30, (N-1)/3), inputs
    reduced to 50 principal components first); ``"pca"``: the first two principal
    components; ``"auto"``: t-SNE when scikit-learn imports and N >= 10, else PCA.
    """
    if method not in METHODS:
        raise ValueError(f"map method {method!r} is not one of {METHODS}")
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    if method in ("auto", "tsne") and n >= 10:
        try:
            from sklearn.decomposition import PCA
            from sklearn.manifold import TSNE
        except ImportError:
            if method == "tsne":
                raise ValueError("t-SNE needs scikit-learn: pip install scikit-learn (or use the PCA map)") from None
            log.info("discover: scikit-learn is not installed: PCA map instead of t-SNE")
        else:
            reduced = PCA(n_components=min(50, x.shape[1], n), random_state=seed).fit_transform(x) \
                if x.shape[1] > 50 else x
            from threadpoolctl import threadpool_limits

            tsne = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30.0, (n - 1) / 3.0),
                        learning_rate="auto")
            # One thread: t-SNE's OpenMP threads spin against each other on a busy machine (300 points:
            # 66 s with 2 threads on 2 shared cores, 6 s with one), and one thread gives the same map.
            with threadpool_limits(1):
                return tsne.fit_transform(reduced).astype(np.float32), "t-SNE"
    return pca_2d(x), "PCA"


def snap_to_grid(xy: np.ndarray, cols: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """One point per grid cell: ``(indices of the kept points, their cell = row * cols + col)``.

    The plane spanned by ``xy`` is divided into ``cols`` x ``rows`` cells; of the points falling
    in a cell the one nearest its centre is kept (ties: the lower index). Cost: one sort.
    """
    xy = np.asarray(xy, np.float64)
    n = xy.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    scaled = (xy - lo) / np.maximum(hi - lo, 1e-12) * np.array([cols, rows])
    cell_xy = np.minimum(scaled.astype(np.int64), np.array([cols - 1, rows - 1]))
    dist = ((scaled - cell_xy - 0.5) ** 2).sum(axis=1)
    cell = cell_xy[:, 1] * cols + cell_xy[:, 0]
    order = np.lexsort((np.arange(n), dist, cell))
    first = np.ones(n, bool)
    first[1:] = cell[order][1:] != cell[order][:-1]
    kept = order[first]
    return kept, cell[kept]


def group_colours(n: int) -> list[str]:
    """``n`` CSS colours, neighbours in the list far apart in hue (golden angle), two lightnesses."""
    import colorsys

    out = []
    for i in range(n):
        r, g, b = colorsys.hls_to_rgb((i * 0.381966) % 1.0, 0.45 if i % 2 == 0 else 0.62, 0.75)
        out.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return out
