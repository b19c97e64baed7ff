"""EdgeDetector: batching, multiscale, tiling, tiny images, precision choice, file prefetching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segsort_unsup.contours.detect import EdgeDetector
from segsort_unsup.errors import BadImageError, InputError
from segsort_unsup.io.images import ImageRef, read_image
from segsort_unsup.runtime import cpu_has_fast_bf16, resolve_precision


@pytest.fixture(scope="module")
def image(bsds):
    return read_image(bsds / "images" / "test" / "100007.jpg")  # 321 x 481


@pytest.fixture(scope="module")
def fp32(hed_h5):
    return EdgeDetector("hed-bsds500", weights_path=hed_h5, precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def bf16(hed_h5):
    return EdgeDetector("hed-bsds500", weights_path=hed_h5, precision="bf16", device="cpu")


def _net(detector, rgb):
    with torch.inference_mode():
        return detector.network(torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float())[0, 0].numpy()


def test_batched_equals_one_by_one(fp32, image):
    a, b = image[:64, :96], image[100:164, 200:296]
    c = image[:50, :70]  # another size: its own group
    out = fp32.detect_many([a, c, b])
    for img, prob in zip((a, c, b), out, strict=True):
        assert prob.shape == img.shape[:2] and prob.dtype == np.float32
        assert np.abs(prob - _net(fp32, img)).max() < 1e-5


def test_multiscale_is_the_average_of_rescaled_runs(hed_h5, fp32, image):
    crop = np.ascontiguousarray(image[:96, :128])
    multi = EdgeDetector("hed-bsds500", weights_path=hed_h5, precision="fp32", device="cpu", scales=(0.5, 1.0))
    x = torch.from_numpy(np.array(crop)).permute(2, 0, 1)[None].float()
    with torch.inference_mode():
        half = F.interpolate(x, size=(48, 64), mode="bilinear", align_corners=False, antialias=True)
        up = F.interpolate(fp32.network(half), size=(96, 128), mode="bilinear", align_corners=False)
        expected = ((up + fp32.network(x)) / 2)[0, 0].numpy()
    assert np.abs(multi.detect(crop) - expected).max() < 1e-5


def test_tiles_match_whole_image(hed_h5, bf16, image):
    crop = np.ascontiguousarray(image[:320, :480])  # sizes on the /32 grid: tiles reproduce the whole
    tiled = EdgeDetector("hed-bsds500", weights_path=hed_h5, precision="bf16", device="cpu", max_side=384, tile_overlap=256)
    whole, pieces = bf16.detect(crop), tiled.detect(crop)
    assert np.abs(whole - pieces).max() < 0.01
    # odd sizes: HED's stretched deep sides differ between sizes, but the maps stay close on average
    odd = tiled.detect(image)
    assert odd.shape == image.shape[:2]
    assert np.abs(odd - bf16.detect(image)).mean() < 0.01


def test_refuses_large_images_without_tiling(hed_h5, image):
    strict = EdgeDetector("hed-bsds500", weights_path=hed_h5, precision="bf16", device="cpu", max_side=400, tile=False)
    with pytest.raises(BadImageError, match="max-side"):
        strict.detect(image)


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (3, 3), (5, 40), (31, 31)])
def test_tiny_images(fp32, image, size):
    crop = image[150 : 150 + size[0], 200 : 200 + size[1]]
    prob = fp32.detect(crop)
    assert prob.shape == size and np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1


def test_flat_tiny_image_has_no_edges(fp32):
    # Without padding a 1x1 image would see only zero padding: p = 0.43 for a flat grey pixel.
    assert fp32.detect(np.full((1, 1, 3), 200, np.uint8)).max() < 0.05
    assert fp32.detect(np.full((4, 9, 3), 90, np.uint8)).max() < 0.05


def test_bad_arguments(hed_h5):
    with pytest.raises(InputError):
        EdgeDetector("hed-bsds500", weights_path=hed_h5, scales=())
    with pytest.raises(InputError):
        EdgeDetector("hed-bsds500", weights_path=hed_h5, precision="int8")


def test_detect_files_reports_bad_files_and_goes_on(tmp_path, bf16, image):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray(np.ascontiguousarray(image[:40, :60])).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    refs = [ImageRef("bad", bad), ImageRef("good", good), ImageRef("missing", tmp_path / "missing.png")]
    results = {d.ref.key: d for d in bf16.detect_files(refs, prefetch=2)}
    assert set(results) == {"bad", "good", "missing"}
    assert results["good"].edge.shape == (40, 60) and results["good"].error is None
    assert isinstance(results["bad"].error, BadImageError) and results["bad"].edge is None
    assert isinstance(results["missing"].error, BadImageError)


def test_auto_precision_per_model(pidinet_dir):
    from segsort_unsup.contours.registry import get_model

    cpu = torch.device("cpu")
    fast = "bf16" if cpu_has_fast_bf16() else "fp32"

    def auto(name, precision="auto"):
        return resolve_precision(precision, cpu, cpu_bf16=get_model(name).cpu_bf16)

    assert auto("hed-bsds500") == fast
    assert auto("pidinet") == fast
    assert auto("pidinet-tiny") == "fp32"
    assert auto("pidinet-tiny", "bf16") == "bf16"
    # the detector passes its registry entry's cpu_bf16 on
    tiny = EdgeDetector("pidinet-tiny", weights_path=pidinet_dir / "table5_pidinet-tiny.pth", device="cpu")
    assert tiny.precision == "fp32"


def test_multiscale_tiles_match_the_whole_image_and_keep_scaled_tiles_small(hed_h5, image, monkeypatch):
    """Multi-scale images above max_side are tiled first, each tile run at every scale: close to
    the whole-image multi-scale map, float16 like single-scale tiles, and no network pass is
    larger than the tile side (the largest upscale divides it)."""
    crop = np.ascontiguousarray(image[:320, :480])
    kw = dict(weights_path=hed_h5, precision="bf16", device="cpu", scales=(0.5, 1.0, 1.5))
    whole = EdgeDetector("hed-bsds500", **kw).detect(crop)
    tiled = EdgeDetector("hed-bsds500", max_side=448, tile_side=448, tile_overlap=128, **kw)
    assert tiled.multi_scale_tile_side == 288  # 448 / 1.5 on the 32-px grid
    sides = []
    run_network = tiled._run_network
    monkeypatch.setattr(tiled, "_run_network", lambda x: sides.append(max(x.shape[-2:])) or run_network(x))
    pieces = tiled.detect(crop)
    assert pieces.dtype == np.float16 and pieces.shape == whole.shape
    assert max(sides) <= 448 and len(sides) > 3 * 2  # several tiles, three scales each
    assert np.abs(whole - pieces.astype(np.float32)).mean() < 0.01
    assert np.abs(whole - pieces.astype(np.float32)).max() < 0.1
