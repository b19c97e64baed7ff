"""``segsort-unsup evaluate`` end to end on BSR's sample: every input kind, missing and bad files."""

from __future__ import annotations

import shutil

import numpy as np
import scipy.io as sio
from click.testing import CliRunner
from PIL import Image

from segsort_unsup.cli import main
from segsort_unsup.edgemaps import edge_orientation
from segsort_unsup.io.store import DatasetSpec, Item, StoreSchema, StoreWriter

IDS = ["2018", "3063", "5096", "6046", "8068"]


def _invoke(*args):
    result = CliRunner().invoke(main, ["-q", "evaluate", *map(str, args)], catch_exceptions=False)
    return result


def _expected(sample, case, name):
    return np.loadtxt(sample / case / name, ndmin=2)


def test_boundaries_png_folder_reproduces_test_2(bsds, tmp_path):
    sample = bsds / "bench_sample"
    out = tmp_path / "out"
    result = _invoke("boundaries", sample / "png", "--gt", sample / "groundTruth", "-o", out, "--thresholds", 5)
    assert result.exit_code == 0, result.output
    assert "ODS F=0.70" in result.output
    for name in ("eval_bdry.txt", "eval_bdry_thr.txt", "eval_bdry_img.txt"):
        assert np.abs(np.loadtxt(out / name, ndmin=2) - _expected(sample, "test_2", name)).max() < 0.005
    assert (out / "pr_curve.png").stat().st_size > 1000
    # results are not overwritten silently
    again = _invoke("boundaries", sample / "png", "--gt", sample / "groundTruth", "-o", out, "--thresholds", 5)
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_missing_and_bad_predictions_are_reported_not_fatal(bsds, tmp_path):
    sample = bsds / "bench_sample"
    preds = tmp_path / "png"
    shutil.copytree(sample / "png", preds)
    (preds / "2018.png").unlink()  # missing
    Image.fromarray(np.zeros((100, 120), np.uint8)).save(preds / "3063.png")  # wrong size
    (preds / "5096.png").write_bytes(b"not a png")  # unreadable
    out = tmp_path / "out"
    result = _invoke("boundaries", preds, "--gt", sample / "groundTruth", "-o", out, "--thresholds", 5)
    assert result.exit_code == 1  # failures make the exit code 1, the rest is still written
    assert "3063.png: the edge map is 100x120 but the ground truth" in result.output
    assert "5096.png: cannot read PNG" in result.output
    assert "1 ground-truth images had no prediction" in result.output
    assert (out / "missing.txt").read_text().split() == ["2018"]
    assert (out / "images.txt").read_text().split()[1::2] == ["6046", "8068"]
    assert len(np.loadtxt(out / "eval_bdry_img.txt", ndmin=2)) == 2


def test_contours_store_with_and_without_nms(bsds, tmp_path):
    sample = bsds / "bench_sample"
    store = tmp_path / "contours"
    with StoreWriter(store, kind="contours", config={"model": "test"}) as writer:
        for iid in IDS:
            edge = np.asarray(Image.open(sample / "png" / f"{iid}.png"), np.float32) / 255
            writer.add(Item(f"bench/{iid}", {"edge": edge.astype(np.float16),
                                              "orientation": edge_orientation(edge).astype(np.float16)}))
    out = tmp_path / "raw"
    result = _invoke("boundaries", store, "--gt", sample / "groundTruth", "-o", out, "--thresholds", 5, "--no-nms")
    assert result.exit_code == 0, result.output
    # float16 storage of k/255 values keeps every threshold decision of the PNG run
    ref = _expected(sample, "test_2", "eval_bdry.txt")
    assert np.abs(np.loadtxt(out / "eval_bdry.txt", ndmin=2) - ref).max() < 0.005
    result = _invoke("boundaries", store, "--gt", sample / "groundTruth", "-o", tmp_path / "nms", "--thresholds", 5,
                     "--workers", 2)
    assert result.exit_code == 0, result.output
    nms = np.loadtxt(tmp_path / "nms" / "eval_bdry.txt")
    assert 0.3 < nms[3] < 0.9  # a sane F after NMS of already thin maps


def test_segments_store_regions_reproduce_test_1(bsds, tmp_path):
    sample = bsds / "bench_sample"
    store = tmp_path / "segments"
    # a segments store holding only what evaluate reads (BSR's published ucm2, no merge tree)
    ucm2_only = StoreSchema("segments", (DatasetSpec("ucm2", "float32", 2),))
    with StoreWriter(store, kind="segments", config={"k": 1}, schema=ucm2_only) as writer:
        for iid in IDS:
            ucm2 = sio.loadmat(sample / "ucm2" / f"{iid}.mat")["ucm2"].astype(np.float32)
            writer.add(Item(iid, {"ucm2": ucm2}))
    out = tmp_path / "out"
    result = _invoke("regions", store, "--gt", sample / "groundTruth", "-o", out, "--thresholds", 5, "--with-boundaries")
    assert result.exit_code == 0, result.output
    for name in ("eval_cover.txt", "eval_cover_img.txt", "eval_RI_VOI.txt", "eval_bdry.txt"):
        assert np.abs(np.loadtxt(out / name, ndmin=2) - _expected(sample, "test_1", name)).max() < 0.005, name


def test_regions_of_edge_maps_is_a_clear_error(bsds, tmp_path):
    sample = bsds / "bench_sample"
    result = _invoke("regions", sample / "png", "--gt", sample / "groundTruth", "-o", tmp_path / "o", "--thresholds", 5)
    assert result.exit_code != 0
    assert "region benchmarks need a ucm2 or segmentations" in result.output


def test_no_matching_ids_is_a_usage_error(bsds, tmp_path):
    preds = tmp_path / "png"
    preds.mkdir()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(preds / "nothing.png")
    result = _invoke("boundaries", preds, "--gt", bsds / "bench_sample" / "groundTruth", "-o", tmp_path / "o")
    assert result.exit_code == 2
    assert "no prediction" in result.output


def test_failed_run_leaves_no_folder_and_plots_name_the_method(bsds, tmp_path):
    sample = bsds / "bench_sample"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "2018.png").write_bytes(b"not a png")
    out = tmp_path / "never"
    result = _invoke("boundaries", bad, "--gt", sample / "groundTruth", "-o", out, "--thresholds", 5)
    assert result.exit_code != 0 and not out.exists()
    store = tmp_path / "segments"
    ucm2_only = StoreSchema("segments", (DatasetSpec("ucm2", "float32", 2),))
    with StoreWriter(store, kind="segments", config={"k": 1}, meta={"model": "pidinet"}, schema=ucm2_only) as w:
        for iid in IDS:
            w.add(Item(iid, {"ucm2": sio.loadmat(sample / "ucm2" / f"{iid}.mat")["ucm2"].astype(np.float32)}))
    out = tmp_path / "regions"
    assert _invoke("regions", store, "--gt", sample / "groundTruth", "-o", out, "--thresholds", 5).exit_code == 0
    assert (out / "regions.png").is_file()
    from segsort_unsup.evaluate.bsds import method_name
    from segsort_unsup.evaluate.inputs import open_source

    assert method_name(open_source(store)) == "pidinet-owt-ucm"
