"""The input/output rule: an input folder never yields what the tool wrote (its output inside the
input, a store, exported pictures), hidden files are skipped with a count, and an input that is
the output folder of a single command is refused."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from segsort_unsup.cli import main
from segsort_unsup.errors import InputError
from segsort_unsup.io.images import excluding_outputs, list_images
from segsort_unsup.io.store import StoreReader
from segsort_unsup.pipeline import load_pipeline, run_pipeline

IDS = ("100007", "100039")


def _photos(bsds, folder):
    folder.mkdir(parents=True, exist_ok=True)
    for image_id in IDS:
        rgb = cv2.imread(str(bsds / "images" / "test" / f"{image_id}.jpg"))
        cv2.imwrite(str(folder / f"{image_id}.png"), cv2.resize(rgb, (96, 64), interpolation=cv2.INTER_AREA))


@pytest.mark.parametrize("output", ["out", "."])  # output inside the input, and output == input
def test_a_pipeline_writing_into_its_input_does_not_grow(bsds, pidinet_dir, tmp_path, output):
    photos = tmp_path / "photos"
    _photos(bsds, photos)
    path = photos / "p.toml"
    path.write_text(f"""
[pipeline]
input = "."
output = "{output}"
workers = 1
[contours]
model = "pidinet-tiny"
precision = "fp32"
weights = "{pidinet_dir / 'table5_pidinet-tiny.pth'}"
png_dir = "png/contours"
[ucm]
png_dir = "png/segments"
""")
    for _ in range(3):
        summaries = run_pipeline(load_pipeline(path))
        assert [s.total for s in summaries] == [len(IDS), len(IDS)]  # not 2 -> 10 -> 42
        assert all(s.ok for s in summaries)
    with StoreReader(photos / output / "segments", kind="segments") as store:
        assert store.keys() == sorted(IDS)
    assert len(list((photos / output / "png" / "segments").glob("*_overview.png"))) == len(IDS)


def test_lister_skips_hidden_files_and_tool_folders_saying_how_many(tmp_path, caplog):
    for rel in ("a.png", "sub/b.png", ".hidden.png", ".cache/c.png", "store/x.png", "labels/y.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / rel), np.zeros((4, 4), np.uint8))
    (tmp_path / "store" / "store.json").write_text("{}")
    (tmp_path / "labels" / "transfer.json").write_text("{}")
    with caplog.at_level(logging.INFO, logger="segsort_unsup"):
        keys = [ref.key for ref in list_images(tmp_path)]
    assert keys == ["a", "sub/b"]
    assert "2 hidden file(s) or folder(s)" in caplog.text and "2 output folder(s)" in caplog.text
    assert [ref.key for ref in list_images(f"{tmp_path}/**/*.png")] == ["a", "sub/b"]
    with excluding_outputs(tmp_path / "sub"):
        assert [ref.key for ref in list_images(tmp_path)] == ["a"]
        with pytest.raises(InputError, match="output folder"):
            list_images(tmp_path / "sub")


def test_a_command_whose_output_is_its_input_is_refused_in_one_line(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8), np.uint8))
    result = CliRunner().invoke(main, ["ucm", str(tmp_path), "-o", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "is (or lies inside) this run's output folder" in result.output
    assert "Traceback" not in result.output
