"""Segment retrieval pictures (the paper's figures 5 and 7).

For each chosen query segment: its image with the segment cut out (the rest dimmed, the outline
drawn), framed, next to its ``top`` nearest labelled segments (cosine, exact faiss search), each
cut out of its own image, with the class name (when the labelled store has labels) and the
cosine similarity under each. One PNG per query and an ``index.html`` page listing them.

Queries are ``(key, segment)`` pairs, or a seeded random sample of first-view segments of at
least ``min_area`` pixels. When the two stores are the same, segments of the query's own image
are not retrieved. A region with a prototype in each of several views (the same pixels) is shown
once, with its nearest view's cosine.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import numpy as np

from ..errors import BadImageError, InputError
from ..log import get_logger, progress

log = get_logger("retrieve")

TILE = 160  # tile height in pixels
FRAME = (220, 40, 40)  # RGB of the query's frame
OUTLINE = (255, 220, 0)


@dataclass(frozen=True)
class Query:
    key: str
    segment: int


def parse_query(text: str) -> Query:
    """``KEY:SEGMENT`` -> :class:`Query` (the key may itself hold colons)."""
    key, sep, seg = text.rpartition(":")
    if not sep or not key or not seg.strip().lstrip("-").isdigit():
        raise InputError(f"--query {text!r}: expected KEY:SEGMENT, e.g. 0001TP_008550:12")
    return Query(key, int(seg))


def read_class_names(path: str | os.PathLike) -> list[str]:
    """One name per line; a leading integer id (``0 Sky``) is dropped."""
    names = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        first, _, rest = line.partition(" ")
        names.append(rest.strip() if first.isdigit() and rest.strip() else line)
    if not names:
        raise InputError(f"{path}: no class names (one per line, e.g. '0 Sky')")
    return names


def _widen(lo: int, hi: int, need: int, limit: int) -> tuple[int, int]:
    """``[lo, hi)`` grown about its centre to at least ``need`` (within ``0..limit``)."""
    need = min(need, limit)
    if hi - lo >= need:
        return lo, hi
    lo = max(0, min(limit - need, (lo + hi - need) // 2))
    return lo, lo + need


def cutout(rgb: np.ndarray, mask: np.ndarray, *, height: int = TILE, context: float = 0.3,
           dim: float = 0.3, min_side: float = 0.15, min_aspect: float = 0.8, max_aspect: float = 3.0) -> np.ndarray:
    """The segment ``mask`` of ``rgb``: other pixels dimmed, outline drawn, cropped to its box
    (plus ``context`` of its size on each side; at least ``min_side`` of the image's shorter side,
    and at least ``min_aspect`` times as wide as tall, so that a small or thin segment is shown
    in its surroundings and its caption fits) and resized to ``height`` rows, its aspect kept. A
    crop wider than ``max_aspect`` times ``height`` is shrunk to that width and centred on white
    rows, so that a wide strip keeps its shape and the row of tiles stays readable."""
    import cv2

    ys, xs = np.nonzero(mask)
    if not len(ys):
        raise InputError("empty segment")
    h, w = mask.shape
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    my, mx = int((y1 - y0) * context) + 4, int((x1 - x0) * context) + 4
    y0, y1, x0, x1 = max(0, y0 - my), min(h, y1 + my), max(0, x0 - mx), min(w, x1 + mx)
    side = int(round(min_side * min(h, w)))
    y0, y1 = _widen(y0, y1, side, h)
    x0, x1 = _widen(x0, x1, max(side, int(round(min_aspect * (y1 - y0)))), w)
    out = rgb.astype(np.float32)
    out[~mask] = out[~mask] * dim + 255 * (1 - dim) * 0.35
    out = np.clip(out, 0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, OUTLINE, thickness=max(1, round(min(h, w) / 200)))
    crop = out[y0:y1, x0:x1]
    scale = min(height / crop.shape[0], max_aspect * height / crop.shape[1])
    size = (max(8, int(round(crop.shape[1] * scale))), max(1, min(height, int(round(crop.shape[0] * scale)))))
    tile = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    above = (height - tile.shape[0]) // 2
    return cv2.copyMakeBorder(tile, above, height - tile.shape[0] - above, 0, 0, cv2.BORDER_CONSTANT,
                              value=(255, 255, 255))


def _caption(tile: np.ndarray, lines: list[str]) -> np.ndarray:
    import cv2

    pad = np.full((16 * len(lines) + 4, tile.shape[1], 3), 255, np.uint8)
    for i, text in enumerate(lines):
        cv2.putText(pad, text[: max(4, tile.shape[1] // 7)], (2, 14 + 16 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([tile, pad], axis=0)


def _row(tiles: list[np.ndarray], gap: int = 6) -> np.ndarray:
    height = max(t.shape[0] for t in tiles)
    parts = []
    for i, t in enumerate(tiles):
        if t.shape[0] < height:
            t = np.concatenate([t, np.full((height - t.shape[0],) + t.shape[1:], 255, np.uint8)])
        parts.append(t)
        if i < len(tiles) - 1:
            parts.append(np.full((height, gap if i else 3 * gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


class _Neighbours:
    """The labelled store's prototypes indexed, and the pictures of a query's nearest segments."""

    def __init__(self, lab, qry, *, same: bool, top: int, class_names: list[str] | None,
                 geometry: float | None = None):
        from .stage import build_index, joined_prototypes

        self.lab, self.qry, self.same, self.top, self.class_names = lab, qry, same, top, class_names
        self.geometry = geometry
        self.views = max(1, int(lab.read(lab.keys()[0], ("area",)).attrs.get("views") or 1))
        self.protos, failed = lab.stack("prototypes")
        if failed:
            raise InputError(f"{lab.root}: item {failed[0][0]} cannot be read ({failed[0][1]})")
        has_labels = "label" in lab.read(lab.keys()[0]).arrays
        self.classes = lab.stack("label")[0].array if has_labels else None
        self.owner = np.repeat(np.arange(len(self.protos.keys)), np.diff(self.protos.offsets))
        self.index = build_index(joined_prototypes(lab, self.protos.keys, self.protos.array, geometry))
        self.images: dict[str, np.ndarray] = {}

    def image_of(self, reader, key: str) -> np.ndarray:
        from ..io.images import read_image

        cache_key = f"{reader.root}::{key}"
        if cache_key not in self.images:
            source = reader.read(key, ("area",)).attrs.get("source")
            if not source or not Path(source).is_file():
                raise BadImageError(str(source), f"the image of {key} is gone; retrieval pictures need it")
            self.images[cache_key] = read_image(source)
        return self.images[cache_key]

    def name_of(self, c: int) -> str:
        names = self.class_names
        return names[c] if names and 0 <= c < len(names) else f"class {c}"

    def candidates(self, q: Query, vec: np.ndarray) -> Iterator[tuple[float, int]]:
        """(cosine, row) of the nearest labelled prototypes, nearest first, none of the query's own
        image: enough for ``top`` distinct regions when each region has a prototype in every view."""
        sims, nn = self.index.search(np.ascontiguousarray(vec[None], np.float32),
                                     min(self.index.ntotal, self.top * self.views + 64))
        for s, j in zip(sims[0], nn[0]):
            if j >= 0 and not (self.same and self.protos.keys[self.owner[j]] == q.key):
                yield float(s), int(j)

    def neighbour_mask(self, j: int) -> tuple[str, int, np.ndarray | None]:
        """Image key, segment id and pixel mask (None: no pixels) of labelled prototype row ``j``."""
        key = self.protos.keys[self.owner[j]]
        seg = j - int(self.protos.offsets[self.owner[j]])
        arrays = self.lab.read(key, ("segments", "views") if self.views > 1 else ("segments",)).arrays
        views = arrays.get("views", arrays["segments"][None])
        return key, seg, next((v == seg for v in views if (v == seg).any()), None)

    def picture(self, q: Query) -> tuple[np.ndarray, list[tuple[str, int, list[str]]]]:
        """The query's framed cutout next to the cutouts of its ``top`` nearest labelled regions, and
        their captions. A region with a prototype in several views (the same pixels) is shown once,
        with its nearest view's cosine."""
        from .stage import query_prototypes

        item = self.qry.read(q.key)
        seg_map = item.arrays.get("views", item.arrays["segments"][None])
        view = next((v for v in seg_map if (v == q.segment).any()), None)
        if view is None:
            raise InputError(f"--query {q.key}:{q.segment}: segment has no pixels")
        qlabel = item.arrays["label"][q.segment] if "label" in item.arrays else None
        tiles = [_caption(_frame(cutout(self.image_of(self.qry, q.key), view == q.segment)),
                          [f"query {q.key}", f"segment {q.segment}"]
                          + ([self.name_of(int(qlabel))] if qlabel is not None else []))]
        captions: list[tuple[str, int, list[str]]] = []
        shown: set[tuple[str, bytes]] = set()
        for s, j in self.candidates(q, query_prototypes(item, self.geometry)[q.segment]):
            key, seg, mask = self.neighbour_mask(j)
            region = (key, np.packbits(mask).tobytes()) if mask is not None else None
            if region is None or region in shown:
                continue
            shown.add(region)
            text = [f"{s:.3f}"] + ([self.name_of(int(self.classes[j]))] if self.classes is not None else [])
            captions.append((key, seg, text))
            tiles.append(_caption(cutout(self.image_of(self.lab, key), mask), text))
            if len(captions) == self.top:
                break
        return _row(tiles), captions


