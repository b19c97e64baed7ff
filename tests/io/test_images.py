from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segsort_unsup.errors import BadImageError, InputError
from segsort_unsup.io.images import list_images, read_image


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
