"""The browsable gallery of a groups store: pages per level, segment crops, photo pages, a thumbnail map.

``gallery/gallery.html`` is the first page of the chosen level; ``level-NN.html`` (then
``level-NN-p2.html``...) every level with at most ``max_groups`` groups, ``groups_per_page`` groups
per page, largest group first. A group's card shows its members nearest the group mean (cosine),
then a few random ones, each a crop around its segment (the segment bright, the rest dimmed,
outlined) linking to its photo's page (the whole photo with all its segments, and its ucm
overview when one is found); its size, photo count and the photos most of it comes from; with
labelled prototypes its class histogram and majority class; the finer groups it is made of and
the coarser group holding it. The first page of each level holds the 2-D map: t-SNE positions of
a sample of segments snapped to a grid, each cell the segment's thumbnail framed in its group's
colour; hover shows the segment, click opens its group, the legend highlights a group.

``gallery/`` is an output folder (:mod:`segsort_unsup.io.outdir`): a manifest of what drew it
and from what, its lock held while drawing, a redraw with other settings removes only what the
last drawing listed (``tiles/`` and ``photos/`` are owned whole), an identical redraw is skipped.
File names come from row and image numbers, never from store keys. Cost: linear in the rows (one pass per level) plus the members and map cells drawn.
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import BadImageError
from ..io.images import read_image
from ..io.store import StoreReader
from ..log import get_logger, progress
from .maps import embed_2d, group_colours, snap_to_grid

log = get_logger("discover.gallery")

TILE = 160  # px, a member's crop
CELL = 28  # px, a map thumbnail
PHOTO_SIDE = 1024  # px, longest side of a photo page's picture
OUTLINE = np.array([255, 214, 0], np.uint8)
OLD_MANIFEST = "gallery.json"  # a gallery drawn before output folders
VERSION = 3  # of the drawing: a new version redraws


@dataclass
class LevelView:
    """What one level's pages show."""

    level: int | str
    item: Any
    order: np.ndarray  # groups shown, largest first
    per_page: int
    members: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # g -> (nearest, random)
    photos: dict[int, tuple[int, np.ndarray, np.ndarray]] = field(default_factory=dict)  # g -> (n photos, imgs, counts)

    @property
    def groups(self) -> int:
        return int(self.item.attrs["groups"])

    def pages(self) -> list[np.ndarray]:
        return [self.order[i:i + self.per_page] for i in range(0, max(len(self.order), 1), self.per_page)]

    def page_of(self, g: int) -> int | None:
        hits = np.flatnonzero(self.order == g)
        return int(hits[0]) // self.per_page if hits.size else None


def page_name(level: int | str, page: int = 0) -> str:
    """File name of page ``page`` (0-based) of ``level``."""
    stem = "requested" if level == "requested" else f"level-{int(level):02d}"
    return f"{stem}.html" if page == 0 else f"{stem}-p{page + 1}.html"


def tile_name(row: int) -> str:
    return f"tiles/r{row:07d}.jpg"


def photo_name(image: int) -> str:
    return f"photos/i{image:06d}.html"


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------
def _outline(mask: np.ndarray) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    return find_boundaries(mask, mode="inner")


