"""HTML of the gallery (see :mod:`segsort_unsup.discover.gallery`): level pages, photo pages.

Static pages that open from disk: no server, no network, one inline style sheet and script.
Every key and name from the data is HTML-escaped; links are built from numbers.
"""

from __future__ import annotations

import html
import json
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .gallery import CELL, TILE, LevelView, MapView, page_name, photo_name, tile_name

esc = html.escape

STYLE = """
:root{--ink:#1d2330;--soft:#5b6475;--line:#dde1e8;--bg:#f5f6f8}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:var(--bg);color:var(--ink)}
main{max-width:1500px;margin:0 auto;padding:16px 20px 40px}
h1{font-size:22px;margin:6px 0 4px}h2{font-size:17px;margin:22px 0 8px}
.about{color:var(--soft);font-size:13.5px;margin:2px 0}.about b{color:var(--ink);font-weight:600}
a{color:#1f5fbf;text-decoration:none}a:hover{text-decoration:underline}
table{border-collapse:collapse;margin:8px 0;font-size:13.5px;background:#fff}
td,th{border:1px solid var(--line);padding:3px 10px;text-align:right}th{background:#eef0f4}
tr.cur td{background:#e8f0ff;font-weight:600}
.pager{margin:12px 0;font-size:14px}.pager a,.pager span{display:inline-block;padding:2px 8px;margin:2px;
 border:1px solid var(--line);border-radius:4px;background:#fff}.pager span{background:#1d2330;color:#fff}
.card{background:#fff;border:1px solid var(--line);border-left:6px solid var(--c,#888);border-radius:6px;
 margin:14px 0;padding:10px 12px}
.card[data-focus="1"]{box-shadow:0 0 0 3px #ffb300}
.card h3{margin:0 0 4px;font-size:16px}.card h3 .n{color:var(--soft);font-weight:400;font-size:14px}
.facts{font-size:13px;color:var(--soft);margin:2px 0 8px}
.members{display:flex;flex-wrap:wrap;gap:6px;align-items:center}
.members img{display:block;width:%(tile)dpx;height:%(tile)dpx;border-radius:3px;background:#222}
.members .sep{width:3px;align-self:stretch;background:#c5cad3;margin:0 4px;border-radius:2px}
.hist{display:flex;height:12px;width:min(420px,100%%);border-radius:3px;overflow:hidden;margin:4px 0}
.hist span{display:block;height:100%%}
.links{font-size:13px;color:var(--soft);margin-top:8px}
.mapbox{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.map{position:relative;flex:1 1 640px;max-width:%(mapmax)dpx;background:#fff;border:1px solid var(--line)}
.map img.sprite{display:block;width:100%%;height:auto}
.map a.cell{position:absolute;box-shadow:inset 0 0 0 2px var(--c)}
.map a.cell:hover{outline:2px solid #000;z-index:2}
.map.focus a.cell:not(.on){background:rgba(255,255,255,.8)}
.side{flex:0 1 300px;min-width:220px}
#preview{background:#fff;border:1px solid var(--line);border-radius:6px;padding:8px;min-height:60px;font-size:13px}
#preview img{display:none;width:%(tile)dpx;height:%(tile)dpx;margin-bottom:4px}
#preview.show img{display:block}
.legend{margin-top:10px;font-size:13px;max-height:420px;overflow:auto;background:#fff;border:1px solid var(--line);
 border-radius:6px;padding:6px}
.legend a{display:inline-flex;align-items:center;gap:4px;margin:2px 6px 2px 0;color:var(--ink)}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;background:var(--c)}
.photo{position:relative;display:inline-block;max-width:100%%;overflow:hidden}.photo img{display:block;max-width:100%%;height:auto}
.photo .box{position:absolute;border:3px solid #ff2d55;box-shadow:0 0 0 9999px rgba(0,0,0,.25);display:none}
@media (max-width:700px){.members img{width:calc(50vw - 30px);height:auto}main{padding:10px}}
""" % {"tile": TILE, "mapmax": 40 * CELL}

