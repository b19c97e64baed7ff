"""``segsort-unsup ucm`` through click's CliRunner: PNG input, store input, bad items."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner
from PIL import Image

from segsort_unsup.cli import main
from segsort_unsup.io.store import StoreReader
from tests.ucm.maps import bsds_maps
from tests.ucm.test_stage import make_contours_store


def _pngs(folder, bsds, ids=("100007", "100099")):
    folder.mkdir(parents=True, exist_ok=True)
    maps = bsds_maps(bsds, ids=ids)
    for image_id, edge, _ in maps:
        Image.fromarray((edge * 255).astype(np.uint8)).save(folder / f"{image_id}.png")
    return maps


def test_png_folder(tmp_path, bsds):
    _pngs(tmp_path / "edges", bsds)
    result = CliRunner().invoke(main, ["-q", "ucm", str(tmp_path / "edges"), "-o", str(tmp_path / "seg"),
                                       "--levels", "0.2,0.6", "--png-dir", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    with StoreReader(tmp_path / "seg", kind="segments") as store:
        assert store.keys() == ["100007", "100099"]
        assert store["100007"].arrays["labels_levels"].shape[0] == 2
    assert (tmp_path / "png" / "100007_overview.png").is_file()


def test_store_input_and_resume(tmp_path, bsds):
    maps = bsds_maps(bsds, ids=("100007",))
    src = make_contours_store(tmp_path / "contours", maps, bsds)
    args = ["-q", "ucm", str(src), "-o", str(tmp_path / "seg"), "--threshold", "0.4", "--mat-dir", str(tmp_path / "mat")]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert (tmp_path / "mat" / "100007.mat").is_file()
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0 and "1 already complete" in second.output
    changed = CliRunner().invoke(main, args[:-3] + ["0.6"])
    assert changed.exit_code == 1 and "--overwrite" in changed.output


def test_bad_items_are_reported_and_the_rest_kept(tmp_path, bsds):
    _pngs(tmp_path / "edges", bsds, ids=("100007",))
    (tmp_path / "edges" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    listing = tmp_path / "list.txt"
    listing.write_text("edges/100007.png\nedges/corrupt.png\nedges/missing.png\n")
    result = CliRunner().invoke(main, ["-q", "ucm", str(listing), "-o", str(tmp_path / "seg")])
    assert result.exit_code == 1
    assert "corrupt.png" in result.output and "missing.png" in result.output and "file not found" in result.output
    with StoreReader(tmp_path / "seg", kind="segments") as store:
        assert store.keys() == ["edges/100007"]


def test_bad_levels_is_a_usage_error(tmp_path, bsds):
    _pngs(tmp_path / "edges", bsds, ids=("100007",))
    result = CliRunner().invoke(main, ["ucm", str(tmp_path / "edges"), "-o", str(tmp_path / "s"), "--levels", "0.2,x"])
    assert result.exit_code == 2 and "--levels" in result.output


def test_colour_photos_are_refused_as_edge_maps(tmp_path, bsds):
    """A newcomer's `ucm photos/`: refused per image with the hint to run contours first."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted((bsds / "images" / "test").glob("*.jpg"))[:2]:
        (photos / path.name).write_bytes(path.read_bytes())
    result = CliRunner().invoke(main, ["-q", "ucm", str(photos), "-o", str(tmp_path / "seg")])
    assert result.exit_code == 1 and "2 failed of 2" in result.output
    assert "colour photo" in result.output and "segsort-unsup contours" in result.output


def test_uint16_ucm2_reads_back_through_evaluation_within_half_a_step(tmp_path, bsds):
    from segsort_unsup.evaluate.inputs import load_prediction, open_source

    maps = bsds_maps(bsds, ids=("100007",))
    src = make_contours_store(tmp_path / "contours", maps, bsds)
    values = {}
    for dtype in ("float32", "uint16"):
        out = tmp_path / dtype
        result = CliRunner().invoke(main, ["-q", "ucm", str(src), "-o", str(out), "--ucm2-dtype", dtype])
        assert result.exit_code == 0, result.output
        with StoreReader(out, kind="segments") as store:
            item = store["100007"]
        assert item.arrays["ucm2"].dtype == np.dtype(dtype)
        source = open_source(out)
        values[dtype] = (load_prediction(source, next(iter(source.items))).ucm2, item)
    (f, ref), (q, item) = values["float32"], values["uint16"]
    assert q.dtype == np.float32
    step = item.attrs["ucm2_scale"]
    assert step == np.float64(f.max()) / 65535
    assert np.abs(q - f).max() <= step / 2 + np.spacing(np.float32(f.max()))
    np.testing.assert_array_equal(item.arrays["labels"], ref.arrays["labels"])  # exact either way


def test_a_failed_item_is_printed_once(tmp_path):
    edges = tmp_path / "edges"
    edges.mkdir()
    Image.fromarray(np.tile(np.linspace(0, 255, 40).astype(np.uint8), (30, 1))).save(edges / "ok.png")
    (edges / "broken.png").write_bytes(b"not a png")
    result = CliRunner().invoke(main, ["ucm", str(edges), "-o", str(tmp_path / "seg")])
    assert result.exit_code == 1, result.output
    assert result.output.count("broken.png") == 1, result.output  # the warning as found, not again at the end
    quiet = CliRunner().invoke(main, ["-q", "ucm", str(edges), "-o", str(tmp_path / "seg2")])
    assert quiet.exit_code == 1 and quiet.output.count("broken.png") == 1, quiet.output  # -q: in the summary


def test_an_unwritable_export_folder_fails_the_run_and_the_next_run_writes_the_export(tmp_path, bsds):
    _pngs(tmp_path / "edges", bsds, ids=("100007",))
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the picture folder's parent should be")
    args = ["-q", "ucm", str(tmp_path / "edges"), "-o", str(tmp_path / "seg"), "--png-dir", str(blocker / "png")]
    failed = CliRunner().invoke(main, args)
    assert failed.exit_code == 1 and "cannot create the folder" in failed.output, failed.output
    blocker.unlink()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert (blocker / "png" / "100007_overview.png").is_file()