def segment_tile(image: np.ndarray, segments: np.ndarray, segment: int, bbox: np.ndarray, *,
                 size: int = TILE) -> np.ndarray:
    """A ``size`` x ``size`` RGB crop around one segment: square, centred on its box with a margin,
    the segment at full brightness, the rest dimmed to 40 %, its outline yellow."""
    h, w = segments.shape
    y0, x0, y1, x1 = (int(v) for v in bbox)
    side = min(max(h, w), int(max(y1 - y0, x1 - x0) * 1.4) + 8)
    top = min(max(0, (y0 + y1 - side) // 2), max(0, h - side))
    left = min(max(0, (x0 + x1 - side) // 2), max(0, w - side))
    crop = image[top:top + side, left:left + side].astype(np.float32)
    mask = segments[top:top + side, left:left + side] == segment
    crop[~mask] = crop[~mask] * 0.4 + 12
    out = crop.clip(0, 255).astype(np.uint8)
    scale = size / max(out.shape[0], out.shape[1])
    new = (max(1, round(out.shape[1] * scale)), max(1, round(out.shape[0] * scale)))
    resized = np.asarray(Image.fromarray(out).resize(new, Image.BILINEAR)).copy()
    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(new, Image.NEAREST)) > 0
    resized[_outline(small)] = OUTLINE
    tile = np.full((size, size, 3), 24, np.uint8)
    oy, ox = (size - resized.shape[0]) // 2, (size - resized.shape[1]) // 2
    tile[oy:oy + resized.shape[0], ox:ox + resized.shape[1]] = resized
    return tile


def missing_tile(size: int = TILE) -> np.ndarray:
    """A grey tile with a cross: the segment's photo could not be read."""
    tile = np.full((size, size, 3), 200, np.uint8)
    idx = np.arange(size)
    tile[idx, idx] = tile[idx, size - 1 - idx] = 120
    return tile


def photo_picture(image: np.ndarray, segments: np.ndarray, *, side: int = PHOTO_SIDE) -> np.ndarray:
    """The photo (longest side at most ``side``) with the outlines of all its segments."""
    h, w = segments.shape
    scale = min(1.0, side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    pic = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR)).copy() if scale < 1 else image.copy()
    segs = np.asarray(Image.fromarray(segments.astype(np.int32)).resize(size, Image.NEAREST)) if scale < 1 else segments
    from skimage.segmentation import find_boundaries

    pic[find_boundaries(segs, mode="inner")] = OUTLINE
    return pic


def _save_jpeg(array: np.ndarray, path: Path, quality: int = 88) -> None:
    Image.fromarray(array).save(path, format="JPEG", quality=quality)


# --------------------------------------------------------------------------------------------
# What is shown
# --------------------------------------------------------------------------------------------
def _level_views(groups: Any, protos: np.ndarray, image: np.ndarray, level: int | str, *, max_groups: int,
                 per_page: int, representatives: int, random_members: int, seed: int) -> list[LevelView]:
    """The levels drawn (at most ``max_groups`` groups, or the chosen one) and their members."""
    candidates: list[tuple[int | str, Any]] = list(enumerate(groups.levels))
    if groups.requested is not None:
        candidates.append(("requested", groups.requested))
    views = []
    for lv, item in candidates:
        if item.attrs["groups"] > max_groups and lv != level:
            continue
        sizes = item.arrays["sizes"]
        order = np.lexsort((np.arange(sizes.size), -sizes))[:max_groups]
        view = LevelView(lv, item, order, per_page)
        _fill_members(view, protos, image, representatives, random_members, seed)
        views.append(view)
    return views


def _fill_members(view: LevelView, protos: np.ndarray, image: np.ndarray, reps: int, rand: int, seed: int) -> None:
    """Each shown group's nearest and random members and its photo counts (one sort of the level)."""
    partition = view.item.arrays["partition"]
    means = view.item.arrays["means"]
    rows_sorted = np.argsort(partition, kind="stable")
    bounds = np.searchsorted(partition[rows_sorted], np.arange(view.groups + 1))
    salt = 100_000 if view.level == "requested" else int(view.level)
    for g in (int(x) for x in view.order):
        rows = rows_sorted[bounds[g]:bounds[g + 1]]
        mean = means[g] / max(float(np.linalg.norm(means[g])), 1e-12)
        p = protos[rows]
        sims = (p @ mean) / np.maximum(np.linalg.norm(p, axis=1), 1e-12)
        ranked = rows[np.lexsort((rows, -sims))]  # most similar first, ties by row
        rest = ranked[reps:]
        rng = np.random.default_rng([seed, salt, g])
        picked = np.sort(rng.choice(rest, size=min(rand, rest.size), replace=False)) if rest.size else rest
        view.members[g] = (ranked[:reps], picked)
        imgs, counts = np.unique(image[rows], return_counts=True)
        top = np.lexsort((imgs, -counts))[:5]
        view.photos[g] = (int(imgs.size), imgs[top], counts[top])


@dataclass
class MapView:
    """The thumbnail map: grid size and, per kept point, its row and cell."""

    cols: int
    rows: int
    row: np.ndarray
    cell: np.ndarray
    method: str
    sampled: int
    total: int


def _map_view(protos: np.ndarray, *, method: str, points: int, seed: int) -> MapView:
    n = protos.shape[0]
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=points, replace=False)) if n > points else np.arange(n)
    xy, used = embed_2d(protos[rows], method=method, seed=seed)
    side = int(np.clip(np.ceil(np.sqrt(rows.size)), 2, 40))
    kept, cell = snap_to_grid(xy, side, side)
    return MapView(side, side, rows[kept], cell, used, int(rows.size), n)


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------
def _retire_pre_manifest_gallery(folder: Path) -> None:
    """Delete a gallery drawn before galleries were output folders (its ``gallery.json``, pages,
    montages and map); anything else in the folder is left for the output folder to refuse."""
    from ..io.outdir import read_output_manifest

    if not (folder / OLD_MANIFEST).is_file() or read_output_manifest(folder) is not None:
        return
    for path in folder.glob("*.html"):
        path.unlink()
    (folder / "map.png").unlink(missing_ok=True)
    shutil.rmtree(folder / "montages", ignore_errors=True)
    (folder / OLD_MANIFEST).unlink()