# Image check (every <img> with a src: data-loaded 1/0, body[data-images] = "ok" or the broken
# count), the focused group from the URL (#gN), and the map: hover preview, legend highlight.
SCRIPT = r"""
function focusGroup(){
  var m = /^#g(\d+)$/.exec(location.hash || '');
  document.querySelectorAll('.card[data-focus]').forEach(function(c){ c.removeAttribute('data-focus'); });
  if (m) { var c = document.getElementById('g' + m[1]); if (c) c.setAttribute('data-focus', '1'); }
}
window.addEventListener('hashchange', focusGroup);
window.addEventListener('load', function () {
  var broken = 0, imgs = document.images;
  for (var i = 0; i < imgs.length; i++) {
    if (!imgs[i].getAttribute('src')) continue;
    var ok = imgs[i].complete && imgs[i].naturalWidth > 0;
    imgs[i].setAttribute('data-loaded', ok ? '1' : '0');
    if (!ok) broken++;
  }
  document.body.setAttribute('data-images', broken ? String(broken) : 'ok');
  focusGroup();
  var map = document.querySelector('.map'), prev = document.getElementById('preview');
  if (!map || !prev) return;
  var pimg = prev.querySelector('img'), pcap = prev.querySelector('.cap');
  map.addEventListener('mouseover', function (e) {
    var a = e.target.closest('a.cell'); if (!a) return;
    pimg.setAttribute('src', a.getAttribute('data-tile'));
    pcap.textContent = a.getAttribute('title');
    prev.classList.add('show'); prev.setAttribute('data-row', a.getAttribute('data-row'));
  });
  function highlight(g) {
    map.classList.toggle('focus', g !== null);
    map.querySelectorAll('a.cell').forEach(function (a) { a.classList.toggle('on', a.getAttribute('data-g') === g); });
  }
  document.querySelectorAll('.legend a').forEach(function (k) {
    k.addEventListener('mouseenter', function () { highlight(k.getAttribute('data-g')); });
    k.addEventListener('mouseleave', function () { highlight(null); });
  });
});
"""

PHOTO_SCRIPT = r"""
window.addEventListener('load', function () {
  var broken = 0, imgs = document.images;
  for (var i = 0; i < imgs.length; i++) {
    var ok = imgs[i].complete && imgs[i].naturalWidth > 0;
    imgs[i].setAttribute('data-loaded', ok ? '1' : '0'); if (!ok) broken++;
  }
  document.body.setAttribute('data-images', broken ? String(broken) : 'ok');
  function show() {
    var m = /^#s(\d+)$/.exec(location.hash || ''), box = document.querySelector('.box');
    if (!box) return;
    var b = m ? BOXES[m[1]] : null;
    if (!b) { box.style.display = 'none'; return; }
    box.style.top = b[0] + '%'; box.style.left = b[1] + '%';
    box.style.height = (b[2] - b[0]) + '%'; box.style.width = (b[3] - b[1]) + '%'; box.style.display = 'block';
    document.getElementById('which').textContent = 'segment ' + m[1] + ' (framed)';
  }
  window.addEventListener('hashchange', show); show();
});
"""

LEVEL_NOTE = ("FINCH links every segment to its nearest neighbour (cosine) and takes the chains as groups; each "
              "next level repeats this on the groups' means, so groups merge with their nearest. Level 0 is the "
              "finest.")
SCORE_NOTE = ("Purity: the share of segments whose class is their group's majority class. NMI: normalised mutual "
              "information between groups and classes (0: unrelated, 1: the same partition).")


@dataclass
class Context:
    """What every page needs."""

    groups: Any
    views: list[LevelView]
    chosen: LevelView
    keys: list[str]
    image: np.ndarray
    segment: np.ndarray
    the_map: MapView | None
    meta: dict[str, Any]
    colours: list[str]
    prototypes: str

    @property
    def labelled(self) -> bool:
        return "purity" in self.chosen.item.attrs


def _title(level: int | str) -> str:
    return "requested partition" if level == "requested" else f"level {level}"


