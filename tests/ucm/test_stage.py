"""The ucm stage's store: contents, resume, and a run killed mid-way (SIGKILL) that resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from segsort_unsup.io.outdir import MANIFEST_NAME
from segsort_unsup.io.store import Item, StoreReader, StoreWriter
from segsort_unsup.ucm.hierarchy import cut_labels, labels_from_ucm2, ultrametric_contour_map
from segsort_unsup.ucm.stage import UcmConfig, run

REPO = Path(__file__).resolve().parents[2]


def make_contours_store(root: Path, maps, bsds: Path) -> Path:
    with StoreWriter(root, kind="contours", config={"model": "gt-blur"},
                     meta={"model": "gt-blur", "weights_sha256": "f" * 64}) as writer:
        for image_id, edge, orient in maps:
            writer.add(Item(image_id, {"edge": edge.astype(np.float16), "orientation": orient.astype(np.float16)},
                            {"source": str(bsds / "images" / "test" / f"{image_id}.jpg"),
                             "height": edge.shape[0], "width": edge.shape[1]}))
    return root


def test_store_contents_and_resume(tmp_path, gt_maps, bsds):
    src = make_contours_store(tmp_path / "contours", gt_maps[:2], bsds)
    config = UcmConfig(threshold=0.3, levels=(0.1, 0.5), png_dir=str(tmp_path / "png"), mat_dir=str(tmp_path / "mat"))
    summary = run(config, src, tmp_path / "seg")
    assert (summary.done, summary.skipped, summary.failed) == (2, 0, [])
    with StoreReader(tmp_path / "seg", kind="segments", required=("ucm2", "parents", "altitudes", "labels")) as store:
        assert store.keys() == sorted(k for k, _, _ in gt_maps[:2])
        assert store.meta["weights_sha256"] == "f" * 64
        item = store[gt_maps[0][0]]
        h, w = gt_maps[0][1].shape
        assert item.arrays["ucm2"].shape == (2 * h + 1, 2 * w + 1) and item.arrays["ucm2"].dtype == np.float32
        assert item.arrays["parents"].dtype == np.int32 and item.arrays["altitudes"].dtype == np.float32
        assert item.arrays["labels"].dtype == np.int32 and item.arrays["labels"].shape == (h, w)
        assert item.arrays["labels_levels"].shape == (2, h, w)
        np.testing.assert_array_equal(item.arrays["labels"], labels_from_ucm2(item.arrays["ucm2"], 0.3))
        # the stage's step-by-step path (arrays dropped early) gives the library function's result
        stored = [np.asarray(m.astype(np.float16), np.float32) for m in gt_maps[0][1:]]
        direct = ultrametric_contour_map(*stored)
        for name in ("ucm2", "parents", "altitudes", "leaves"):
            got = item.arrays[name]
            assert got.dtype == getattr(direct, name).dtype and np.array_equal(got, getattr(direct, name)), name
        np.testing.assert_array_equal(item.arrays["labels"], direct.labels(0.3))
        leaf_labels = cut_labels(item.arrays["parents"], item.arrays["altitudes"], threshold=0.5)
        np.testing.assert_array_equal(leaf_labels[item.arrays["leaves"]], item.arrays["labels_levels"][1])
        assert store.meta["source"] == str(src.resolve()) and item.attrs["threshold"] == 0.3
        with StoreReader(src) as contours:  # the input's identity is part of this store's
            assert store.config["source_identity"] == contours.config_hash
    mat = scipy.io.loadmat(tmp_path / "mat" / f"{gt_maps[0][0]}.mat")
    np.testing.assert_allclose(mat["ucm2"], item.arrays["ucm2"])
    for suffix in ("ucm", "labels", "overview"):
        assert (tmp_path / "png" / f"{gt_maps[0][0]}_{suffix}.png").is_file()
    leftovers = [p for d in ("png", "mat") for p in (tmp_path / d).iterdir() if p.name.endswith(".tmp")]
    assert not leftovers  # exports are written through a temporary name and renamed
    for d in ("png", "mat"):  # and listed with their sizes in the folder's manifest
        listed = json.loads((tmp_path / d / MANIFEST_NAME).read_text())["files"]
        assert listed == {p.name: p.stat().st_size for p in (tmp_path / d).iterdir() if not p.name.startswith(".")}
    again = run(config.replace(png_dir=None, mat_dir=None), src, tmp_path / "seg")
    assert (again.done, again.skipped) == (0, 2)


KILLED_RUN = textwrap.dedent("""
    import sys, time
    import segsort_unsup.ucm.stage as stage
    slow = stage.process_item
    def process_item(job):
        time.sleep(0.4)
        return slow(job)
    stage.process_item = process_item
    stage.run(stage.UcmConfig(shard_size=1), sys.argv[1], sys.argv[2])
