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
    ("[pipeline]\ninput='a'\noutput='b'\n[evaluate]\nthresholds=9\n", r"\[evaluate\]: key 'ground_truth'"),
    ("[pipeline]\ninput='a'\noutput='b'\n[contours]\nscales=1.0\n",
     r"p.toml \[contours\]: key 'scales' expects list of float, got float 1.0 \(example: scales = \[0.5, 0.5\]\)"),
    ("[pipeline]\ninput='a'\noutput='b'\n[contours]\nshard_size=0\n", r"\[contours\]: key 'shard_size': must be >= 1"),
    ("[pipeline]\ninput='a'\noutput='b'\n[ucm]\nlevels=['x']\n", r"\[ucm\]: key 'levels' expects list of float"),
    ("[pipeline]\ninput='a'\noutput='b'\n[contours]\nweights='missing.pth'\n", r"\[contours\]: key 'weights': .*does not exist"),
    ("[pipeline]\ninput='a'\noutput='b'\nexecutor='spark'\n", "executor 'spark'"),
    ("[pipeline]\ninput='a'\noutput='b'\nworkers='2'\n", "'workers' expects int"),
    ("[pipeline\n", "not valid TOML"),
])
def test_bad_files_name_the_problem(tmp_path, text, message):
    with pytest.raises(InputError, match=message):
        load_pipeline(_write(tmp_path, text))


def test_repo_pipelines_parse():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.toml")):
        if (path.with_suffix(".py")).is_file():
            continue  # read by its own driver script (camvid.toml: two trains and two embeds)
        pipe = load_pipeline(path)
        assert pipe.configs["contours"] is not None and pipe.output.is_absolute()


def test_output_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "b").write_text("x")
    with pytest.raises(InputError, match="output .* is a file"):
        load_pipeline(_write(tmp_path, "[pipeline]\ninput='a'\noutput='b'\n"))


def test_registry_drives_the_pipeline():
    from segsort_unsup.stages import registry

    names = [stage.name for stage in registry()]
    assert names == ["contours", "ucm", "train", "embed", "transfer", "semantic", "discover", "evaluate"]
    for stage in registry():
        assert stage.config.stage == stage.name and callable(stage.run)


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
png_dir = "png/segments"
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
    summary = json.loads((tmp_path / "out" / "eval" / "segments" / "summary.json").read_text())
    assert summary["images"] == 3 and 0.5 < summary["boundaries"]["ods"] < 1
    assert 0.3 < summary["regions"]["covering_ods"] < 1
    again = CliRunner().invoke(main, ["-q", "run", str(path)])
    assert again.exit_code == 0 and "contours: 0 done, 3 already complete" in again.output
    assert "ucm: 0 done, 3 already complete" in again.output
    assert "evaluate segments: 0 done, 3 already complete" in again.output  # nothing recomputed
    # one changed key re-runs that stage and what follows it, nothing upstream
    path.write_text(path.read_text().replace("levels = [0.3, 0.6]", "levels = [0.3, 0.6]\nthreshold = 0.4"))
    changed = CliRunner().invoke(main, ["-q", "run", str(path)])
    assert changed.exit_code == 0, changed.output
    assert "contours: 0 done, 3 already complete" in changed.output
    assert "ucm: 3 done, 0 already complete" in changed.output
    assert "evaluate segments: 3 done" in changed.output and "evaluate contours: 0 done, 3 already complete" in changed.output