def _head(title: str, script: str) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width,initial-scale=1'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style><script>{script}</script></head><body><main>")


def units_line(meta: dict[str, Any]) -> str:
    """Which segments were clustered (from the prototypes store's embed settings ``units``/``grid``)."""
    settings = meta.get("settings") or {}
    units = str(settings.get("units") or "")
    if units.startswith("ucm:"):
        return (f"segments: the OWT-UCM regions cut at {esc(units[4:])} (embed units = {esc(units)}), one "
                "prototype each: the regions of the ucm overviews")
    grid = settings.get("grid") or [5, 5]
    cells = [int(v) for v in grid] if isinstance(grid, (list, tuple)) else [5, 5]
    if units.startswith("grid") and units[4:].isdigit():
        cells = [int(units[4:])] * 2
    return (f"segments: SegSort pixel sorting of the {esc(str(settings.get('features', 'head')))} embedding "
            f"(k-means from a {'×'.join(map(str, cells))} grid: up to {int(np.prod(cells))} per photo), one "
            "prototype each; not the OWT-UCM regions of the ucm overviews")


def model_line(meta: dict[str, Any], prototypes: str) -> str:
    model = meta.get("model_file")
    sha = str(meta.get("model_sha256", ""))[:12]
    text = f"model: <b>{esc(str(model))}</b> (sha256 {esc(sha)}…)" if model else "model: not recorded"
    return text + f" · prototypes: {esc(prototypes)}"


def _levels_table(ctx: Context, view: LevelView) -> str:
    drawn = {v.level for v in ctx.views}
    items: list[tuple[int | str, Any]] = list(enumerate(ctx.groups.levels))
    if ctx.groups.requested is not None:
        items.append(("requested", ctx.groups.requested))
    scores = ctx.labelled
    out = ["<table><tr><th style='text-align:left'>level</th><th>groups</th>"
           + ("<th>purity</th><th>NMI</th>" if scores else "") + "</tr>"]
    for lv, it in items:
        name = esc(_title(lv))
        cell = f"<a href='{page_name(lv)}'>{name}</a>" if lv in drawn else f"{name} (more than max_groups: no page)"
        cur = " class='cur'" if lv == view.level else ""
        extra = (f"<td>{it.attrs['purity']:.3f}</td><td>{it.attrs['nmi']:.3f}</td>"
                 if scores and "purity" in it.attrs else ("<td></td><td></td>" if scores else ""))
        out.append(f"<tr{cur}><td style='text-align:left'>{cell}</td><td>{int(it.attrs['groups'])}</td>{extra}</tr>")
    out.append("</table>")
    if scores:
        out.append(f"<p class='about'>{esc(SCORE_NOTE)}</p>")
    return "".join(out)


def _pager(view: LevelView, number: int) -> str:
    pages = view.pages()
    if len(pages) < 2:
        return ""
    parts = []
    for i, groups in enumerate(pages):
        label = f"{i + 1}"
        parts.append(f"<span>{label}</span>" if i == number else f"<a href='{page_name(view.level, i)}'>{label}</a>")
    return (f"<div class='pager'>pages ({len(pages)}, {view.per_page} groups each, largest first): "
            + "".join(parts) + "</div>")


def group_href(view: LevelView, g: int) -> str:
    page = view.page_of(g)
    return page_name(view.level, 0) if page is None else f"{page_name(view.level, page)}#g{g}"


def _colour(ctx: Context, view: LevelView, g: int) -> str:
    rank = np.flatnonzero(view.order == g)
    return ctx.colours[int(rank[0]) % len(ctx.colours)] if rank.size else "#9aa0a8"


