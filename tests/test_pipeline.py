"""`segsort-unsup run` on pipeline TOML files: validation, a real small run, resume."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from segsort_unsup.cli import main
from segsort_unsup.errors import InputError
from segsort_unsup.io.store import StoreReader
from segsort_unsup.pipeline import load_pipeline


def _write(tmp_path, text):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("[pipeline]\ninput='a'\n", "needs output"),
    ("[pipeline]\ninput='a'\noutput='b'\n[contour]\n", "unknown section"),
    ("[pipeline]\ninput='a'\noutput='b'\n[ucm]\nthreshhold=0.3\n", "threshhold"),
    ("[pipeline]\ninput='a'\noutput='b'\n[evaluate]\nworkers=2\n", "ground_truth"),
    ("[pipeline\n", "not valid TOML"),
])
def test_bad_files_name_the_problem(tmp_path, text, message):
    with pytest.raises(InputError, match=message):
        load_pipeline(_write(tmp_path, text))


def test_repo_pipelines_parse():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.toml")):
        pipe = load_pipeline(path)
        assert pipe.stages["contours"] is not None and pipe.output.is_absolute()


@pytest.mark.slow
def test_run_small_bsds_pipeline_and_resume(tmp_path, bsds, pidinet_dir):
    ids = ["100007", "101027", "10081"]
    (tmp_path / "list.txt").write_text("".join(f"{bsds}/images/test/{i}.jpg\n" for i in ids))
    gt = tmp_path / "gt"
    gt.mkdir()
    for i in ids:
        (gt / f"{i}.mat").symlink_to(bsds / "groundTruth" / "test" / f"{i}.mat")
    path = _write(tmp_path, f"""
[pipeline]
input = "list.txt"
output = "out"
[contours]
model = "pidinet-tiny"
weights = "{pidinet_dir / 'table5_pidinet-tiny.pth'}"
[ucm]
levels = [0.3, 0.6]
png = true
[evaluate]
ground_truth = "gt"
thresholds = 9
""")
    first = CliRunner().invoke(main, ["-q", "run", str(path)])
    assert first.exit_code == 0, first.output
    assert "boundaries ODS 0." in first.output and "covering 0." in first.output
    with StoreReader(tmp_path / "out" / "segments", kind="segments") as store:
        assert store.keys() == sorted(ids)
        assert store[ids[0]].arrays["labels_levels"].shape[0] == 2
    assert (tmp_path / "out" / "png" / "segments" / f"{ids[0]}_overview.png").is_file()
    summary = json.loads((tmp_path / "out" / "eval-segments" / "summary.json").read_text())
    assert summary["images"] == 3 and 0.5 < summary["boundaries"]["ods"] < 1
    assert 0.3 < summary["regions"]["covering_ods"] < 1
    again = CliRunner().invoke(main, ["-q", "run", str(path)])
    assert again.exit_code == 0 and "contours: 0 done, 3 already complete" in again.output
    assert "ucm: 0 done, 3 already complete" in again.output
