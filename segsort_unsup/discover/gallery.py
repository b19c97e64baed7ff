"""The browsable gallery of a groups store: one HTML page per level, PNG montages, a 2-D map.

``gallery/gallery.html`` shows the chosen level; ``level-NN.html`` every level with at most
``max_groups`` groups. Each group's card has a montage: its members nearest the group mean
(cosine), then a few random members, each cut out of its image (read through the prototypes
store's ``source`` attr) with the rest dimmed and its outline drawn; its size and, when
labelled, its majority class; the finer groups it is made of (level l-1) and the coarser group
holding it (level l+1), as links. ``map.png`` is the 2-D map. Every file is written atomically;
``gallery.json`` (written last) records what was drawn, so an identical redraw is skipped.
"""

from __future__ import annotations

import html
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import BadImageError
from ..io.atomic import atomic_path, atomic_write_text
from ..io.images import read_image
from ..io.store import StoreReader
from ..log import get_logger, progress
from .maps import draw_map, embed_2d

log = get_logger("discover.gallery")

TILE = 96
GAP = 3
OUTLINE = np.array([255, 48, 48], np.uint8)
MANIFEST = "gallery.json"

_STYLE = """
body{font-family:sans-serif;margin:16px;background:#fafafa;color:#222}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
.card{background:#fff;border:1px solid #ddd;border-radius:4px;margin:10px 0;padding:8px}
.card h3{margin:0 0 6px 0;font-size:15px}.links{font-size:13px;color:#444;margin-top:4px}
img.montage{display:block;image-rendering:auto}.cur{font-weight:bold;background:#eef}
"""
# Marks every <img> once the page has loaded: data-loaded="1" if it decoded, "0" if not;
# body[data-images] = "ok" or the number of broken images (read by a headless browser check).
_CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var broken = 0, imgs = document.images;
  for (var i = 0; i < imgs.length; i++) {
    var ok = imgs[i].complete && imgs[i].naturalWidth > 0;
    imgs[i].setAttribute('data-loaded', ok ? '1' : '0');
    if (!ok) broken++;
  }
  document.body.setAttribute('data-images', broken ? String(broken) : 'ok');
});
"""


def page_name(level: int | str) -> str:
    return "requested.html" if level == "requested" else f"level-{int(level):02d}.html"


def segment_tile(image: np.ndarray, segments: np.ndarray, segment: int, bbox: np.ndarray, *, size: int = TILE) -> np.ndarray:
    """A ``size`` x ``size`` RGB cut-out of one segment: its bbox plus a margin, the rest dimmed, its outline red."""
    from skimage.segmentation import find_boundaries

    h, w = segments.shape
    y0, x0, y1, x1 = (int(v) for v in bbox)
    margin = max(2, (max(y1 - y0, x1 - x0)) // 8)
    y0, x0, y1, x1 = max(0, y0 - margin), max(0, x0 - margin), min(h, y1 + margin), min(w, x1 + margin)
    crop = image[y0:y1, x0:x1].astype(np.float32)
    mask = segments[y0:y1, x0:x1] == segment
    crop[~mask] = crop[~mask] * 0.35 + 255 * 0.2
    out = crop.clip(0, 255).astype(np.uint8)
    scale = size / max(out.shape[0], out.shape[1])
    new = (max(1, round(out.shape[1] * scale)), max(1, round(out.shape[0] * scale)))
    resized = np.asarray(Image.fromarray(out).resize(new, Image.BILINEAR))
    small_mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(new, Image.NEAREST)) > 0
    resized = resized.copy()
    resized[find_boundaries(small_mask, mode="inner")] = OUTLINE
    tile = np.full((size, size, 3), 255, np.uint8)
    oy, ox = (size - resized.shape[0]) // 2, (size - resized.shape[1]) // 2
    tile[oy:oy + resized.shape[0], ox:ox + resized.shape[1]] = resized
    return tile


def _missing_tile(size: int = TILE) -> np.ndarray:
    tile = np.full((size, size, 3), 200, np.uint8)
    idx = np.arange(size)
    tile[idx, idx] = tile[idx, size - 1 - idx] = 120
    return tile


def montage(tiles: list[np.ndarray], *, split: int | None = None) -> np.ndarray:
    """Tiles side by side; a wider gap (grey bar) after the first ``split`` (representatives | random)."""
    widths = [t.shape[1] for t in tiles]
    extra = 3 * GAP if split is not None and 0 < split < len(tiles) else 0
    out = np.full((TILE, sum(widths) + GAP * (len(tiles) - 1) + extra, 3), 255, np.uint8)
    x = 0
    for i, tile in enumerate(tiles):
        out[:, x:x + tile.shape[1]] = tile
        x += tile.shape[1] + GAP
        if extra and i + 1 == split:
            out[:, x:x + 2 * GAP] = 160
            x += extra
    return out


def _members(partition: np.ndarray, protos: np.ndarray, means: np.ndarray, g: int, reps: int, rand: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    rows = np.flatnonzero(partition == g)
    mean = means[g] / max(float(np.linalg.norm(means[g])), 1e-12)
    p = protos[rows]
    sims = (p @ mean) / np.maximum(np.linalg.norm(p, axis=1), 1e-12)
    order = rows[np.lexsort((rows, -sims))]  # most similar first, ties by row
    top = order[:reps]
    rest = order[reps:]
    random = np.sort(rng.choice(rest, size=min(rand, rest.size), replace=False)) if rest.size else rest
    return top, random


def write_gallery(groups: Any, prototypes: str | os.PathLike, folder: str | os.PathLike, *, level: int | str,
                  representatives: int = 6, random_members: int = 4, max_groups: int = 200, seed: int = 0,
                  map_method: str = "auto", map_points: int = 5000) -> Path:
    """Draw the gallery of ``groups`` (:class:`~segsort_unsup.discover.stage.Groups`) into ``folder``.

    Returns the path of ``gallery.html``. Skipped when ``gallery.json`` records the same drawing.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with StoreReader(groups.root, kind="groups") as r:
        groups_hash = r.config_hash
    record = {"groups": groups_hash, "level": level, "representatives": representatives,
              "random_members": random_members, "max_groups": max_groups, "seed": seed, "map_method": map_method,
              "map_points": map_points, "shard": sorted(p.name for p in Path(groups.root).glob("part-*.h5"))}
    manifest = folder / MANIFEST
    if manifest.is_file() and (folder / "gallery.html").is_file():
        try:
            if json.loads(manifest.read_text(encoding="utf-8")) == record:
                log.info("discover: gallery in %s is up to date", folder)
                return folder / "gallery.html"
        except ValueError:
            pass
    manifest.unlink(missing_ok=True)  # a redraw killed midway is redone next time

    keys = groups.image_keys
    image = groups.rows.arrays["image"]
    segment = groups.rows.arrays["segment"]
    label = groups.rows.arrays.get("label")
    (montage_dir := folder / "montages").mkdir(exist_ok=True)

    with StoreReader(prototypes, kind="prototypes") as reader:
        stacked, failed = reader.stack("prototypes", keys=keys)
        if failed:
            raise BadImageError(failed[0][0], f"cannot read its prototypes for the gallery: {failed[0][1]}")
        protos = stacked.array[stacked.offsets[image] + segment]

        levels: list[tuple[int | str, Any]] = [(i, item) for i, item in enumerate(groups.levels)
                                               if item.attrs["groups"] <= max_groups or i == level]
        if groups.requested is not None and (level == "requested" or groups.requested.attrs["groups"] <= max_groups):
            levels.append(("requested", groups.requested))
        # What each shown group shows: (level, group) -> (representatives, random); rows to cut out.
        shown: dict[tuple[Any, int], tuple[np.ndarray, np.ndarray]] = {}
        for lv, item in levels:
            sizes = item.arrays["sizes"]
            order = np.lexsort((np.arange(sizes.size), -sizes))[:max_groups]
            for g in order:
                rng = np.random.default_rng([seed, 100_000 if lv == "requested" else int(lv), int(g)])
                shown[(lv, int(g))] = _members(item.arrays["partition"], protos, item.arrays["means"], int(g),
                                               representatives, random_members, rng)
        wanted: dict[int, set[int]] = defaultdict(set)
        for top, rand in shown.values():
            for row in np.concatenate([top, rand]):
                wanted[int(image[row])].add(int(row))
        tiles: dict[int, np.ndarray] = {}
        missing = 0
        for img in progress(sorted(wanted), desc="gallery tiles", unit="img"):
            item = reader.read(keys[img], ("segments", "bbox"))
            source = str(item.attrs.get("source", ""))
            try:
                rgb = read_image(source) if source else None
            except BadImageError as exc:
                log.warning("discover: %s", exc)
                rgb = None
            segs, bbox = item.arrays["segments"], item.arrays["bbox"]
            if rgb is not None and rgb.shape[:2] != segs.shape:
                log.warning("discover: %s: image is %s but its segments are %s; shown as missing", source,
                            rgb.shape[:2], segs.shape)
                rgb = None
            for row in wanted[img]:
                if rgb is None:
                    missing += 1
                    tiles[row] = _missing_tile()
                else:
                    s = int(segment[row])
                    tiles[row] = segment_tile(rgb, segs, s, bbox[s])
    if missing:
        log.warning("discover: %d segment(s) drawn as missing (image not readable through its 'source')", missing)

    for (lv, g), (top, rand) in progress(list(shown.items()), desc="gallery montages", unit="group"):
        pic = montage([tiles[int(r)] for r in np.concatenate([top, rand])], split=len(top))
        with atomic_path(montage_dir / f"{_stem(lv)}-g{g:04d}.png") as tmp:
            Image.fromarray(pic).save(tmp, format="PNG")

    map_note = ""
    if map_method != "none":
        chosen = groups.level(level)
        rng = np.random.default_rng(seed)
        n = protos.shape[0]
        rows = np.sort(rng.choice(n, size=map_points, replace=False)) if n > map_points else np.arange(n)
        xy, used = embed_2d(protos[rows], method=map_method, seed=seed)
        draw_map(xy, chosen.arrays["partition"][rows], folder / "map.png",
                 labels=None if label is None else label[rows], title=f"{used}, {_title(level)}")
        map_note = f"{used} of {rows.size} of {n} prototypes"

    page_levels = [lv for lv, _ in levels]
    for lv, item in levels:
        text = _page(groups, lv, item, page_levels, shown, level, map_note)
        atomic_write_text(folder / page_name(lv), text)
        if lv == level:
            atomic_write_text(folder / "gallery.html", text)
    atomic_write_text(manifest, json.dumps(record, indent=1, default=str))
    return folder / "gallery.html"


