"""Folders of files written by the stages (contours/ucm exports, retrieval pages) and pipeline
section names: keys and names never lead out of the output folder, exports missing for a stored
item are redone from the store, and --overwrite removes only what the tool wrote."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner
from PIL import Image

from segsort_unsup.errors import InputError
from segsort_unsup.io.outdir import MANIFEST_NAME, OutputFolderError, UnsafeNameError
from segsort_unsup.io.store import Item, StoreReader, StoreWriter

from .ucm.maps import gt_contour_map


def _hostile_keys(tmp_path: Path) -> list[str]:
    return [str(tmp_path / "abs_escape"), "../../escaped", "a/../../../up", ".hidden"]


def _outside(tmp_path: Path, inside: Path) -> list[Path]:
    """Files under ``tmp_path`` that are neither inside ``inside`` nor an input of the test."""
    return [p for p in tmp_path.rglob("*") if p.is_file() and inside not in p.parents
            and not {"inputs", "contours"} & set(p.relative_to(tmp_path).parts)]


@pytest.fixture(scope="module")
def edge_crops(bsds):
    """Two small real contour maps (BSDS500 human boundaries, blurred), float16 as a store holds them."""
    from segsort_unsup.edgemaps import edge_orientation

    crops = []
    for image_id in ("100007", "100099"):
        edge = gt_contour_map(bsds / "groundTruth" / "test" / f"{image_id}.mat")[100:160, 150:230]
        crops.append((edge.astype(np.float16), edge_orientation(edge).astype(np.float16)))
    return crops


def _contours_store(root: Path, keys: list[str], crops) -> Path:
    with StoreWriter(root, kind="contours", config={"model": "gt-blur", "keys": keys}) as writer:
        for i, key in enumerate(keys):
            edge, orient = crops[i % len(crops)]
            writer.add(Item(key, {"edge": edge, "orientation": orient}, {"source": "", "height": edge.shape[0],
                                                                          "width": edge.shape[1]}))
    return root


# -- ucm exports -----------------------------------------------------------------------------------
def test_ucm_exports_of_hostile_keys_fail_alone_and_write_nothing_outside(tmp_path, edge_crops):
    from segsort_unsup.ucm.stage import UcmConfig, run

    keys = ["good", "sub/fine", *_hostile_keys(tmp_path)]
    src = _contours_store(tmp_path / "contours", keys, edge_crops)
    out = tmp_path / "deep" / "er" / "exp"
    config = UcmConfig(png_dir=str(out / "png"), mat_dir=str(out / "mat"))
    summary = run(config, src, out / "seg")
    assert summary.done == 2 and sorted(k for k, _ in summary.failed) == sorted(_hostile_keys(tmp_path))
    for key, reason in summary.failed:
        assert "\n" not in reason and repr(key) in reason
    assert _outside(tmp_path, out) == []
    with StoreReader(out / "seg") as store:
        assert store.keys() == ["good", "sub/fine"]  # a key that cannot name its exports is not stored either
    assert json.loads((out / "mat" / MANIFEST_NAME).read_text())["files"].keys() == {"good.mat", "sub/fine.mat"}


def test_ucm_exports_missing_for_stored_items_are_redone_from_the_store(tmp_path, edge_crops):
    from segsort_unsup.ucm.stage import UcmConfig, run

    src = _contours_store(tmp_path / "contours", ["a", "b"], edge_crops)
    reference = tmp_path / "reference"
    config = UcmConfig(levels=(0.2, 0.6))
    assert run(config.replace(png_dir=str(reference / "png"), mat_dir=str(reference / "mat")), src,
               reference / "seg").done == 2
    out = tmp_path / "out"
    assert run(config, src, out / "seg").done == 2  # stored without exports
    summary = run(config.replace(png_dir=str(out / "png"), mat_dir=str(out / "png")), src, out / "seg")
    assert (summary.done, summary.skipped, summary.failed) == (0, 2, [])
    for key in "ab":
        for suffix in ("_ucm.png", "_labels.png", "_overview.png"):
            assert (out / "png" / f"{key}{suffix}").read_bytes() == (reference / "png" / f"{key}{suffix}").read_bytes()
        np.testing.assert_array_equal(scipy.io.loadmat(out / "png" / f"{key}.mat")["ucm2"],
                                      scipy.io.loadmat(reference / "mat" / f"{key}.mat")["ucm2"])
    listed = json.loads((out / "png" / MANIFEST_NAME).read_text())
    assert listed["kind"] == "ucm-png+mat" and len(listed["files"]) == 8


def test_a_failing_ucm_export_is_a_failure_and_is_retried(tmp_path, edge_crops, monkeypatch):
    from segsort_unsup.ucm import export
    from segsort_unsup.ucm.stage import UcmConfig, run

    src = _contours_store(tmp_path / "contours", ["a", "b"], edge_crops)
    config = UcmConfig(png_dir=str(tmp_path / "png"))

    def broken(item, *args, **kwargs):
        if item.key == "b":
            raise OSError("disk said no")
        return real(item, *args, **kwargs)

    real = export.export_item
    monkeypatch.setattr(export, "export_item", broken)
    summary = run(config, src, tmp_path / "seg")
    assert summary.done == 2 and [k for k, _ in summary.failed] == ["b"] and "disk said no" in summary.failed[0][1]
    monkeypatch.setattr(export, "export_item", real)
    again = run(config, src, tmp_path / "seg")
    assert (again.done, again.skipped, again.failed) == (0, 2, [])
    assert (tmp_path / "png" / "b_overview.png").is_file()


def test_ucm_overwrite_keeps_a_users_files_in_the_export_folder(tmp_path, edge_crops):
    from segsort_unsup.ucm.stage import UcmConfig, run

    src = _contours_store(tmp_path / "contours", ["a"], edge_crops)
    png = tmp_path / "png"
    run(UcmConfig(png_dir=str(png)), src, tmp_path / "seg")
    (png / "my_photo.png").write_bytes(b"a user's photo")
    summary = run(UcmConfig(threshold=0.2, png_dir=str(png)), src, tmp_path / "seg", overwrite=True)
    assert summary.done == 1
    assert (png / "my_photo.png").read_bytes() == b"a user's photo" and (png / "a_ucm.png").is_file()
    (tmp_path / "album").mkdir()
    (tmp_path / "album" / "a_ucm.png").write_bytes(b"named like an export")
    with pytest.raises(OutputFolderError, match="not written by segsort-unsup; choose an empty folder"):
        run(UcmConfig(png_dir=str(tmp_path / "album")), src, tmp_path / "seg2", overwrite=True)
    assert (tmp_path / "album" / "a_ucm.png").read_bytes() == b"named like an export"
    with pytest.raises(OutputFolderError, match="is a segsort-unsup store, not a folder of files"):
        run(UcmConfig(png_dir=str(tmp_path / "seg3")), src, tmp_path / "seg3")


# -- contours PNGs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo(tmp_path_factory, bsds) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    rgb = np.asarray(Image.open(bsds / "images" / "test" / "100039.jpg").convert("RGB"))[:48, :64]
    Image.fromarray(np.ascontiguousarray(rgb)).save(folder / "p.png")
    return folder / "p.png"


def test_contours_pngs_redone_from_the_store_equal_those_written_at_once(tmp_path, photo, hed_h5):
    from segsort_unsup.contours.stage import ContoursConfig, run
    from segsort_unsup.io.images import ImageRef

    config = ContoursConfig(model="hed-bsds500", precision="fp32", device="cpu", weights=str(hed_h5))
    refs = [ImageRef("p", photo), ImageRef("sub/q", photo)]
    run(config.replace(png_dir=str(tmp_path / "ref"), nms_png=True), refs, tmp_path / "ref-store")
    run(config, refs, tmp_path / "store")
    (tmp_path / "png").mkdir()
    summary = run(config.replace(png_dir=str(tmp_path / "png"), nms_png=True), refs, tmp_path / "store")
    assert (summary.done, summary.skipped, summary.failed) == (0, 2, [])
    for rel in ("p.png", "sub/q.png", "nms/p.png", "nms/sub/q.png"):
        assert (tmp_path / "png" / rel).read_bytes() == (tmp_path / "ref" / rel).read_bytes(), rel
    (tmp_path / "png" / "sub" / "mine.png").write_bytes(b"user")
    run(config.replace(png_dir=str(tmp_path / "png"), nms_png=True), refs, tmp_path / "store", overwrite=True)
    assert (tmp_path / "png" / "sub" / "mine.png").read_bytes() == b"user"


def test_contours_hostile_keys_fail_alone_and_write_nothing_outside(tmp_path, photo, hed_h5):
    from segsort_unsup.contours.stage import ContoursConfig, run
    from segsort_unsup.io.images import ImageRef

    config = ContoursConfig(model="hed-bsds500", precision="fp32", device="cpu", weights=str(hed_h5))
    out = tmp_path / "deep" / "er" / "out"
    refs = [ImageRef(key, photo) for key in ["good", *_hostile_keys(tmp_path)]]
    summary = run(config.replace(png_dir=str(out / "png"), nms_png=True), refs, out / "store")
    assert summary.done == 1 and len(summary.failed) == len(refs) - 1
    for key, reason in summary.failed:
        assert "\n" not in reason and repr(key) in reason
    assert _outside(tmp_path, out) == []


# -- retrieve --------------------------------------------------------------------------------------
def _prototypes(root: Path, keys: list[str], image: Path) -> Path:
    seg = np.zeros((48, 64), np.int32)
    seg[:, 32:] = 1
    rng = np.random.default_rng(0)
    with StoreWriter(root, kind="prototypes", config={"stage": "t", "keys": keys}) as writer:
        for key in keys:
            protos = rng.standard_normal((2, 8)).astype(np.float32)
            protos /= np.linalg.norm(protos, axis=1, keepdims=True)
            writer.add(Item(key, {"prototypes": protos, "segments": seg, "area": np.array([1536, 1536]),
                                  "bbox": np.zeros((2, 4), np.int32), "label": np.array([0, 1], np.int32)},
                            {"source": str(image)}))
    return root


def test_retrieve_pages_live_in_an_output_folder(tmp_path, photo):
    from segsort_unsup.transfer.retrieve import parse_query, run_retrieve

    store = _prototypes(tmp_path / "s", ["im0", "sub/im1", "im2"], photo)
    out = tmp_path / "out"
    written = run_retrieve(store, store, out, queries=[parse_query("sub/im1:0")], top=2)
    assert written == [out / "sub" / "im1-0.png"]
    assert "src='sub/im1-0.png'" in (out / "index.html").read_text()
    assert set(json.loads((out / MANIFEST_NAME).read_text())["files"]) == {"sub/im1-0.png", "index.html"}
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputFolderError, match="--overwrite"):
        run_retrieve(store, store, out, queries=[parse_query("im0:1")], top=2)
    run_retrieve(store, store, out, queries=[parse_query("im0:1")], top=2, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and not (out / "sub").exists()
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "im0-1.png", "index.html", "notes.txt"]


def test_retrieve_refuses_a_hostile_key_with_one_line_before_writing(tmp_path, photo):
    from segsort_unsup.transfer.retrieve import parse_query, run_retrieve

    for key in _hostile_keys(tmp_path):
        store = _prototypes(tmp_path / "stores" / str(abs(hash(key))), ["good", key], photo)
        with pytest.raises(UnsafeNameError) as err:
            run_retrieve(store, store, tmp_path / "out", queries=[parse_query(f"{key}:0")], top=1)
        assert "\n" not in str(err.value) and repr(key) in str(err.value)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.rglob("*escape*")) and not list(tmp_path.rglob("up-0.png"))


# -- pipeline section names ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../escaped_ucm", "/abs_escape", "a/b", ".hidden", "x\\y"])
def test_hostile_pipeline_section_names_are_refused_with_one_line(tmp_path, name):
    from segsort_unsup.cli import main
    from segsort_unsup.pipeline import load_pipeline

    (tmp_path / "photos").mkdir()
    text = f'[pipeline]\ninput = "photos"\noutput = "out"\n[ucm.{json.dumps(name)}]\nthreshold = 0.3\n'
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(InputError, match="section name") as err:
        load_pipeline(tmp_path / "p.toml")
    assert repr(name) in str(err.value) and "\n" not in str(err.value)
    result = CliRunner().invoke(main, ["run", str(tmp_path / "p.toml")])
    assert result.exit_code != 0 and repr(name) in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.toml", "photos"]


@pytest.mark.parametrize("executor", ["local", pytest.param("dask-local", marks=pytest.mark.slow)])
def test_exports_written_by_worker_processes_are_recorded_not_redone(tmp_path, edge_crops, executor, monkeypatch):
    from segsort_unsup.parallel import make_executor
    from segsort_unsup.ucm import export
    from segsort_unsup.ucm.stage import UcmConfig, run

    src = _contours_store(tmp_path / "contours", ["a", "sub/b", "c"], edge_crops)
    reference = tmp_path / "reference"
    run(UcmConfig(png_dir=str(reference)), src, tmp_path / "ref-seg")
    redone = []
    real = export.export_item
    monkeypatch.setattr(export, "export_item", lambda item, *a, **k: (redone.append(item.key), real(item, *a, **k)))
    out = tmp_path / "png"
    with make_executor(executor, workers=2) as workers:
        summary = run(UcmConfig(png_dir=str(out)), src, tmp_path / "seg", executor=workers)
    assert (summary.done, summary.failed) == (3, []) and redone == []  # the workers' files, recorded as found
    listed = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert listed == {rel: (reference / rel).stat().st_size for rel in listed} and len(listed) == 9
    for rel in listed:
        assert (out / rel).read_bytes() == (reference / rel).read_bytes(), rel
    from segsort_unsup.io.outdir import OutputFolder

    with OutputFolder(out, kind="ucm-png", identity={"other": 1}, overwrite=True):
        pass  # the subfolder the workers wrote into was created, and listed, by this process: it goes
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME]