def _map_html(ctx: Context, view: LevelView) -> str:
    m = ctx.the_map
    partition = view.item.arrays["partition"]
    w, h = 100.0 / m.cols, 100.0 / m.rows
    cells = []
    for row, cell in zip(m.row, m.cell):
        y, x = divmod(int(cell), m.cols)
        row = int(row)
        g = int(partition[row])
        img = int(ctx.image[row])
        cap = f"group {g} · {ctx.keys[img]} · segment {int(ctx.segment[row])}"
        cells.append(f"<a class='cell' href='{group_href(view, g)}' data-g='{g}' data-row='{row}' "
                     f"data-tile='{tile_name(row)}' title='{esc(cap)}' style='left:{x * w:.4f}%;top:{y * h:.4f}%;"
                     f"width:{w:.4f}%;height:{h:.4f}%;--c:{_colour(ctx, view, g)}'></a>")
    legend = [f"<a href='{group_href(view, int(g))}' data-g='{int(g)}' style='--c:{_colour(ctx, view, int(g))}'>"
              f"<i></i>{int(g)} ({int(view.item.arrays['sizes'][g])})</a>" for g in view.order]
    return (f"<h2>Map of {len(m.row)} segments ({m.method} of a sample of {m.sampled} of {m.total}, one per grid "
            f"cell), framed by their group at {esc(_title(view.level))}</h2>"
            "<p class='about'>Hover a thumbnail to see the segment; click it to open its group. Hover a legend "
            "entry to highlight its group (legend: group (size), largest first; grey frame: a group without a "
            "card).</p>"
            f"<div class='mapbox'><div class='map' style='max-width:{min(m.cols * CELL * 8 // 5, 40 * CELL)}px'>"
            f"<img class='sprite' src='map.jpg' width='{m.cols * CELL}' "
            f"height='{m.rows * CELL}' alt='thumbnail map'>{''.join(cells)}</div>"
            "<div class='side'><div id='preview'><img alt='segment under the pointer'><div class='cap'>"
            "Hover a thumbnail.</div></div>"
            f"<div class='legend'>{''.join(legend)}</div></div></div>")


def _card(ctx: Context, view: LevelView, g: int) -> str:
    item = view.item
    size = int(item.arrays["sizes"][g])
    n_photos, imgs, counts = view.photos[g]
    name = ""
    hist = ""
    class_counts = item.arrays.get("class_counts")
    if class_counts is not None and class_counts[g].sum():
        row = class_counts[g]
        major = int(row.argmax())
        name = f" · mostly class {major} ({row[major] / row.sum():.0%})"
        spans = [f"<span title='class {c}: {int(row[c])}' style='width:{100 * row[c] / row.sum():.2f}%;"
                 f"background:{ctx.colours[c % len(ctx.colours)]}'></span>" for c in np.flatnonzero(row)]
        hist = f"<div class='hist' title='class histogram'>{''.join(spans)}</div>"
    from_photos = ", ".join(f"<a href='{photo_name(int(i))}'>{esc(ctx.keys[int(i)])}</a> ×{int(c)}"
                            for i, c in zip(imgs, counts))
    top, rand = view.members[g]
    tiles = [_tile(ctx, int(r)) for r in top]
    if len(rand):
        tiles.append("<span class='sep' title='random members follow'></span>")
        tiles += [_tile(ctx, int(r)) for r in rand]
    links = []
    if isinstance(view.level, int) and view.level > 0:
        below = ctx.groups.levels[view.level - 1]
        finer = next((v for v in ctx.views if v.level == view.level - 1), None)
        kids = np.flatnonzero(below.arrays["parent"] == g)
        parts = [(f"<a href='{group_href(finer, int(c))}'>{int(c)}</a>" if finer is not None and finer.page_of(int(c))
                  is not None else str(int(c))) + f" ({int(below.arrays['sizes'][c])})" for c in kids[:40]]
        more = f" and {len(kids) - 40} more" if len(kids) > 40 else ""
        links.append(f"made of {len(kids)} group(s) of level {view.level - 1}: " + ", ".join(parts) + more)
    if isinstance(view.level, int) and "parent" in item.arrays and item.arrays["parent"][g] >= 0:
        p = int(item.arrays["parent"][g])
        coarser = next((v for v in ctx.views if v.level == view.level + 1), None)
        target = f"<a href='{group_href(coarser, p)}'>{p}</a>" if coarser is not None else str(p)
        links.append(f"part of group {target} of level {view.level + 1}")
    return (f"<div class='card' id='g{g}' style='--c:{_colour(ctx, view, g)}'>"
            f"<h3>Group {g} <span class='n'>· {size} segments from {n_photos} photo(s){esc(name)}</span></h3>"
            f"{hist}<div class='facts'>most from: {from_photos}</div>"
            f"<div class='members'>{''.join(tiles)}</div>"
            f"<div class='links'>{'<br>'.join(links)}</div></div>")


