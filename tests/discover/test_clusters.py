"""Label-free cluster maps (k-means / FINCH) and their Hungarian-matched mIoU, against restatements."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from segsort_unsup.discover.clusters import ClusterConfig, cluster_rows, run
from segsort_unsup.io.images import read_label_png
from segsort_unsup.io.store import Item, StoreWriter


def _blobs(rng, centres, per, noise=0.05):
    x = np.repeat(centres, per, axis=0) + noise * rng.standard_normal((len(centres) * per, centres.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.repeat(np.arange(len(centres)), per)


@pytest.mark.parametrize("method", ["kmeans", "finch"])
def test_separated_groups_are_recovered_by_both_methods(method):
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    x, truth = _blobs(rng, rng.standard_normal((6, 24)), 150)
    found = cluster_rows(x, 6, method=method, seed=3)
    assert adjusted_rand_score(truth, found) == 1.0
    assert sorted(np.unique(found)) == list(range(6))


def test_finch_method_is_finch_clust_req_partition():
    """The peer: the finch-clust package's partition with exactly req_clust groups."""
    finch_clust = pytest.importorskip("finch")
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(1)
    x = rng.standard_normal((900, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ours = cluster_rows(x, 9, method="finch")
    _, _, req = finch_clust.FINCH(x, req_clust=9, distance="cosine", verbose=False)
    assert adjusted_rand_score(req, ours) == 1.0


def test_bad_requests_are_one_line():
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="cannot make 5 clusters of 4"):
        cluster_rows(x, 5)
    with pytest.raises(ValueError, match="NaN"):
        cluster_rows(np.full((4, 2), np.nan, np.float32), 2)
    with pytest.raises(ValueError, match="unknown method"):
        cluster_rows(x, 2, method="dbscan")


def _reference_hungarian_miou(pred_maps, gt_maps, num_classes, ignore):
    """Best one-to-one cluster -> class assignment by brute force over permutations, then mIoU."""
    best = None
    for perm in itertools.permutations(range(num_classes)):
        ious = []
        for c in range(num_classes):
            tp = fp = fn = 0
            for p, g in zip(pred_maps, gt_maps):
                valid = g != ignore
                mapped = np.asarray(perm)[p]
                tp += np.sum((mapped == c) & (g == c) & valid)
                fp += np.sum((mapped == c) & (g != c) & valid)
                fn += np.sum((mapped != c) & (g == c) & valid)
            ious.append(tp / (tp + fp + fn) if tp + fp + fn else np.nan)
        correct = sum(np.sum((np.asarray(perm)[p] == g) & (g != ignore)) for p, g in zip(pred_maps, gt_maps))
        if best is None or correct > best[0]:
            best = (correct, np.nanmean(ious))
    return best[1]


def test_cluster_stage_maps_score_like_a_brute_force_hungarian_match(tmp_path):
    """Prototypes of 3 images in 3 hidden classes (one segment deliberately in the wrong blob): the
    stage's PNGs give each pixel its segment's cluster, and `evaluate semantic --hungarian` equals a
    brute-force best permutation."""
    from segsort_unsup.evaluate.semantic_stage import SemanticConfig, run as score

    rng = np.random.default_rng(2)
    centres = rng.standard_normal((3, 16))
    gts, store = [], tmp_path / "protos"
    (tmp_path / "gt").mkdir()
    with StoreWriter(store, kind="prototypes", config={"stage": "test"}) as writer:
        for i in range(3):
            seg = np.repeat(np.arange(6, dtype=np.int32), 4).reshape(6, 4)  # 6 segments, 4 px each
            hidden = rng.integers(0, 3, 6)
            x, _ = _blobs(rng, centres[hidden], 1)
            if i == 0:
                x[0] = _blobs(rng, centres[(hidden[0] + 1) % 3][None], 1)[0][0]  # a wrong-looking segment
            gt = hidden[seg].astype(np.uint8)
            gt[0, 0] = 11  # void
            Image.fromarray(gt).save(tmp_path / "gt" / f"im{i}.png")
            gts.append(gt)
            arrays = {"prototypes": x, "segments": seg, "area": np.full(6, 4, np.int64),
                      "bbox": np.zeros((6, 4), np.int32)}
            writer.add(Item(f"im{i}", arrays))
    summary = run(ClusterConfig(groups=3, method="kmeans"), store, tmp_path / "clusters")
    assert summary.ok and summary.done == 3
    preds = [read_label_png(tmp_path / "clusters" / f"im{i}.png").astype(np.int64) for i in range(3)]
    assert all(p.max() < 3 for p in preds)
    result = score(SemanticConfig(ground_truth=str(tmp_path / "gt"), num_classes=3, ignore_label=11, hungarian=True),
                   tmp_path / "clusters", tmp_path / "sem")
    import json

    miou = json.loads((tmp_path / "sem" / "semantic.json").read_text())["miou"]
    assert result.ok
    assert miou == pytest.approx(_reference_hungarian_miou(preds, gts, 3, 11), abs=1e-9)
    assert miou < 1.0  # the wrong-looking segment costs something: the score is not trivially perfect


def test_cluster_command_exit_codes_through_the_installed_script(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "segsort-unsup"
    rng = np.random.default_rng(4)
    with StoreWriter(tmp_path / "p", kind="prototypes", config={"stage": "test"}) as writer:
        for i in range(2):
            seg = np.arange(4, dtype=np.int32).reshape(2, 2)
            x, _ = _blobs(rng, rng.standard_normal((4, 8)), 1)
            writer.add(Item(f"im{i}", {"prototypes": x, "segments": seg, "area": np.ones(4, np.int64),
                                       "bbox": np.zeros((4, 4), np.int32)}))
    ok = subprocess.run([script, "-q", "cluster", tmp_path / "p", "-o", tmp_path / "c", "--groups", "3"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert sorted(p.name for p in (tmp_path / "c").glob("*.png")) == ["im0.png", "im1.png"]
    too_many = subprocess.run([script, "cluster", tmp_path / "p", "-o", tmp_path / "d", "--groups", "9"],
                              capture_output=True, text=True)
    assert too_many.returncode != 0 and "cannot make 9 clusters of 8" in too_many.stderr
    assert "Traceback" not in too_many.stderr
