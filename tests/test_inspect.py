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
