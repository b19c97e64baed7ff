"""discover used carelessly: a concurrent --overwrite while the gallery is drawn, unreadable items, NaN rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segsort_unsup.discover import gallery as gallery_module
from segsort_unsup.discover.stage import DiscoverConfig, read_groups, run
from segsort_unsup.errors import StoreError
from segsort_unsup.io.images import read_image
from segsort_unsup.io.store import INDEX_NAME, Item, StoreReader, StoreWriter

CLI = Path(sys.executable).parent / "segsort-unsup"
H, W, K, D = 60, 90, 24, 8


def _store(root: Path, photo: Path, items: int = 4, nan_in: int | None = None) -> Path:
    """A small prototypes store, one item per shard; every item is ``photo`` cut into K vertical strips."""
    small = root.parent / f"{root.name}-photo.png"
    Image.fromarray(read_image(photo)).resize((W, H), Image.BILINEAR).save(small)
    segs = np.repeat((np.arange(W) * K // W)[None, :], H, axis=0).astype(np.int32)
    bbox = np.array([[0, np.flatnonzero(segs[0] == s).min(), H, np.flatnonzero(segs[0] == s).max() + 1]
                     for s in range(K)], np.int32)
    rng = np.random.default_rng(0)
    with StoreWriter(root, kind="prototypes", config={"robustness": items}, shard_size=1) as writer:
        for i in range(items):
            protos = rng.normal(size=(K, D)).astype(np.float32)
            protos /= np.linalg.norm(protos, axis=1, keepdims=True)
            if i == nan_in:
                protos[3] = np.nan
            writer.add(Item(f"photo-{i}", {"prototypes": protos, "segments": segs,
                                           "area": np.bincount(segs.ravel()).astype(np.int64), "bbox": bbox},
                            {"source": str(small)}))
    return root


def _env() -> dict[str, str]:
    return dict(os.environ)


def test_the_lock_is_held_while_the_gallery_is_drawn(bsds, tmp_path, monkeypatch):
    photo = sorted((bsds / "images" / "val").glob("*.jpg"))[0]
    protos = _store(tmp_path / "protos", photo)
    out = tmp_path / "groups"
    seen = []
    original = gallery_module.write_gallery

    def drawing(*args, **kwargs):
        # a second run with --overwrite while this one draws: refused, nothing of this run is touched
        with pytest.raises(StoreError, match="another segsort-unsup run is writing this store"):
            run(DiscoverConfig(map_method="none"), protos, out, overwrite=True)
        seen.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(gallery_module, "write_gallery", drawing)
    summary = run(DiscoverConfig(map_method="pca"), protos, out)
    assert seen == [True] and summary.ok
    assert (out / "gallery" / "gallery.html").is_file() and read_groups(out).rows.attrs["rows"] == 4 * K
    # kept as is on a re-run: the lock is held through the (skipped) redraw too
    seen.clear()
    again = run(DiscoverConfig(map_method="pca"), protos, out)
    assert seen == [True] and again.skipped == 4 and again.done == 0


def _damage_one_item(store: Path) -> str:
    """Flip bytes in the middle of one item's shard; return that item's key."""
    with StoreReader(store, kind="prototypes") as reader:
        key = reader.keys()[1]

    shard = sorted(store.glob("part-*.h5"))[1]
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    shard.write_bytes(bytes(data))

    return key


def test_an_unreadable_item_is_a_failure_with_exit_code_1(bsds, tmp_path):
    photo = sorted((bsds / "images" / "val").glob("*.jpg"))[0]
    protos = _store(tmp_path / "protos", photo)
    _damage_one_item(protos)
    with StoreReader(protos, kind="prototypes") as reader:
        _, failed = reader.stack("prototypes")
    assert len(failed) == 1  # the damage is found by the reader, as discover meets it
    bad = failed[0][0]
    out = tmp_path / "groups"
    for attempt in range(2):  # made, then kept: the left-out item is reported both times
        done = subprocess.run([str(CLI), "discover", str(protos), "-o", str(out), "--no-gallery"],
                              capture_output=True, text=True, env=_env(), timeout=300)
        assert done.returncode == 1, done.stderr
        assert "1 failed of 4" in done.stderr
        assert f"discover: {bad}: left out" in done.stdout + done.stderr  # the reason, once
        assert ("3 done, 0 already complete" if attempt == 0 else "0 done, 3 already complete") in done.stderr
    rows = read_groups(out).rows
    assert rows.attrs["rows"] == 3 * K


def test_non_finite_prototypes_are_refused_in_one_line_naming_the_item(bsds, tmp_path):
    photo = sorted((bsds / "images" / "val").glob("*.jpg"))[0]
    protos = _store(tmp_path / "protos", photo, nan_in=2)
    done = subprocess.run([str(CLI), "discover", str(protos), "-o", str(tmp_path / "groups"), "--no-gallery"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "'photo-2'" in errors[0] and "non-finite" in errors[0], done.stderr
    assert "unexpected" not in done.stderr and "Traceback" not in done.stderr


def test_a_redraw_removes_only_what_the_gallery_wrote(bsds, tmp_path):
    photo = sorted((bsds / "images" / "val").glob("*.jpg"))[0]
    protos = _store(tmp_path / "protos", photo)
    out = tmp_path / "groups"
    # a gallery drawn before galleries were output folders is retired, not refused
    run(DiscoverConfig(gallery=False), protos, out)
    old = out / "gallery"
    (old / "montages").mkdir(parents=True)
    for name in ("gallery.json", "gallery.html", "level-00.html", "map.png", "montages/level-00-g0000.png"):
        (old / name).write_text("old")
    run(DiscoverConfig(map_method="pca"), protos, out)
    assert not (old / "montages").exists() and not (old / "map.png").exists() and not (old / "gallery.json").exists()
    assert "<h1>Visual groups" in (old / "gallery.html").read_text()
    tiles = sorted(p.name for p in (old / "tiles").iterdir())
    # a user's note survives a redraw with other settings; the old drawing's files do not
    (old / "my notes.txt").write_text("mine")
    run(DiscoverConfig(map_method="pca", representatives=1, random_members=0), protos, out)
    assert (old / "my notes.txt").read_text() == "mine"
    assert len(list((old / "tiles").iterdir())) < len(tiles)