def write_gallery(groups: Any, prototypes: str | os.PathLike, folder: str | os.PathLike, *, level: int | str,
                  identity: str, representatives: int = 5, random_members: int = 2, max_groups: int = 200,
                  groups_per_page: int = 30, seed: int = 0, map_method: str = "auto", map_points: int = 1000,
                  overview_dir: str | os.PathLike | None = None) -> Path:
    """Draw the gallery of ``groups`` (:class:`~segsort_unsup.discover.stage.Groups`) into ``folder``.

    ``folder`` is an output folder (:class:`~segsort_unsup.io.outdir.OutputFolder`, kind
    ``gallery``): its manifest records what was drawn from what (``identity``, the groups' content,
    and the settings), so the same drawing is kept, another replaces only the files it listed.
    ``overview_dir`` holds the ucm ``<key>_overview.png`` pictures to link (if any). Returns the
    path of ``gallery.html`` (written last: present and listed means the drawing is whole).
    """
    from ..io.outdir import OutputFolder

    folder = Path(folder)
    overview_dir = Path(overview_dir).resolve() if overview_dir and Path(overview_dir).is_dir() else None
    record = {"version": VERSION, "groups": identity, "level": level, "representatives": representatives,
              "random_members": random_members, "max_groups": max_groups, "groups_per_page": groups_per_page,
              "seed": seed, "map_method": map_method, "map_points": map_points,
              "overviews": str(overview_dir) if overview_dir else ""}
    _retire_pre_manifest_gallery(folder)
    with OutputFolder(folder, kind="gallery", identity=record, overwrite="changed",
                      meta={"groups": str(groups.root), "prototypes": str(Path(prototypes).resolve())}) as out:
        if out.resumed and out.is_complete(folder / "gallery.html"):
            log.info("discover: gallery in %s is up to date", folder)
            return folder / "gallery.html"
        _draw_into(out, groups, prototypes, level=level, representatives=representatives,
                   random_members=random_members, max_groups=max_groups, groups_per_page=groups_per_page, seed=seed,
                   map_method=map_method, map_points=map_points, overview_dir=overview_dir)
    return folder / "gallery.html"


