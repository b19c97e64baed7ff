"""`segsort-unsup inspect` on a real store, a model file, a run folder, and bad paths."""

import json

import numpy as np
from click.testing import CliRunner

from segsort_unsup.cli import main
from segsort_unsup.io.store import Item, StoreWriter


def test_store_model_and_run_folder(tmp_path):
    run = tmp_path / "run"
    with StoreWriter(run / "feats", kind="k", config={"alpha": 1}) as w:
        w.add(Item("a", {"x": np.zeros((2, 3), np.float32)}))
        w.record_failure("b", "unreadable photo")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    from segsort_unsup.embed.model import build_model, save_model

    save_model(run / "model.pt", build_model({"backbone": "scratch", "feature_layer": "conv4_3"}),
               provenance={"identity_hash": "h"})
    out = CliRunner().invoke(main, ["inspect", str(run / "feats")])
    assert out.exit_code == 0, out.output
    assert "store (k)" in out.output and "1 complete, 1 failed" in out.output and "failed b: unreadable photo" in out.output
    assert "dataset x: float32 (2, 3)" in out.output and "alpha = 1" in out.output
    data = json.loads(CliRunner().invoke(main, ["inspect", str(run), "--json"]).output)
    assert data["type"] == "run folder" and data["last_metrics"] == {"step": 2, "loss": 1.5}
    assert data["model"]["provenance"]["identity_hash"] == "h" and data["stores"]["feats"]["items_complete"] == 1
    bad = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert bad.exit_code != 0 and "holds no segsort-unsup store" in bad.output


def test_devices_and_empty_or_foreign_model_files_get_one_line(tmp_path):
    device = CliRunner().invoke(main, ["inspect", "/dev/null"])
    assert device.exit_code == 2 and "neither a file nor a folder" in device.output, device.output
    empty = tmp_path / "model.pt"
    empty.write_bytes(b"")
    result = CliRunner().invoke(main, ["inspect", str(empty)])
    assert result.exit_code == 1 and "empty file (0 bytes" in result.output, result.output
    assert "unexpected" not in result.output
    empty.write_bytes(b"PK\x03\x04 truncated zip")
    result = CliRunner().invoke(main, ["inspect", str(empty)])
    assert result.exit_code == 1 and "not a readable segsort-unsup model" in result.output, result.output


def test_a_trained_models_provenance_reads_as_fields(tmp_path, bsds, hed_h5, monkeypatch):
    import hashlib

    from segsort_unsup.cli import run
    from tests.embed.train_data import make_segments

    monkeypatch.setenv("SEGSORT_UNSUP_HOME", str(tmp_path / "home"))
    assert run(["-q", "weights", "fetch", "--model", "hed-bsds500", "--from", str(hed_h5)]) == 0
    store, images = make_segments(bsds, tmp_path, ids=("100007", "100039"), scale=0.25)
    assert run(["-q", "train", str(store), "-o", str(tmp_path / "run"), "--mode", "cached", "--steps", "1",
                "--batch-size", "2", "--crop", "48", "--feature-scales", "1", "--head", "conv1"]) == 0
    model = tmp_path / "run" / "model.pt"
    info = json.loads(CliRunner().invoke(main, ["inspect", str(model), "--json"]).output)
    provenance = info["provenance"]
    # the HED trunk loaded from the cache: its weights are named by their sha256 (the file fetched)
    cached = next((tmp_path / "home").rglob("hed*"))
    assert provenance["backbone_weights_sha256"] == hashlib.sha256(cached.read_bytes()).hexdigest()
    assert isinstance(provenance["train_config"], dict) and provenance["train_config"]["steps"] == 1
    assert provenance["train_config"]["freeze_blocks"] == info["model_config"]["freeze_blocks"] == 4
    text = CliRunner().invoke(main, ["inspect", str(model)]).output
    assert "train_config:" in text and "lr = 0.002" in text and '\\"' not in text