def _stem(level: int | str) -> str:
    return "requested" if level == "requested" else f"level-{int(level):02d}"


def _title(level: int | str) -> str:
    return "requested partition" if level == "requested" else f"level {level}"


def _page(groups: Any, lv: int | str, item: Any, page_levels: list, shown: dict, chosen: int | str,
          map_note: str) -> str:
    esc = html.escape
    k = int(item.attrs["groups"])
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
           f"<title>segsort-unsup groups: {esc(_title(lv))}</title><style>{_STYLE}</style>",
           f"<script>{_CHECK_SCRIPT}</script></head><body>",
           f"<h1>Visual groups: {esc(_title(lv))} ({k} groups of {groups.rows.attrs['rows']} segments)</h1>",
           "<table><tr><th>level</th><th>groups</th><th>purity</th><th>NMI</th></tr>"]
    all_levels = [(i, it) for i, it in enumerate(groups.levels)]
    if groups.requested is not None:
        all_levels.append(("requested", groups.requested))
    for other, it in all_levels:
        name = esc(_title(other))
        cell = f"<a href='{page_name(other)}'>{name}</a>" if other in page_levels else name
        scores = (f"<td>{it.attrs['purity']:.3f}</td><td>{it.attrs['nmi']:.3f}</td>" if "purity" in it.attrs
                  else "<td>-</td><td>-</td>")
        cls = " class='cur'" if other == lv else ""
        out.append(f"<tr{cls}><td style='text-align:left'>{cell}</td><td>{it.attrs['groups']}</td>{scores}</tr>")
    out.append("</table>")
    if map_note and lv == chosen:
        out.append(f"<h2>2-D map ({esc(map_note)}), coloured by group of {esc(_title(chosen))}</h2>"
                   "<img class='map' src='map.png' alt='2-D map' style='max-width:100%'>")
    out.append("<p>Each row: the members nearest the group mean, then (after the grey bar) random members. "
               "Red: the segment's outline.</p>")
    sizes = item.arrays["sizes"]
    counts = item.arrays.get("class_counts")
    finer = None
    if isinstance(lv, int) and lv > 0:
        below = groups.levels[lv - 1]
        finer = below.arrays["parent"], below.arrays["sizes"]
    for g in np.lexsort((np.arange(sizes.size), -sizes)):
        g = int(g)
        if (lv, g) not in shown:
            continue
        head = f"Group {g} · {int(sizes[g])} segments"
        if counts is not None and counts[g].sum():
            c = int(counts[g].argmax())
            head += f" · class {c} ({counts[g, c] / counts[g].sum():.0%})"
        links = []
        if finer is not None:
            parent, fsizes = finer
            kids = np.flatnonzero(parent == g)
            target = page_name(lv - 1) if (lv - 1) in page_levels else None
            parts = [(f"<a href='{target}#g{c}'>{c}</a>" if target else str(c)) + f" ({int(fsizes[c])})" for c in kids]
            links.append(f"made of {len(kids)} group(s) of level {lv - 1}: " + ", ".join(parts))
        if isinstance(lv, int) and "parent" in item.arrays and item.arrays["parent"][g] >= 0:
            p = int(item.arrays["parent"][g])
            target = page_name(lv + 1) if (lv + 1) in page_levels else None
            links.append(f"part of group " + (f"<a href='{target}#g{p}'>{p}</a>" if target else str(p)) +
                         f" of level {lv + 1}")
        out.append(f"<div class='card' id='g{g}'><h3>{esc(head)}</h3>"
                   f"<img class='montage' src='montages/{_stem(lv)}-g{g:04d}.png' alt='group {g}'>"
                   f"<div class='links'>{'<br>'.join(links)}</div></div>")
    hidden = k - sum(1 for (l2, _g) in shown if l2 == lv)
    if hidden > 0:
        out.append(f"<p>{hidden} smaller groups not shown (max_groups).</p>")
    out.append("</body></html>")
    return "\n".join(out)
