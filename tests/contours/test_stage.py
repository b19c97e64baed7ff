"""The contours stage: the contours-store contract, PNGs, resuming, and what the config hash covers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segsort_unsup.contours.detect import EdgeDetector
from segsort_unsup.contours.stage import ContoursConfig, run
from segsort_unsup.edgemaps import edge_orientation
from segsort_unsup.errors import StoreError
from segsort_unsup.io.store import StoreReader

SIZES = {"a": (48, 64), "b": (48, 64), "sub/c": (40, 72)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory, bsds):
    root = tmp_path_factory.mktemp("images")
    src = np.asarray(Image.open(bsds / "images" / "test" / "100039.jpg").convert("RGB"))
    for i, (key, (h, w)) in enumerate(SIZES.items()):
        path = root / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(src[40 * i : 40 * i + h, 60 * i : 60 * i + w])).save(path)
    return root


def test_store_contract_and_pngs(tmp_path, folder, hed_h5):
    config = ContoursConfig(model="hed-bsds500", precision="fp32", device="cpu", batch_size=2, weights=str(hed_h5),
                            png_dir=str(tmp_path / "png"), nms_png=True)
    summary = run(config, str(folder), tmp_path / "store")
    assert (summary.done, summary.skipped, summary.failed, summary.total) == (3, 0, [], 3)
    detector = EdgeDetector("hed-bsds500", weights_path=hed_h5, precision="fp32", device="cpu")
    with StoreReader(tmp_path / "store", kind="contours", required=("edge", "orientation")) as store:
        assert store.keys() == sorted(SIZES)
        assert store.meta["model"] == "hed-bsds500" and store.meta["weights_sha256"].startswith("4502df9d")
        for key, shape in SIZES.items():
            item = store[key]
            edge, orient = item.arrays["edge"], item.arrays["orientation"]
            assert edge.dtype == np.float16 and orient.dtype == np.float16 and edge.shape == shape
            expected = detector.detect(np.asarray(Image.open(folder / f"{key}.png")))
            assert np.abs(edge.astype(np.float32) - expected).max() < 1e-3  # float16 rounding
            assert np.abs(orient.astype(np.float32) - edge_orientation(expected)).max() < 2e-3
            assert 0 <= orient.min() and float(orient.max()) < np.pi  # float16 pi would round down
            attrs = item.attrs
            assert attrs["source"] == str((folder / f"{key}.png").resolve())  # absolute: usable from anywhere
            assert (attrs["height"], attrs["width"]) == shape
            assert attrs["model"] == "hed-bsds500" and attrs["precision"] == "fp32" and attrs["scales"] == "1"
            assert attrs["weights_sha256"] == store.meta["weights_sha256"]
            png = np.asarray(Image.open(tmp_path / "png" / f"{key}.png"))
            assert png.dtype == np.uint8 and png.shape == shape
            assert np.abs(png / 255.0 - expected).max() <= 0.5 / 255 + 1e-3
            assert (tmp_path / "png" / "nms" / f"{key}.png").is_file()


def test_rerun_skips_done_items_and_checks_config(tmp_path, folder, hed_h5):
    out = tmp_path / "store"
    base = ContoursConfig(model="hed-bsds500", precision="bf16", device="cpu", weights=str(hed_h5))
    first = run(base, str(folder), out)
    assert first.done == 3
    # batch size, shard size and PNGs do not change results: the store resumes
    again = run(base.replace(batch_size=1, shard_size=2, png_dir=str(tmp_path / "png")), str(folder), out)
    assert (again.done, again.skipped) == (0, 3)
    # scales and precision do: refused unless --overwrite
    with pytest.raises(StoreError, match="scales"):
        run(base.replace(scales=(0.5, 1)), str(folder), out)
    with pytest.raises(StoreError, match="precision"):
        run(base.replace(precision="fp32"), str(folder), out)
    redo = run(base.replace(precision="fp32"), str(folder), out, overwrite=True)
    assert (redo.done, redo.skipped) == (3, 0)


def test_config_hash_covers_results_only():
    config = ContoursConfig(model="hed-bsds500", scales=[1, 0.5])
    assert config.scales == (1.0, 0.5)
    hashed = config.identity(weights_sha256="ab" * 32, precision="bf16")
    assert {"model", "weights_sha256", "precision", "scales"} <= set(hashed)
    assert not {"batch_size", "device", "threads", "shard_size", "weights", "png_dir"} & set(hashed)
    assert hashed["precision"] == "bf16" and config.to_dict()["batch_size"] is None
    assert config.identity_hash(weights_sha256="ab" * 32) == config.replace(
        batch_size=4, threads=1, shard_size=2).identity_hash(weights_sha256="ab" * 32)


def test_tile_side_is_part_of_the_identity(tmp_path, folder, pidinet_dir):
    """The store records the tile side 'auto' resolves to: naming the same side resumes, another
    side (which changes tiled images) is refused."""
    from segsort_unsup.contours.detect import auto_tile_side

    out = tmp_path / "store"
    base = ContoursConfig(model="pidinet-tiny", precision="fp32", device="cpu",
                          weights=str(pidinet_dir / "table5_pidinet-tiny.pth"))
    assert run(base, str(folder), out).done == 3
    side = auto_tile_side("pidinet-tiny", "fp32")
    with StoreReader(out, kind="contours") as store:
        assert store.meta["tile_side"] == side and store.config["tile_side"] == side
    assert run(base.replace(tile_side=side), str(folder), out).skipped == 3
    with pytest.raises(StoreError, match="tile_side"):
        run(base.replace(tile_side=640), str(folder), out)
    with pytest.raises(StoreError, match="max_side, .*tile_side"):  # max_side caps the tiles
        run(base.replace(max_side=640), str(folder), out)