def _draw_into(out: Any, groups: Any, prototypes: str | os.PathLike, *, level: int | str, representatives: int,
               random_members: int, max_groups: int, groups_per_page: int, seed: int, map_method: str,
               map_points: int, overview_dir: Path | None) -> None:
    from .pages import Context, level_page, photo_page

    out.own_tree("tiles")
    out.own_tree("photos")
    keys = groups.image_keys
    image = groups.rows.arrays["image"]
    segment = groups.rows.arrays["segment"]
    with StoreReader(prototypes, kind="prototypes") as reader:
        stacked, failed = reader.stack("prototypes", keys=keys)
        if failed:
            raise BadImageError(failed[0][0], f"cannot read its prototypes for the gallery: {failed[0][1]}")
        protos = stacked.array[stacked.offsets[image] + segment]
        views = _level_views(groups, protos, image, level, max_groups=max_groups, per_page=groups_per_page,
                             representatives=representatives, random_members=random_members, seed=seed)
        chosen = next(v for v in views if v.level == level)
        the_map = None if map_method == "none" else _map_view(protos, method=map_method, points=map_points, seed=seed)
        wanted: dict[int, set[int]] = defaultdict(set)
        for view in views:
            for top, rand in view.members.values():
                for row in np.concatenate([top, rand]):
                    wanted[int(image[row])].add(int(row))
        if the_map is not None:
            for row in the_map.row:
                wanted[int(image[row])].add(int(row))
        thumbs = _draw_photos(reader, keys, image, segment, wanted, out.path, overview_dir, out.path / "photos")
        meta = dict(reader.meta)
    if the_map is not None:
        sprite = np.full((the_map.rows * CELL, the_map.cols * CELL, 3), 245, np.uint8)
        for row, cell in zip(the_map.row, the_map.cell):
            y, x = divmod(int(cell), the_map.cols)
            sprite[y * CELL:(y + 1) * CELL, x * CELL:(x + 1) * CELL] = thumbs[int(row)]
        with out.writing(out.path_for("map.jpg")) as tmp:
            _save_jpeg(sprite, Path(tmp), quality=90)

    ctx = Context(groups=groups, views=views, chosen=chosen, keys=keys, image=image, segment=segment,
                  the_map=the_map, meta=meta, colours=group_colours(max(len(v.order) for v in views)),
                  prototypes=str(Path(prototypes).resolve()))
    for img, info in thumbs.photo_info.items():
        (out.path / photo_name(img)).write_text(photo_page(ctx, img, *info), encoding="utf-8")
    first = ""
    for view in views:
        for number, on_page in enumerate(view.pages()):
            text = level_page(ctx, view, number, on_page)
            out.write_text(out.path_for(page_name(view.level, number)), text)
            if view is chosen and number == 0:
                first = text
    out.write_text(out.path_for("gallery.html"), first)


class _Thumbs(dict):
    """row -> map thumbnail (CELL x CELL), plus per drawn image its photo page's facts."""

    photo_info: dict[int, tuple[str, str | None, tuple[int, int], np.ndarray]]


def _draw_photos(reader: StoreReader, keys: list[str], image: np.ndarray, segment: np.ndarray,
                 wanted: dict[int, set[int]], stage: Path, overview_dir: Path | None, photos_dir: Path) -> _Thumbs:
    """Tiles of every wanted row and the picture of every photo they come from (one read each)."""
    thumbs = _Thumbs()
    thumbs.photo_info = {}
    missing = 0
    for img in progress(sorted(wanted), desc="gallery photos", unit="img"):
        key = keys[img]
        item = reader.read(key, ("segments", "bbox"))
        source = str(item.attrs.get("source", ""))
        segs, bbox = item.arrays["segments"], item.arrays["bbox"]
        rgb = _read_source(source, segs.shape)
        photo = None
        if rgb is not None:
            photo = f"i{img:06d}.jpg"
            _save_jpeg(photo_picture(rgb, segs), stage / "photos" / photo)
        overview = overview_dir / f"{key}_overview.png" if overview_dir else None
        link = os.path.relpath(overview, photos_dir.absolute()) if overview and overview.is_file() else None
        thumbs.photo_info[img] = (photo or "", link, segs.shape, bbox)
        for row in sorted(wanted[img]):
            if rgb is None:
                missing += 1
                tile = missing_tile()
            else:
                s = int(segment[row])
                tile = segment_tile(rgb, segs, s, bbox[s])
            _save_jpeg(tile, stage / tile_name(row))
            thumbs[row] = np.asarray(Image.fromarray(tile).resize((CELL, CELL), Image.BILINEAR))
    if missing:
        log.warning("discover: %d segment(s) drawn as missing (image not readable through its 'source')", missing)
    return thumbs


def _read_source(source: str, shape: tuple[int, ...]) -> np.ndarray | None:
    if not source:
        return None
    try:
        rgb = read_image(source)
    except BadImageError as exc:
        log.warning("discover: %s", exc)
        return None
    if rgb.shape[:2] != tuple(shape):
        log.warning("discover: %s: image is %s but its segments are %s; shown as missing", source, rgb.shape[:2],
                    tuple(shape))
        return None
    return rgb
