"""Adding a stage is one module and one registry line: the command line and pipeline files find it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from segsort_unsup import stages
from segsort_unsup.cli import run
from segsort_unsup.io.store import StoreReader
from segsort_unsup.pipeline import load_pipeline, run_pipeline


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setattr(stages, "STAGE_MODULES", (*stages.STAGE_MODULES, "tests.toy_stage"))


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    expected = {}
    for name in ("a", "b"):
        bgr = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"{name}.png"), bgr)
        expected[name] = bgr[..., ::-1].astype(np.float64)  # what the stage reads: RGB
    return folder, expected


def _means(store) -> dict[str, float]:
    with StoreReader(store, kind="toy") as reader:
        return {key: float(reader[key].arrays["mean"][0]) for key in reader.keys()}


def test_a_registered_stage_is_a_command_with_options_from_its_config(toy_registered, photos, tmp_path, capsys):
    folder, expected = photos
    assert run(["--help"]) == 0
    stage_section = capsys.readouterr().out.split("Stages, in pipeline order:")[1].split("Other commands:")[0]
    assert "toy" in stage_section and "Mean brightness of every photo" in stage_section
    assert run(["toy", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--factor FLOAT multiply each photo's mean brightness by this [default: 2.0]" in help_text
    assert "--channels" in help_text and "--shard-size" in help_text and "--workers" in help_text
    assert run(["-q", "toy", str(folder), "-o", str(tmp_path / "out"), "--factor", "3", "--channels", "1",
                "--workers", "1"]) == 0
    got = _means(tmp_path / "out")
    assert got == pytest.approx({k: 3 * rgb[..., 1].mean() for k, rgb in expected.items()}, rel=1e-6)
    assert run(["toy", str(folder), "-o", str(tmp_path / "bad"), "--factor", "-1"]) == 2
    assert "key 'factor': must be > 0" in capsys.readouterr().err


def test_a_registered_stage_runs_in_pipeline_files(toy_registered, photos, tmp_path):
    folder, expected = photos
    path = tmp_path / "p.toml"
    path.write_text(f'[pipeline]\ninput = "{folder}"\noutput = "out"\nworkers = 1\n'
                    '[contours]\nmodel = "pidinet-tiny"\n[toy]\nfactor = 0.5\n')
    pipeline = load_pipeline(path)
    assert [s.name for s in pipeline.sections][-1] == "toy"
    toy = [s for s in pipeline.sections if s.name == "toy"]
    summaries = run_pipeline(pipeline, from_stage="toy")
    assert summaries[-1].ok and summaries[-1].done == 2
    assert _means(toy[0].output) == pytest.approx({k: 0.5 * rgb.mean() for k, rgb in expected.items()}, rel=1e-6)
