"""The gallery at scale: 200k synthetic prototypes over a few real photos, bounded pages, timed."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segsort_unsup.discover.gallery import write_gallery
from segsort_unsup.discover.stage import ROWS_KEY, Groups, _level_item, level_key
from segsort_unsup.io.images import read_image
from segsort_unsup.io.store import Item, StoreWriter

ITEMS, GRID_Y, GRID_X, DIM = 250, 20, 40, 16  # 250 x 800 = 200k prototypes
H, W = 120, 180


def _grid_segments() -> tuple[np.ndarray, np.ndarray]:
    ys = np.minimum(np.arange(H) * GRID_Y // H, GRID_Y - 1)
    xs = np.minimum(np.arange(W) * GRID_X // W, GRID_X - 1)
    segs = (ys[:, None] * GRID_X + xs[None, :]).astype(np.int32)
    bbox = np.zeros((GRID_Y * GRID_X, 4), np.int32)
    for s in range(GRID_Y * GRID_X):
        yy, xx = np.nonzero(segs == s)
        bbox[s] = yy.min(), xx.min(), yy.max() + 1, xx.max() + 1
    return segs, bbox


def _synthetic_store(root: Path, photos: list[Path]) -> tuple[np.ndarray, list[str]]:
    """Prototypes drawn around 60 centres; every item is one of ``photos`` cut into a grid."""
    rng = np.random.default_rng(0)
    small = []
    for i, path in enumerate(photos):
        target = root.parent / f"photo{i}.png"
        Image.fromarray(read_image(path)).resize((W, H), Image.BILINEAR).save(target)
        small.append(str(target))
    segs, bbox = _grid_segments()
    k = GRID_Y * GRID_X
    centres = rng.normal(size=(60, DIM))
    all_protos, keys = [], []
    with StoreWriter(root, kind="prototypes", config={"synthetic": 200_000}, shard_size=64) as writer:
        for item in range(ITEMS):
            which = rng.integers(0, 60, k)
            protos = centres[which] + 0.35 * rng.normal(size=(k, DIM))
            protos = (protos / np.linalg.norm(protos, axis=1, keepdims=True)).astype(np.float32)
            key = f"img{item:04d}"
            writer.add(Item(key, {"prototypes": protos, "segments": segs, "area": np.bincount(segs.ravel()),
                                  "bbox": bbox}, {"source": small[item % len(small)]}))
            all_protos.append(protos)
            keys.append(key)
    return np.concatenate(all_protos), keys


def _nested_levels(protos: np.ndarray) -> list[np.ndarray]:
    """Three nested partitions (as FINCH's are): ~2000, 60-ish and 6 groups."""
    rng = np.random.default_rng(1)
    centres = protos[rng.choice(len(protos), 60, replace=False)]
    coarse = np.argmax(protos @ centres.T, axis=1)
    _, coarse = np.unique(coarse, return_inverse=True)
    fine = coarse * 40 + rng.integers(0, 40, len(protos))
    _, fine = np.unique(fine, return_inverse=True)
    coarsest = coarse % 6
    return [fine.astype(np.int32), coarse.astype(np.int32), coarsest.astype(np.int32)]


@pytest.mark.slow
def test_gallery_of_200k_prototypes_is_paginated_bounded_and_correct(bsds, tmp_path):
    photos = sorted((bsds / "images" / "val").glob("*.jpg"))[:3]
    protos, keys = _synthetic_store(tmp_path / "prototypes", photos)
    n = len(protos)
    assert n == 200_000
    parts = _nested_levels(protos)
    image = np.repeat(np.arange(ITEMS, dtype=np.int32), GRID_Y * GRID_X)
    segment = np.tile(np.arange(GRID_Y * GRID_X, dtype=np.int32), ITEMS)
    levels = []
    for lv, part in enumerate(parts):
        k = int(part.max()) + 1
        parent = np.full(k, -1, np.int32)
        if lv + 1 < len(parts):
            parent[part] = parts[lv + 1]
        levels.append(_level_item(level_key(lv), protos, part, parent, None, 0, {"level": lv}))
    rows = Item(ROWS_KEY, {"image_keys": np.frombuffer(json.dumps(keys).encode(), np.uint8).copy(), "image": image,
                           "segment": segment}, {"rows": n})
    groups = Groups(tmp_path / "groups", rows, levels, None, {})

    started, cpu = time.perf_counter(), time.process_time()
    gallery = write_gallery(groups, tmp_path / "prototypes", tmp_path / "groups" / "gallery", level=1,
                            identity="synthetic", max_groups=200, groups_per_page=30, map_method="pca",
                            map_points=2000)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(f"\ngallery of {n} prototypes: {seconds:.1f} s wall, {cpu:.1f} s CPU")
    folder = gallery.parent
    # levels with more than max_groups groups get no page; the others are paginated, 30 cards a page
    k1 = levels[1].attrs["groups"]
    assert not (folder / "level-00.html").exists()
    assert len(list(folder.glob("level-01*.html"))) == -(-k1 // 30)
    assert len(list(folder.glob("level-02*.html"))) == 1
    cards_and_tiles = 0
    for page in folder.glob("level-*.html"):
        text = page.read_text()
        cards = re.findall(r"<div class='card' id='g(\d+)'", text)
        assert 1 <= len(cards) <= 30
        assert len(text) < 600_000, page.name  # bounded whatever the store size
        cards_and_tiles += len(re.findall(r"<img src='tiles/", text))
    tiles = list(folder.glob("tiles/*.jpg"))
    assert cards_and_tiles <= (k1 + 6) * 7 and len(tiles) <= cards_and_tiles + 40 * 40
    # the first member of every card is the group's member nearest its mean (cosine), as a direct reference says
    text = (folder / "level-01.html").read_text()
    for g, first in re.findall(r"<div class='card' id='g(\d+)'.*?<img src='tiles/r(\d+)\.jpg'", text, re.S):
        g, first = int(g), int(first)
        members = np.flatnonzero(parts[1] == g)
        mean = protos[members].mean(axis=0)
        sims = protos[members] @ (mean / np.linalg.norm(mean))
        assert parts[1][first] == g
        assert sims.max() - protos[first] @ (mean / np.linalg.norm(mean)) <= 1e-5
    assert seconds < 240