""")


@pytest.mark.slow
def test_killed_run_leaves_a_readable_store_and_resumes(tmp_path, gt_maps, bsds):
    src = make_contours_store(tmp_path / "contours", gt_maps, bsds)
    out = tmp_path / "seg"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(src), str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(out.glob("part-*.h5")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with StoreReader(out, kind="segments") as store:
        done_before = len(store)
        for key in store.keys():
            assert store[key].arrays["ucm2"].ndim == 2
    assert 1 <= done_before < len(gt_maps)
    summary = run(UcmConfig(), src, out)
    assert summary.skipped == done_before and summary.done == len(gt_maps) - done_before
    with StoreReader(out, kind="segments") as store:
        assert len(store) == len(gt_maps)


def test_overview_without_readable_photo_and_plain_mean(tmp_path, gt_maps, bsds, caplog, monkeypatch):
    import logging

    package_logger = logging.getLogger("segsort_unsup")  # the CLI may have made it quiet and non-propagating
    monkeypatch.setattr(package_logger, "propagate", True)
    monkeypatch.setattr(package_logger, "level", logging.INFO)
    maps = gt_maps[:1]
    src = make_contours_store(tmp_path / "contours", maps, tmp_path / "nowhere")  # source photos missing
    summary = run(UcmConfig(oriented=False, png_dir=str(tmp_path / "png")), src, tmp_path / "seg")
    assert summary.ok and summary.done == 1
    picture = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(tmp_path / "png" / f"{maps[0][0]}_overview.png"))
    h, w = maps[0][1].shape
    assert picture.shape[0] == h + 16 and picture.shape[1] == 3 * w + 2 * 4  # titles; contours | two cuts, no photo
    edge = np.asarray(maps[0][1], np.float32)
    expected = np.clip(np.clip(edge, 0, 1) * 255 + 0.5, 0, 255).astype(np.uint8)  # white on black, as the PNGs
    contours_panel = picture[16:, :w, 0].astype(int)  # the contour map itself, not the ucm
    assert np.abs(contours_panel - expected).max() <= 1
    assert "no image panel" in caplog.text
    with StoreReader(tmp_path / "seg", kind="segments") as store:
        from segsort_unsup.ucm.hierarchy import ultrametric_contour_map

        expected = ultrametric_contour_map(maps[0][1].astype(np.float16).astype(np.float32)).ucm2
        np.testing.assert_array_equal(store[maps[0][0]].arrays["ucm2"], expected)


def test_ucm_picture_is_gamma_stretched_and_keeps_order(gt_maps):
    from segsort_unsup.ucm.export import ucm_image, ucm_picture
    from segsort_unsup.ucm.hierarchy import ultrametric_contour_map

    ucm = ucm_image(ultrametric_contour_map(gt_maps[0][1]).ucm2)
    pic = ucm_picture(ucm)
    nonzero = ucm > 0
    assert (pic[~nonzero] == 0).all() and pic.max() == 255
    np.testing.assert_allclose(pic[nonzero], 255 * np.sqrt(ucm[nonzero] / ucm.max()), atol=0.51)
    order = np.argsort(ucm[nonzero], kind="stable")
    assert (np.diff(pic[nonzero][order].astype(int)) >= 0).all()  # brighter never means weaker
    assert pic[nonzero].mean() > 1.2 * (255 * ucm[nonzero] / ucm.max()).mean()  # brighter than the old linear map