def _sample_queries(qry, *, n: int, seed: int, min_area: int, where: str) -> list[Query]:
    """A seeded random sample of ``n`` first-view segments of at least ``min_area`` pixels."""
    rng = np.random.default_rng(seed)
    pool = []
    for key in qry.keys():
        item = qry.read(key, ("area", "segments"))
        k0 = int(item.arrays["segments"].max()) + 1
        pool += [Query(key, s) for s in np.flatnonzero(item.arrays["area"][:k0] >= min_area)]
    if not pool:
        raise InputError(f"{where}: no segment of at least {min_area} pixels (lower --min-area)")
    return [pool[i] for i in sorted(rng.choice(len(pool), size=min(n, len(pool)), replace=False))]


def _check_queries(qry, queries: list[Query], where: str) -> None:
    """Every query names an image of the store, one of its segments, and a key fit for a file name."""
    from ..io.outdir import safe_relative_name

    for q in queries:
        if q.key not in qry:
            raise InputError(f"--query {q.key}:{q.segment}: no image {q.key!r} in {where}")
        k = len(qry.read(q.key, ("prototypes",)).arrays["prototypes"])
        if not 0 <= q.segment < k:
            raise InputError(f"--query {q.key}:{q.segment}: the image has segments 0..{k - 1}")
        safe_relative_name(q.key)


