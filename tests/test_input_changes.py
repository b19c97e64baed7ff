"""Stores cover what they were computed from: photos added or changed and the stages re-run give
the stores a clean run over the new photos gives; whole-input stages notice a grown input."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from segsort_unsup.contours.stage import ContoursConfig
from segsort_unsup.contours.stage import run as run_contours
from segsort_unsup.discover.stage import DiscoverConfig
from segsort_unsup.discover.stage import run as run_discover
from segsort_unsup.errors import StoreError
from segsort_unsup.io.sources import FileSources, input_fingerprint
from segsort_unsup.io.store import Item, StoreReader, StoreWriter
from segsort_unsup.ucm.stage import UcmConfig
from segsort_unsup.ucm.stage import run as run_ucm

TIMING_ATTRS = {"seconds", "time", "elapsed"}


@pytest.fixture(scope="module")
def photos(bsds, tmp_path_factory):
    """Five small BSDS500 crops (80 x 96), saved as PNG files."""
    root = tmp_path_factory.mktemp("crops")
    for path in sorted((bsds / "images" / "val").glob("*.jpg"))[:5]:
        rgb = np.asarray(Image.open(path).convert("RGB"))[100:180, 150:246]
        Image.fromarray(np.ascontiguousarray(rgb)).save(root / f"{path.stem}.png")
    return sorted(root.glob("*.png"))


def _config(pidinet_dir) -> ContoursConfig:
    return ContoursConfig(model="pidinet-tiny", weights=str(pidinet_dir / "table5_pidinet-tiny.pth"),
                          precision="fp32", device="cpu", shard_size=2)


def _same_items(a, b) -> None:
    with StoreReader(a) as ra, StoreReader(b) as rb:
        assert ra.keys() == rb.keys()
        for key in ra.keys():
            ia, ib = ra[key], rb[key]
            assert set(ia.arrays) == set(ib.arrays)
            for name in ia.arrays:
                np.testing.assert_array_equal(ia.arrays[name], ib.arrays[name], err_msg=f"{key} {name}")
            attrs = lambda it: {k: v for k, v in it.attrs.items() if k not in TIMING_ATTRS and k != "source"}  # noqa: E731
            assert attrs(ia) == attrs(ib), key


def test_added_and_changed_photos_are_computed_downstream_too(tmp_path, photos, pidinet_dir):
    images = tmp_path / "images"
    images.mkdir()
    for path in photos[:3]:
        shutil.copy(path, images / path.name)
    config = _config(pidinet_dir)
    assert run_contours(config, str(images), tmp_path / "contours").ok
    assert run_ucm(UcmConfig(shard_size=2), tmp_path / "contours", tmp_path / "segments").ok

    shutil.copy(photos[3], images / photos[3].name)  # a new photo
    shutil.copy(photos[4], images / photos[0].name)  # a photo replaced by another picture
    first = run_contours(config, str(images), tmp_path / "contours")
    assert (first.done, first.skipped, first.failed) == (2, 2, [])
    second = run_ucm(UcmConfig(shard_size=2), tmp_path / "contours", tmp_path / "segments")
    assert (second.done, second.skipped, second.failed) == (2, 2, [])

    # the reference: a clean run over the folder as it is now
    assert run_contours(config, str(images), tmp_path / "clean_contours").ok
    assert run_ucm(UcmConfig(shard_size=2), tmp_path / "clean_contours", tmp_path / "clean_segments").ok
    _same_items(tmp_path / "contours", tmp_path / "clean_contours")
    _same_items(tmp_path / "segments", tmp_path / "clean_segments")

    # touched (same bytes, new mtime): nothing is recomputed; nothing changed: nothing either
    os.utime(images / photos[1].name, ns=(1, 1))
    again = run_contours(config, str(images), tmp_path / "contours")
    assert (again.done, again.skipped) == (0, 4)
    assert run_ucm(UcmConfig(shard_size=2), tmp_path / "contours", tmp_path / "segments").done == 0


def test_a_changed_photo_that_now_fails_is_not_served_stale(tmp_path, photos, pidinet_dir):
    images = tmp_path / "images"
    images.mkdir()
    for path in photos[:2]:
        shutil.copy(path, images / path.name)
    config = _config(pidinet_dir)
    assert run_contours(config, str(images), tmp_path / "contours").ok
    (images / photos[0].name).write_bytes(b"not an image any more")
    summary = run_contours(config, str(images), tmp_path / "contours")
    assert [key for key, _ in summary.failed] == [photos[0].stem]
    with StoreReader(tmp_path / "contours") as reader:
        assert reader.keys() == [photos[1].stem]  # the old edge map of the old picture is withdrawn


def test_file_sources_tell_content_from_stat(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"12345")
    sources = FileSources({"a": (path,)})
    sources.snapshot(["a"])
    recorded = sources.fingerprint("a")
    assert sources.unchanged("a", recorded)
    os.utime(path, ns=(5, 5))
    assert sources.unchanged("a", recorded)  # same bytes
    path.write_bytes(b"12346")
    assert not sources.unchanged("a", recorded)
    assert sources.unchanged("a", None)  # stored before fingerprints were recorded


def _prototypes(root, keys, seed=0):
    rng = np.random.default_rng(seed)
    with StoreWriter(root, kind="prototypes", config={"synthetic": 1}) as w:
        for key in keys:
            p = rng.normal(size=(6, 8)).astype(np.float32)
            p /= np.linalg.norm(p, axis=1, keepdims=True)
            segments = np.repeat(np.arange(6, dtype=np.int32), 4).reshape(4, 6)
            w.add(Item(key, {"prototypes": p, "segments": segments, "area": np.full(6, 4, np.int64),
                             "bbox": np.tile(np.array([0, 0, 4, 6], np.int32), (6, 1))}))


def test_discover_notices_a_grown_input(tmp_path):
    protos = tmp_path / "prototypes"
    _prototypes(protos, ["a", "b", "c"])
    config = DiscoverConfig(gallery=False)
    assert run_discover(config, protos, tmp_path / "groups").ok
    before = input_fingerprint(protos)
    _prototypes(protos, ["d"], seed=1)
    assert input_fingerprint(protos)["source_content"] != before["source_content"]
    with pytest.raises(StoreError, match="input that has changed since .*differs in: source_content"):
        run_discover(config, protos, tmp_path / "groups")
    run_discover(config, protos, tmp_path / "groups", overwrite="changed")
    with StoreReader(tmp_path / "groups") as reader:
        rows = reader["rows"]
    assert int(rows.attrs["rows"]) == 24


def test_input_fingerprint_of_an_image_folder(tmp_path, photos):
    for path in photos[:2]:
        shutil.copy(path, tmp_path / path.name)
    before = input_fingerprint(tmp_path)
    os.utime(tmp_path / photos[0].name, ns=(7, 7))
    assert input_fingerprint(tmp_path) == before  # same bytes
    shutil.copy(photos[2], tmp_path / photos[2].name)
    assert input_fingerprint(tmp_path)["source_content"] != before["source_content"]


@pytest.mark.slow
def test_distributed_tasks_record_inputs_too(tmp_path, photos, pidinet_dir):
    """Dask workers write their own shards: the input fingerprints travel with their tasks."""
    from segsort_unsup.parallel import make_executor

    images = tmp_path / "images"
    images.mkdir()
    for path in photos[:2]:
        shutil.copy(path, images / path.name)
    config = _config(pidinet_dir)
    with make_executor("dask-local", workers=2) as executor:
        assert run_contours(config, str(images), tmp_path / "contours", executor=executor).ok
        shutil.copy(photos[2], images / photos[0].name)
        again = run_contours(config, str(images), tmp_path / "contours", executor=executor)
    assert (again.done, again.skipped) == (1, 1)
    assert run_contours(config, str(images), tmp_path / "clean").ok
    _same_items(tmp_path / "contours", tmp_path / "clean")


def test_pipeline_rerun_after_adding_photos(tmp_path, photos, pidinet_dir):
    """`segsort-unsup run` (the installed script) after a photo was added and one replaced: only they are
    computed, in both stages."""
    import subprocess
    import sys
    from pathlib import Path

    images = tmp_path / "images"
    images.mkdir()
    for path in photos[:2]:
        shutil.copy(path, images / path.name)
    toml = tmp_path / "p.toml"
    toml.write_text(f"""
[pipeline]
input = "images"
output = "out"
[contours]
model = "pidinet-tiny"
weights = "{pidinet_dir / 'table5_pidinet-tiny.pth'}"
precision = "fp32"
device = "cpu"
[ucm]
""")
    exe = Path(sys.executable).parent / "segsort-unsup"

    def run() -> str:
        out = subprocess.run([str(exe), "run", str(toml)], capture_output=True, text=True, env=os.environ,
                             timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout + out.stderr

    run()
    shutil.copy(photos[2], images / photos[2].name)
    shutil.copy(photos[3], images / photos[0].name)
    text = run()
    assert "contours: 2 done, 1 already complete" in text and "ucm: 2 done, 1 already complete" in text
    with StoreReader(tmp_path / "out" / "segments") as reader:
        assert reader.keys() == sorted(p.stem for p in photos[:3])
