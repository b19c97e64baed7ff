"""Semantic scores: a hand-checked example, and CamVid labels with a known corruption."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segsort_unsup.cli import main
from segsort_unsup.evaluate.semantic import confusion_matrix, hungarian_mapping, apply_mapping, semantic_scores


def test_hand_checked_example():
    gt = np.array([[0, 0, 1, 1],
                   [0, 0, 1, 1],
                   [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 0, 1, 7],
                     [2, 0, 0, 1]])
    conf = confusion_matrix(pred, gt, num_classes=3, ignore_label=255)
    # rows: gt 0 (4 px: 3 right, 1 -> 1), gt 1 (4 px: 3 right, 1 -> invalid 7), gt 2 (2 px: 1 right, 1 -> 0)
    assert conf.tolist() == [[3, 1, 0, 0], [0, 3, 0, 1], [1, 0, 1, 0]]
    scores = semantic_scores(conf)
    # IoU0 = 3 / (4 + 4 - 3) ; IoU1 = 3 / (4 + 4 - 3) ; IoU2 = 1 / (2 + 1 - 1)
    assert np.allclose(scores.iou, [3 / 5, 3 / 5, 1 / 2])
    assert scores.miou == pytest.approx((0.6 + 0.6 + 0.5) / 3)
    assert scores.pixel_accuracy == pytest.approx(7 / 10)


@pytest.mark.parametrize("dtypes", [(np.uint8, np.uint8), (np.int32, np.uint16)])
def test_chunked_counts_equal_a_pixel_loop(monkeypatch, dtypes):
    """Counting a chunk at a time in the maps' own types gives every pixel's (gt, pred) pair once."""
    from segsort_unsup.evaluate import semantic

    rng = np.random.default_rng(3)
    gt = rng.integers(0, 5, (37, 53)).astype(dtypes[1])
    gt[rng.random(gt.shape) < 0.2] = 255 if dtypes[1] == np.uint8 else 1000
    pred = rng.integers(-1 if dtypes[0] == np.int32 else 0, 7, gt.shape).astype(dtypes[0])
    ignore = int(gt.max())
    expected = np.zeros((5, 6), np.int64)
    for g, p in zip(gt.ravel().tolist(), pred.ravel().tolist()):
        if g != ignore:
            expected[g, p if 0 <= p < 5 else 5] += 1
    monkeypatch.setattr(semantic, "CHUNK_PIXELS", 100)  # 20 chunks, the last one partial
    assert np.array_equal(confusion_matrix(pred, gt, num_classes=5, ignore_label=ignore), expected)
    monkeypatch.setattr(semantic, "CHUNK_PIXELS", 1 << 20)
    assert np.array_equal(confusion_matrix(pred, gt, num_classes=5, ignore_label=ignore), expected)
    with pytest.raises(ValueError, match="ground-truth label"):
        confusion_matrix(pred, gt, num_classes=4, ignore_label=ignore)


def test_hungarian_recovers_a_permutation():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, (30, 30))
    perm = np.array([2, 0, 3, 1])
    pred = perm[gt]  # cluster id = permuted class
    conf = confusion_matrix(pred, gt, num_classes=4, ignore_label=None, num_pred=4)
    mapping = hungarian_mapping(conf)
    assert np.array_equal(mapping[perm], np.arange(4))
    scores = semantic_scores(apply_mapping(conf, mapping))
    assert scores.miou == 1.0 and scores.pixel_accuracy == 1.0


def test_class_absent_everywhere_is_left_out_of_miou():
    gt = np.array([[0, 0], [1, 1]])
    scores = semantic_scores(confusion_matrix(gt, gt, num_classes=3, ignore_label=None))
    assert np.isnan(scores.iou[2]) and scores.miou == 1.0


def _naive_iou(preds, gts, num_classes, ignore):
    """Per-class IoU by set counting, written independently of confusion matrices."""
    ious = []
    for c in range(num_classes):
        inter = union = 0
        for p, g in zip(preds, gts):
            valid = g != ignore
            inter += np.sum((p == c) & (g == c) & valid)
            union += np.sum(((p == c) | (g == c)) & valid)
        ious.append(inter / union if union else np.nan)
    return np.array(ious)


@pytest.mark.slow
def test_camvid_with_known_corruption(shared, tmp_path):
    """Prediction = CamVid labels with every Road pixel in the top third relabelled Sky."""
    labels = sorted((shared / "data" / "camvid" / "valannot").glob("*.png"))[:6]
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    preds, gts = [], []
    for path in labels:
        gt = np.asarray(Image.open(path))
        pred = gt.copy()
        top = np.zeros_like(gt, bool)
        top[: gt.shape[0] // 3] = True
        pred[top & (gt == 3)] = 0  # Road -> Sky
        pred[gt == 11] = 5  # what is predicted on void pixels must not matter
        Image.fromarray(pred).save(pred_dir / path.name)
        preds.append(pred)
        gts.append(gt)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["-q", "evaluate", "semantic", str(pred_dir), "--gt",
                                       str(shared / "data" / "camvid" / "valannot"), "-o", str(out),
                                       "--num-classes", "11", "--ignore-label", "11",
                                       "--class-names", str(shared / "data" / "camvid" / "classes.txt")])
    assert result.exit_code == 0, result.output
    assert "95 ground-truth images had no prediction" in result.output  # 101 val maps, 6 predicted
    data = json.loads((out / "semantic.json").read_text())
    expect = _naive_iou(preds, gts, 11, 11)
    got = np.array([np.nan if v is None else v for v in data["iou"].values()])
    assert list(data["iou"])[:2] == ["Sky", "Building"]
    assert np.allclose(got, expect, equal_nan=True)
    assert data["miou"] == pytest.approx(np.nanmean(expect))
    # untouched classes stay perfect
    assert got[1] == 1.0
    valid = sum(int(np.sum(g != 11)) for g in gts)
    wrong = sum(int(np.sum((g == 3) & (p == 0))) for p, g in zip(preds, gts))
    assert data["pixel_accuracy"] == pytest.approx(1 - wrong / valid)
    header = (out / "confusion.csv").read_text().splitlines()[0]
    assert header.startswith("gt \\ pred,Sky,Building")


def test_size_mismatch_names_the_file(tmp_path):
    gt_dir = tmp_path / "gt"
    pred_dir = tmp_path / "pred"
    gt_dir.mkdir()
    pred_dir.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(gt_dir / "a.png")
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(pred_dir / "a.png")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(gt_dir / "b.png")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(pred_dir / "b.png")
    result = CliRunner().invoke(main, ["-q", "evaluate", "semantic", str(pred_dir), "--gt", str(gt_dir),
                                       "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "a.png: label map is 8x9 but the ground truth" in result.output
    data = json.loads((tmp_path / "o" / "semantic.json").read_text())
    assert data["images"] == 1 and data["miou"] == 1.0
