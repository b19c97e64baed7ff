"""2-D maps of prototypes (the SegSort paper's figures 9 and 10): t-SNE, or PCA as a fallback.

:func:`embed_2d` places the rows of a feature table in the plane; :func:`snap_to_grid` keeps one
point per cell of a grid laid over that plane (the gallery draws each kept point's segment as a
thumbnail in its cell); :func:`group_colours` gives distinguishable frame colours;
:func:`draw_map` draws a plain scatter plot coloured by group and, when classes are known, by class.
"""

from __future__ import annotations

import os

import numpy as np

from ..io.atomic import atomic_path
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
            tsne = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30.0, (n - 1) / 3.0),
                        learning_rate="auto")
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


def _colours(values: np.ndarray, cmap_name: str = "tab20") -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps[cmap_name]
    _, inverse = np.unique(values, return_inverse=True)
    return cmap(inverse % cmap.N)


def draw_map(xy: np.ndarray, groups: np.ndarray, path: str | os.PathLike, *, labels: np.ndarray | None = None,
             title: str = "", class_names: dict[int, str] | None = None) -> None:
    """Draw ``xy`` coloured by ``groups`` (and by ``labels`` in a second panel) into the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    panels = 2 if labels is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.0 * panels, 6.0), dpi=90, squeeze=False)
    size = max(2.0, min(20.0, 4000.0 / max(len(xy), 1)))
    ax = axes[0, 0]
    ax.scatter(xy[:, 0], xy[:, 1], c=_colours(groups), s=size, linewidths=0)
    ax.set_title(f"{title} — by group ({len(np.unique(groups))} groups)" if title else "by group")
    if labels is not None:
        ax = axes[0, 1]
        classes = np.unique(labels)
        cmap = matplotlib.colormaps["tab20"]
        for i, c in enumerate(classes):
            sel = labels == c
            name = (class_names or {}).get(int(c), str(int(c)))
            ax.scatter(xy[sel, 0], xy[sel, 1], color=cmap(i % cmap.N), s=size, linewidths=0, label=name)
        ax.set_title("by class")
        if len(classes) <= 20:
            ax.legend(markerscale=max(1.0, 8.0 / size), fontsize=7, loc="best")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
