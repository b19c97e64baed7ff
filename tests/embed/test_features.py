"""The features stage: the frozen trunk's maps of a segments store's images, shared by training runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segsort_unsup.io.store import StoreReader
from tests.embed.train_data import make_segments

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(Path(sys.executable).parent / "segsort-unsup")


@pytest.fixture(scope="module")
def small(tmp_path_factory, bsds, hed_h5):
    root = tmp_path_factory.mktemp("features")
    store, images = make_segments(bsds, root, ids=("100007", "10081"))
    return {"store": store, "images": images, "weights": str(hed_h5)}


def _cli(small, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)


def _features(small, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return _cli(small, "features", str(small["store"]), "-o", str(out), "--images", str(small["images"]),
                "--backbone-weights", small["weights"], "--feature-scales", "0.5,1", "--precision", "fp32",
                "--threads", "2", *extra)


def test_features_command_stores_the_trunks_own_maps_and_train_reuses_them(small, tmp_path):
    from segsort_unsup.embed.losses import segments_to_grid
    from segsort_unsup.embed.model import build_model

    out = tmp_path / "features"
    done = _features(small, out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "features: 8 done, 0 already complete, 0 failed of 8" in done.stderr  # 2 images x 2 scales x 2 flips
    model = build_model({"feature_layer": "conv4_3", "freeze_blocks": 4}, backbone_weights=small["weights"]).eval()
    with StoreReader(out, kind="features") as reader, StoreReader(small["store"], kind="segments") as segments:
        assert sorted(reader.keys()) == sorted(f"{k}@{s}{f}" for k in ("100007", "10081") for s in ("0.5", "1")
                                               for f in ("", "f"))
        for key in ("100007@1f", "10081@0.5"):
            item = reader.read(key)
            rgb = cv2.imread(str(small["images"] / f"{item.attrs['image']}.png"))[..., ::-1]
            seg = segments.read(item.attrs["image"]).arrays["labels"]
            if item.attrs["scale"] != 1:
                h, w = seg.shape
                rgb = cv2.resize(rgb, (round(w * item.attrs["scale"]), round(h * item.attrs["scale"])),
                                 interpolation=cv2.INTER_LINEAR)
            if item.attrs["flip"]:
                rgb, seg = rgb[:, ::-1], seg[:, ::-1]
            with torch.no_grad():
                want = model.features(torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()[None])[0]
            np.testing.assert_allclose(item.arrays["features"].astype(np.float32), want.numpy(),
                                       rtol=2e-3, atol=2e-3 * float(want.abs().max()))  # float16 storage
            grid = item.arrays["segments"].shape
            assert grid == tuple(want.shape[1:])
            np.testing.assert_array_equal(item.arrays["segments"],
                                          segments_to_grid(torch.from_numpy(np.ascontiguousarray(seg))[None],
                                                           grid)[0].numpy())
    again = _features(small, out)
    assert again.returncode == 0 and "0 done, 8 already complete" in again.stderr
    other = _features(small, out, "--no-flip")
    assert other.returncode == 1 and len(other.stderr.strip().splitlines()) == 1, other.stderr
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    trained = _cli(small, "train", str(small["store"]), "-o", str(tmp_path / "run"), "--mode", "cached",
                   "--images", str(small["images"]), "--backbone-weights", small["weights"], "--features-dir",
                   str(out), "--feature-scales", "0.5,1", "--precision", "fp32", "--steps", "2", "--batch-size", "2",
                   "--crop", "64", "--head", "conv1", "--threads", "2")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # the maps were reused


def test_features_is_a_registered_stage_before_train():
    from segsort_unsup.stages import registry

    names = [stage.name for stage in registry()]
    assert names.index("ucm") < names.index("features") < names.index("train")
    help_text = _cli({}, "--help").stdout
    assert "features" in help_text
