from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segsort_unsup.errors import BadImageError, InputError
from segsort_unsup.io.images import list_images, read_edge_png, read_image, read_label_png, read_png


def _save(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def test_read_real_jpeg(bsds):
    img = read_image(bsds / "images" / "test" / "100007.jpg")
    assert img.dtype == np.uint8 and img.shape in ((321, 481, 3), (481, 321, 3))


def test_modes_become_rgb8(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    assert np.array_equal(read_image(_save(tmp_path / "rgb.png", rgb)), rgb)
    g = read_image(_save(tmp_path / "g.png", gray))
    assert g.shape == (5, 7, 3) and np.array_equal(g[..., 1], gray)
    rgba = np.dstack([rgb, np.full((5, 7), 255, np.uint8)])
    assert np.array_equal(read_image(_save(tmp_path / "rgba.png", rgba)), rgb)
    g16 = (gray.astype(np.uint16) * 257)
    out16 = read_image(_save(tmp_path / "g16.png", g16))
    assert np.abs(out16[..., 0].astype(int) - gray).max() <= 1
    one = read_image(_save(tmp_path / "one.png", rgb[:1, :1]))
    assert one.shape == (1, 1, 3)


@pytest.mark.parametrize("mode", ["RGB", "L", "I;16", "RGBA", "LA"])
def test_large_images_are_copied_out_in_strips_exactly(tmp_path, monkeypatch, mode):
    """Above a size, pixels leave PIL strip by strip (no whole-image tobytes): the same array as
    np.asarray gives, for every mode, also with EXIF orientation applied (a transposed copy)."""
    from PIL import ImageOps

    from segsort_unsup.io import images

    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 256, (53, 71, 3), dtype=np.uint8)).convert(mode)
    if mode == "I;16":
        base = Image.fromarray(rng.integers(0, 65536, (53, 71), dtype=np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: read_image must turn it
    path = tmp_path / f"im_{mode.replace(';', '')}.png"
    base.save(path, exif=exif)
    whole = read_image(path)
    monkeypatch.setattr(images, "STRIP_BYTES", 64)  # a handful of rows per strip, the last one partial
    stripped = read_image(path)
    assert np.array_equal(stripped, whole) and stripped.shape[:2] == (71, 53)
    with Image.open(path) as im:
        im.load()
        turned = ImageOps.exif_transpose(im)
        assert np.array_equal(images._pixels(turned), np.asarray(turned))


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty"), (b"this is not an image", "not an image"), (None, "truncated")],
)
def test_bad_files_name_file_and_reason(tmp_path, bsds, content, reason):
    path = tmp_path / "bad.jpg"
    if content is None:  # a real JPEG cut in half
        data = (bsds / "images" / "test" / "100007.jpg").read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(BadImageError) as info:
        read_image(path)
    assert str(path) in str(info.value) and reason in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(BadImageError, match="not found"):
        read_image(tmp_path / "nope.png")


def test_list_sources(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    _save(tmp_path / "d" / "a.png", rgb)
    _save(tmp_path / "d" / "sub" / "b.jpg", rgb)
    (tmp_path / "d" / "notes.md").write_text("x")
    keys = [r.key for r in list_images(tmp_path / "d")]
    assert keys == ["a", "sub/b"]
    assert [r.key for r in list_images(str(tmp_path / "d" / "**" / "*.jpg"))] == ["sub/b"]
    lst = tmp_path / "d" / "list.txt"
    lst.write_text("# comment\na.png\n\nsub/b.jpg\nmissing.png\n")
    refs = list_images(lst)
    assert [r.key for r in refs] == ["a", "missing", "sub/b"]
    with pytest.raises(InputError, match="no such"):
        list_images(tmp_path / "nothing-here")
    _save(tmp_path / "d" / "a.jpg", rgb)
    with pytest.raises(InputError, match="same key"):
        list_images(tmp_path / "d")


# -- edge maps ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_edges(bsds):
    """BSR's bench_sample edge maps: real 8-bit edge-probability PNGs."""
    paths = sorted((bsds / "bench_sample" / "png").glob("*.png"))
    assert len(paths) == 5
    return paths


def test_real_edge_maps_are_read(bench_edges):
    for path in bench_edges:
        edge = read_edge_png(path)
        raw = np.asarray(Image.open(path))
        assert edge.dtype == np.float32 and edge.shape == raw.shape
        np.testing.assert_array_equal(edge, raw.astype(np.float32) / np.float32(255))


def test_edge_map_saved_as_rgb_reads_as_grey(tmp_path, bench_edges):
    raw = np.asarray(Image.open(bench_edges[0]))
    grey = read_edge_png(bench_edges[0])
    rgb = np.dstack([raw] * 3)
    np.testing.assert_array_equal(read_edge_png(_save(tmp_path / "rgb.png", rgb)), grey)
    rgba = np.dstack([rgb, np.full(raw.shape, 255, np.uint8)])
    np.testing.assert_array_equal(read_edge_png(_save(tmp_path / "rgba.png", rgba)), grey)
    la = np.dstack([raw, np.full(raw.shape, 255, np.uint8)])
    np.testing.assert_array_equal(read_edge_png(_save(tmp_path / "la.png", la)), grey)


def test_edge_map_bit_depths(tmp_path):
    ramp8 = np.arange(0, 100, dtype=np.uint8).reshape(10, 10)  # all below 0.5
    np.testing.assert_array_equal(read_edge_png(_save(tmp_path / "e8.png", ramp8)), ramp8 / np.float32(255))
    ramp16 = ramp8.astype(np.uint16) * 257
    np.testing.assert_allclose(read_edge_png(_save(tmp_path / "e16.png", ramp16)), ramp8 / 255, rtol=1e-6)
    thin = np.zeros((8, 8), bool)
    thin[3] = True
    np.testing.assert_array_equal(read_edge_png(_save(tmp_path / "e1.png", thin)), thin.astype(np.float32))


def test_colour_photo_is_refused_as_edge_map(bsds):
    photo = bsds / "images" / "test" / "100007.jpg"
    with pytest.raises(BadImageError, match="looks like a colour photo, not an edge map") as info:
        read_edge_png(photo)
    assert "segsort-unsup contours" in str(info.value) and str(photo) in str(info.value)


def test_grey_photo_and_inverted_map_are_refused(tmp_path, bsds, bench_edges):
    grey = np.asarray(Image.open(bsds / "images" / "test" / "100007.jpg").convert("L"))
    with pytest.raises(BadImageError, match="does not look like an edge map"):
        read_edge_png(_save(tmp_path / "grey-photo.png", grey))
    inverted = 255 - np.asarray(Image.open(bench_edges[0]))  # white background, dark edges
    with pytest.raises(BadImageError, match="does not look like an edge map"):
        read_edge_png(_save(tmp_path / "inverted.png", inverted))


def test_soft_real_contour_map_is_accepted(tmp_path, bsds):
    """The blurred mean of BSDS500 human boundaries (a soft, multi-pixel-wide contour map)."""
    from tests.ucm.maps import gt_contour_map

    edge = gt_contour_map(bsds / "groundTruth" / "test" / "100007.mat")
    path = _save(tmp_path / "soft.png", np.round(edge * 255).astype(np.uint8))
    np.testing.assert_allclose(read_edge_png(path), edge, atol=0.5 / 255 + 1e-6)


def test_bad_edge_files(tmp_path):
    with pytest.raises(BadImageError, match="file not found"):
        read_edge_png(tmp_path / "missing.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(BadImageError, match="corrupt.png"):
        read_edge_png(tmp_path / "corrupt.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadImageError, match="not an image"):
        read_edge_png(tmp_path / "empty.png")


# -- single-channel PNGs (labels, boundary maps) ----------------------------------------------------
def test_label_and_grey_pngs(tmp_path):
    labels = np.array([[0, 1, 2], [3, 4, 255]], np.uint8)
    np.testing.assert_array_equal(read_label_png(_save(tmp_path / "l.png", labels)), labels)
    np.testing.assert_array_equal(read_label_png(_save(tmp_path / "l3.png", np.dstack([labels] * 3))), labels)
    wide = np.array([[0, 300], [1000, 65535]], np.uint16)
    np.testing.assert_array_equal(read_label_png(_save(tmp_path / "l16.png", wide)), wide)
    np.testing.assert_array_equal(read_png(tmp_path / "l16.png"), wide / 65535.0)
    np.testing.assert_array_equal(read_png(tmp_path / "l.png"), labels / 255.0)
    colour = np.zeros((2, 3, 3), np.uint8)
    colour[..., 0] = 9
    with pytest.raises(BadImageError, match="single-channel"):
        read_label_png(_save(tmp_path / "c.png", colour))