def run_retrieve(labelled: str | os.PathLike, query: str | os.PathLike, output: str | os.PathLike, *,
                 queries: list[Query] | None = None, n: int = 4, seed: int = 0, top: int = 6,
                 min_area: int = 2000, class_names: list[str] | None = None, geometry: float | None = None,
                 overwrite: bool = False) -> list[Path]:
    """Write one retrieval picture per query segment and ``index.html``; returns the PNG paths.

    ``output`` is an :class:`~segsort_unsup.io.outdir.OutputFolder` (kind ``retrieval``): another
    identity (stores, queries, settings) is refused unless ``overwrite``, which removes only the
    files a previous run listed. Pictures are named ``<key>-<segment>.png`` (``/`` in keys are
    subfolders); a key that cannot be a file name is refused with one line before any picture.
    ``geometry`` > 0 searches the prototypes joined to their regions' geometry, as ``transfer
    --geometry`` votes (:mod:`~segsort_unsup.transfer.geometry`); the captions then show the joined cosine.
    """
    import cv2

    from ..io.outdir import OutputFolder
    from ..embed.stage import units_of
    from .stage import open_prototypes

    lab = open_prototypes(labelled, "labelled")
    qry = open_prototypes(query, "query")
    try:
        same = Path(labelled).resolve() == Path(query).resolve()
        neighbours = _Neighbours(lab, qry, same=same, top=top, class_names=class_names, geometry=geometry)
        queries = queries or _sample_queries(qry, n=n, seed=seed, min_area=min_area, where=str(query))
        _check_queries(qry, queries, str(query))
        identity = {"labelled": lab.config_hash, "query": qry.config_hash, "same": same, "top": top,
                    "queries": [f"{q.key}:{q.segment}" for q in queries], "class_names": class_names or [],
                    **({"geometry": geometry} if geometry else {})}  # off: the identity of older folders
        written, rows_html = [], []
        with OutputFolder(output, kind="retrieval", identity=identity, overwrite=overwrite,
                          meta={"labelled": str(labelled), "query": str(query)}) as folder:
            for q in progress(queries, desc="retrieve", unit="query"):
                target = folder.file_for(q.key, f"-{q.segment}.png")
                picture, captions = neighbours.picture(q)
                ok, data = cv2.imencode(".png", picture[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9])
                if not ok:
                    raise OSError(f"cannot encode {target}")
                folder.write_bytes(target, data.tobytes())
                written.append(target)
                rows_html.append(_query_card(q, target.relative_to(folder.path).as_posix(), captions))
            page = index_page(rows_html, labelled=str(labelled), query=str(query),
                              has_labels=neighbours.classes is not None,
                              units=(units_of(lab), units_of(qry)), geometry=geometry)
            folder.write_text(folder.path_for("index.html"), page)
    finally:
        lab.close()
        qry.close()
    return written


