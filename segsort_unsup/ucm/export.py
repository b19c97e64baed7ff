"""Exports of a segments item: ucm/label PNGs, an overview picture, BSDS ``.mat`` files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..io.atomic import atomic_path, atomic_write
from ..io.outdir import key_path
from ..io.store import Item
from ..log import get_logger
from .hierarchy import cut_labels, ucm2_values

log = get_logger("ucm")


def ucm_image(ucm2: np.ndarray) -> np.ndarray:
    """The ucm on the image grid (BSR's ``imageSize`` format: ``ucm2[2::2, 2::2]``), float32 (H, W)."""
    return np.ascontiguousarray(ucm2[2::2, 2::2], dtype=np.float32)


def ucm_picture(ucm: np.ndarray) -> np.ndarray:
    """A visible uint8 picture of a ucm: white boundaries on black, gamma-stretched.

    Most boundary strengths are small, so a linear map leaves the picture nearly black; the
    square root of the strength relative to the image's strongest boundary (gamma 0.5) shows
    the weak boundaries dimly and keeps the order of strengths. 0 stays black.
    """
    top = float(ucm.max(initial=0.0))
    if top <= 0:
        return np.zeros(ucm.shape, np.uint8)
    return np.clip(np.sqrt(np.clip(ucm, 0, None) / top) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def label_colors(labels: np.ndarray) -> np.ndarray:
    """A stable colour per label (hash of the label number), uint8 (H, W, 3)."""
    ids = labels.astype(np.uint64) + np.uint64(1)
    mixed = (ids * np.uint64(2654435761)) & np.uint64(0xFFFFFF)
    rgb = np.stack([(mixed >> np.uint64(s)) & np.uint64(255) for s in (16, 8, 0)], axis=-1).astype(np.uint8)
    return (rgb // 2 + 64).astype(np.uint8)


def _overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    out = (0.6 * image + 0.4 * label_colors(labels)).astype(np.uint8)
    out[find_boundaries(labels, mode="inner")] = (255, 40, 40)
    return out


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")  # format given: the temporary name ends in .tmp


def overview_levels(threshold: float, levels: tuple[float, ...]) -> tuple[float, float]:
    """The two cuts shown in the overview: the extreme ``levels`` or, lacking two, half the threshold and the threshold."""
    if len(levels) >= 2:
        return min(levels), max(levels)
    if len(levels) == 1:
        return tuple(sorted((threshold, levels[0])))  # type: ignore[return-value]
    return threshold / 2, threshold


def _titled(panel: np.ndarray, title: str) -> np.ndarray:
    """The panel with a white title strip above it (PIL's built-in font: no font files needed)."""
    from PIL import ImageDraw

    strip = Image.new("RGB", (panel.shape[1], 16), (255, 255, 255))
    ImageDraw.Draw(strip).text((4, 2), title, fill=(0, 0, 0))
    return np.concatenate([np.asarray(strip), panel], axis=0)


PNG_SUFFIXES = ("_ucm.png", "_labels.png", "_overview.png")
MAT_SUFFIX = ".mat"


def export_paths(key: str, *, png_dir=None, mat_dir=None) -> list[Path]:
    """The files :func:`export_item` writes for ``key`` (the key checked: it must stay inside the folders)."""
    paths = [key_path(png_dir, key, suffix) for suffix in PNG_SUFFIXES] if png_dir is not None else []
    return paths + ([key_path(mat_dir, key, MAT_SUFFIX)] if mat_dir is not None else [])


def export_item(item: Item, config, *, png_dir=None, mat_dir=None, source_store: str = "",
                edge: np.ndarray | None = None) -> None:
    """Write ``<key>_ucm.png``, ``<key>_labels.png``, ``<key>_overview.png`` and/or ``<key>.mat``.

    The overview is image | contours (``edge``, else the ucm) | segments at two cuts, titled.
    Keys become file names through :func:`~segsort_unsup.io.outdir.key_path` (one that would leave
    the folder is refused with one line).
    """
    ucm2 = ucm2_values(item.arrays["ucm2"], item.attrs)  # float32 (a quantised one dequantised)
    if mat_dir is not None:
        import scipy.io

        path = key_path(mat_dir, item.key, ".mat")
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as fh:
            scipy.io.savemat(fh, {"ucm2": ucm2.astype(np.float64)}, do_compression=True)
    if png_dir is None:
        return
    root = Path(png_dir)
    contours = ucm_picture(ucm_image(ucm2))
    _save_png(key_path(root, item.key, "_ucm.png"), contours)
    _save_png(key_path(root, item.key, "_labels.png"), label_colors(item.arrays["labels"]))
    parents, altitudes, leaves = item.arrays["parents"], item.arrays["altitudes"], item.arrays["leaves"]
    levels = overview_levels(config.threshold, config.levels)
    cuts = [cut_labels(parents, altitudes, threshold=t)[leaves] for t in levels]
    panels: list[tuple[str, np.ndarray]] = []
    image = None
    source = str(item.attrs.get("source", ""))
    if source and source_store:  # the contours store names the photo; an edge PNG is no photo
        from ..errors import BadImageError
        from ..io.images import read_image

        try:
            image = read_image(source)
            if image.shape[:2] != contours.shape:
                log.warning("%s: source image %s has another size; overview without it", item.key, source)
                image = None
        except BadImageError as exc:
            log.warning("%s: no image panel in the overview (%s)", item.key, exc)
    if image is not None:
        panels.append(("image", image))
    if edge is not None and edge.shape == contours.shape:
        edge8 = np.clip(np.clip(edge, 0, 1) * 255 + 0.5, 0, 255).astype(np.uint8)  # probability, not stretched
        panels.append(("contour map", np.repeat(edge8[..., None], 3, axis=2)))  # white on black, as the edge PNGs
    else:
        panels.append(("ucm (gamma 0.5)", np.repeat(contours[..., None], 3, axis=2)))
    base = image if image is not None else np.full(contours.shape + (3,), 255, np.uint8)
    for t, labels in zip(levels, cuts):
        panels.append((f"ucm cut at {t:g}: {int(labels.max()) + 1} segments", _overlay(base, labels)))
    titled = [_titled(panel, title) for title, panel in panels]
    gap = np.full((titled[0].shape[0], 4, 3), 255, np.uint8)
    row = [titled[0]]
    for panel in titled[1:]:
        row.extend([gap, panel])
    _save_png(key_path(root, item.key, "_overview.png"), np.concatenate(row, axis=1))