def _tile(ctx: Context, row: int) -> str:
    img, seg = int(ctx.image[row]), int(ctx.segment[row])
    cap = esc(f"{ctx.keys[img]} · segment {seg}")
    return (f"<a href='{photo_name(img)}#s{seg}' title='{cap}'><img src='{tile_name(row)}' width='{TILE}' "
            f"height='{TILE}' alt='{cap}'></a>")


def level_page(ctx: Context, view: LevelView, number: int, on_page: np.ndarray) -> str:
    """Page ``number`` of ``view``: header, levels table, the map (first page), group cards."""
    rows = int(ctx.groups.rows.attrs["rows"])
    title = f"Visual groups: {_title(view.level)} ({view.groups} groups of {rows} segments)"
    out = [_head(title, SCRIPT), f"<h1>{esc(title)}</h1>",
           f"<p class='about'>{esc(LEVEL_NOTE)} This page: <b>{esc(_title(view.level))}, {view.groups} groups</b>"
           f" of {len(ctx.groups.levels)} levels ({', '.join(str(int(i.attrs['groups'])) for i in ctx.groups.levels)}"
           " groups).</p>",
           f"<p class='about'>{units_line(ctx.meta)}</p><p class='about'>{model_line(ctx.meta, ctx.prototypes)}</p>",
           _levels_table(ctx, view)]
    if ctx.the_map is not None and number == 0:
        out.append(_map_html(ctx, view))
    shown = len(view.order)
    hidden = view.groups - shown
    out.append(f"<h2>Groups, largest first ({shown} shown"
               + (f"; {hidden} smaller ones have no card (max_groups)" if hidden > 0 else "") + ")</h2>"
               "<p class='about'>Each card: the members nearest the group's mean, then (after the bar) random "
               "members; the segment is bright, its surroundings dimmed, its outline yellow. Click a member for "
               "its whole photo.</p>")
    out.append(_pager(view, number))
    out += [_card(ctx, view, int(g)) for g in on_page]
    out.append(_pager(view, number))
    out.append("</main></body></html>")
    return "\n".join(out)


def photo_page(ctx: Context, img: int, photo: str, overview: str | None, shape: tuple[int, int],
               bbox: np.ndarray) -> str:
    """One photo with all its segments outlined; ``#sN`` frames segment N."""
    key = ctx.keys[img]
    h, w = int(shape[0]), int(shape[1])
    boxes = {int(s): [round(100 * b[0] / h, 3), round(100 * b[1] / w, 3), round(100 * b[2] / h, 3),
                      round(100 * b[3] / w, 3)] for s, b in enumerate(np.asarray(bbox))}
    script = f"var BOXES = {json.dumps(boxes)};" + PHOTO_SCRIPT
    out = [_head(f"{key}: segments", script), f"<h1>{esc(key)}</h1>",
           f"<p class='about'>{units_line(ctx.meta)}. <span id='which'></span></p>",
           f"<p class='about'><a href='../gallery.html'>back to the gallery</a>"]
    if overview:
        href = esc(urllib.parse.quote(Path(overview).as_posix()))
        out.append(f" · <a href='{href}'>ucm overview</a> (image | contours | OWT-UCM regions at two cuts)")
    out.append("</p>")
    if photo:
        out.append(f"<div class='photo'><img src='{esc(photo)}' alt='{esc(key)} with its segments'>"
                   "<div class='box'></div></div>")
    else:
        out.append("<p>The photo could not be read through the prototypes store's recorded source path.</p>")
    out.append("</main></body></html>")
    return "\n".join(out)