def _query_card(q: Query, picture: str, captions: list[tuple[str, int, list[str]]]) -> str:
    nearest = "; ".join(f"{k}:{s} ({', '.join(t)})" for k, s, t in captions)
    return (f"<div class='card'><h3>{html.escape(q.key)} <span class='n'>· segment {q.segment}</span></h3>"
            f"<p class='facts'>nearest: {html.escape(nearest)}</p>"
            f"<img class='wide' src='{html.escape(quote(picture))}' alt='query and nearest segments'></div>")


def index_page(cards: list[str], *, labelled: str, query: str, has_labels: bool,
               units: tuple[str, str] = ("?", "?"), geometry: float | None = None) -> str:
    """``index.html``: one card per query, in the gallery's style; pictures shrink to the window."""
    from ..discover.pages import STYLE

    what = "Nearest labelled segments" if has_labels else "Nearest segments"
    joined = (f" joined to their regions' box shape, position, fill and size (weight {geometry:g}, as "
              f"<code>transfer --geometry</code>)" if geometry else "")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>segment retrieval</title><style>{STYLE}img.wide{{display:block;max-width:100%;height:auto}}"
            f"</style></head><body><main><h1>{what}</h1>"
            f"<p class='about'>Each row: the query segment (red frame), then its nearest segments by cosine "
            f"similarity of their prototypes{joined}{', with their class' if has_labels else ''} (listed as "
            f"key:segment (cosine{', class' if has_labels else ''})); segments of the "
            f"query's own photo are left out when both stores are the same, and a region seen in several "
            f"views is shown once.</p>"
            f"<p class='about'>searched: {html.escape(labelled)} ({html.escape(units[0])} units) · queries from: "
            f"{html.escape(query)} ({html.escape(units[1])} units)</p>"
            + "\n".join(cards) + "</main></body></html>")


def _frame(tile: np.ndarray, width: int = 4) -> np.ndarray:
    out = np.empty((tile.shape[0] + 2 * width, tile.shape[1] + 2 * width, 3), np.uint8)
    out[:] = FRAME
    out[width:-width, width:-width] = tile
    return out


__all__: list[Any] = ["Query", "parse_query", "read_class_names", "cutout", "run_retrieve", "index_page"]
