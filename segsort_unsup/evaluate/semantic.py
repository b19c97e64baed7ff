"""Semantic segmentation scores: confusion matrix, per-class IoU, mIoU, pixel accuracy.

Pixels whose ground truth equals ``ignore_label`` are left out. ``IoU_c = TP / (TP + FP + FN)``;
mIoU is the mean over classes present in the ground truth or the prediction (a class absent
from both has no IoU). Predicted ids outside ``[0, num_classes)`` count as wrong.

With ``hungarian=True`` predicted ids are cluster ids: each is mapped to at most one class by
the assignment that maximises the pooled number of agreeing pixels (``linear_sum_assignment``
on the dataset confusion); unassigned clusters count as wrong.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..errors import BadImageError, InputError
from ..io.atomic import atomic_path, atomic_write_text
from ..log import get_logger
from ..parallel import Executor
from ..stages import StageSummary
from .inputs import PNG_SUFFIXES, Source, image_id, load_labels, open_source, pair_ids, read_label_png

log = get_logger("evaluate")


CHUNK_PIXELS = 1 << 20  # pixels counted at a time: int64 temporaries stay a few MiB for any image size


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, *, num_classes: int, ignore_label: int | None = 255,
                     num_pred: int | None = None) -> np.ndarray:
    """(num_classes, num_pred) counts of ground-truth class (rows) vs predicted id (columns).

    ``num_pred`` defaults to ``num_classes + 1``; the last column then collects predicted ids
    outside ``[0, num_classes)``. Raises ValueError for ground-truth labels out of range.
    The maps are read in their own integer types, :data:`CHUNK_PIXELS` at a time (no full-size
    int64 copies).
    """
    pred = np.asarray(pred).ravel()
    gt = np.asarray(gt).ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth differ in size ({pred.size} vs {gt.size} pixels)")
    given = num_pred
    num_pred = num_classes + 1 if given is None else given
    counts = np.zeros(num_classes * num_pred, np.int64)
    for start in range(0, gt.size, CHUNK_PIXELS):
        g = gt[start : start + CHUNK_PIXELS].astype(np.int64)
        p = pred[start : start + CHUNK_PIXELS].astype(np.int64)
        if ignore_label is not None:
            keep = g != ignore_label
            g, p = g[keep], p[keep]
        if g.size and (g.min() < 0 or g.max() >= num_classes):
            bad = int(g.max()) if g.max() >= num_classes else int(g.min())
            raise ValueError(f"ground-truth label {bad} is outside 0..{num_classes - 1} "
                             f"(set --num-classes, or --ignore-label for void)")
        if given is None:
            p = np.where((p < 0) | (p >= num_classes), num_classes, p)
        elif p.size and (p.min() < 0 or p.max() >= num_pred):
            raise ValueError(f"predicted ids must lie in 0..{num_pred - 1}")
        counts += np.bincount(g * num_pred + p, minlength=num_classes * num_pred)
    return counts.reshape(num_classes, num_pred)


def hungarian_mapping(confusion: np.ndarray) -> np.ndarray:
    """Cluster id -> class (or -1) maximising agreeing pixels; ``confusion`` is (classes, clusters)."""
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    mapping = np.full(confusion.shape[1], -1, np.int64)
    mapping[cols] = rows
    return mapping


def apply_mapping(confusion: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Fold a (classes, clusters) confusion into (classes, classes + 1) with ``mapping``; -1 -> last column."""
    n = confusion.shape[0]
    out = np.zeros((n, n + 1), np.int64)
    target = np.where(mapping >= 0, mapping, n)
    for k in range(confusion.shape[1]):
        out[:, target[k]] += confusion[:, k]
    return out


@dataclass
class SemanticScores:
    """Scores from a (classes, classes [+ 1 invalid]) confusion matrix."""

    confusion: np.ndarray
    iou: np.ndarray  # per class, NaN where the class is in neither ground truth nor prediction
    miou: float
    pixel_accuracy: float
    class_names: list[str] = field(default_factory=list)
    mapping: np.ndarray | None = None

    def line(self) -> str:
        return f"mIoU={self.miou:.4f}  pixel accuracy={self.pixel_accuracy:.4f}  ({len(self.iou)} classes)"


def semantic_scores(confusion: np.ndarray, *, class_names: list[str] | None = None,
                    mapping: np.ndarray | None = None) -> SemanticScores:
    """IoU per class, mIoU and pixel accuracy of a confusion matrix (rows: ground truth)."""
    confusion = np.asarray(confusion, np.int64)
    n = confusion.shape[0]
    tp = np.diag(confusion[:, :n]).astype(np.float64)
    gt_total = confusion.sum(axis=1).astype(np.float64)
    pred_total = confusion[:, :n].sum(axis=0).astype(np.float64)
    union = gt_total + pred_total - tp
    iou = np.divide(tp, union, out=np.full(n, np.nan), where=union > 0)
    valid = confusion.sum()
    return SemanticScores(
        confusion=confusion, iou=iou,
        miou=float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        pixel_accuracy=float(tp.sum() / valid) if valid else float("nan"),
        class_names=list(class_names) if class_names else [str(i) for i in range(n)], mapping=mapping,
    )


@dataclass(frozen=True)
class _Task:
    iid: str
    gt_path: str
    source: Source
    num_classes: int
    ignore_label: int | None
    hungarian: bool


def _confusion_one(task: _Task) -> np.ndarray:
    gt = read_label_png(task.gt_path)  # uint8 / uint16: confusion_matrix widens a chunk at a time
    pred = load_labels(task.source, task.iid)
    if pred.labels.shape != gt.shape:
        raise BadImageError(pred.name, f"label map is {pred.labels.shape[0]}x{pred.labels.shape[1]} but the "
                                       f"ground truth {task.gt_path} is {gt.shape[0]}x{gt.shape[1]}")
    try:
        if task.hungarian:
            if pred.labels.min() < 0:
                raise ValueError("cluster ids must be >= 0")
            return confusion_matrix(pred.labels, gt, num_classes=task.num_classes, ignore_label=task.ignore_label,
                                    num_pred=int(pred.labels.max()) + 1)
        return confusion_matrix(pred.labels, gt, num_classes=task.num_classes, ignore_label=task.ignore_label)
    except ValueError as exc:
        raise BadImageError(task.gt_path, str(exc)) from None


def _label_files(gt_dir: str | os.PathLike) -> dict[str, Path]:
    root = Path(gt_dir)
    if not root.is_dir():
        raise InputError(f"label folder not found: {root}")
    files = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in PNG_SUFFIXES:
            files[image_id(str(p))] = p
    if not files:
        raise InputError(f"no label PNGs in {root}")
    return files


@dataclass
class SemanticReport:
    stage: StageSummary
    scores: SemanticScores
    missing: list[str]


def run_semantic(
    predictions: str | os.PathLike,
    ground_truth: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    num_classes: int,
    ignore_label: int | None = 255,
    hungarian: bool = False,
    class_names: list[str] | None = None,
    executor: Executor | None = None,
    overwrite: bool = False,
) -> SemanticReport:
    """Pool confusion matrices over every image with both a prediction and a label map; write results."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder; choose another output path")
    if (out / "semantic.json").exists() and not overwrite:
        raise InputError(f"{out} already holds semantic.json; pass --overwrite to replace the results")
    if num_classes < 1:
        raise InputError("--num-classes must be >= 1")
    if class_names is not None and len(class_names) != num_classes:
        raise InputError(f"{len(class_names)} class names for {num_classes} classes")
    from .bsds import collect

    source = open_source(predictions)
    gts = _label_files(ground_truth)
    ids, missing = pair_ids(source, gts, predictions, ground_truth)
    tasks = [_Task(i, str(gts[i]), source, num_classes, ignore_label, hungarian) for i in ids]
    stage, results = collect(_confusion_one, tasks, executor, stage="evaluate semantic", output=out)
    pooled = np.zeros((num_classes, num_classes + 1 if not hungarian else 1), np.int64)
    for conf in results.values():
        if conf.shape[1] > pooled.shape[1]:
            pooled = np.pad(pooled, ((0, 0), (0, conf.shape[1] - pooled.shape[1])))
        pooled[:, : conf.shape[1]] += conf
    mapping = None
    if hungarian:
        mapping = hungarian_mapping(pooled)
        pooled = apply_mapping(pooled, mapping)
    scores = semantic_scores(pooled, class_names=class_names, mapping=mapping)
    write_semantic_results(out, scores, images=stage.done, missing=missing)
    return SemanticReport(stage, scores, missing)


def write_semantic_results(out_dir: str | os.PathLike, scores: SemanticScores, *, images: int,
                           missing: list[str]) -> None:
    """``semantic.json``, ``per_class.txt`` and ``confusion.csv`` (rows: ground truth)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = scores.class_names
    data = {
        "miou": scores.miou, "pixel_accuracy": scores.pixel_accuracy, "images": images, "missing": missing,
        "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, scores.iou)},
        "mapping": None if scores.mapping is None else {str(k): int(c) for k, c in enumerate(scores.mapping)},
    }
    atomic_write_text(out / "semantic.json", json.dumps(data, indent=2))
    lines = [f"{'class':<16} {'IoU':>8}"]
    lines += [f"{n:<16} {'-' if np.isnan(v) else f'{v:8.4f}':>8}" for n, v in zip(names, scores.iou)]
    lines += [f"{'mIoU':<16} {scores.miou:8.4f}", f"{'pixel accuracy':<16} {scores.pixel_accuracy:8.4f}"]
    atomic_write_text(out / "per_class.txt", "\n".join(lines) + "\n")
    with atomic_path(out / "confusion.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        header = names + (["invalid"] if scores.confusion.shape[1] > len(names) else [])
        writer.writerow(["gt \\ pred"] + header)
        for n, row in zip(names, scores.confusion):
            writer.writerow([n] + [int(x) for x in row])


def read_class_names(path: str | os.PathLike, num_classes: int, ignore: int | None = None) -> list[str]:
    """Class names from a text file, one per line (``Sky`` or ``0 Sky``; numbered lines of the
    ignore label or beyond ``num_classes`` are left out)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read class names ({exc})") from None
    names = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0].isdigit() and len(parts) > 1:
            if int(parts[0]) == ignore or int(parts[0]) >= num_classes:
                continue
            parts = parts[1:]
        names.append(" ".join(parts))
    if len(names) != num_classes:
        raise InputError(f"{path}: {len(names)} class names for {num_classes} classes")
    return names


def infer_num_classes(ground_truth: str | os.PathLike, *, ignore_label: int | None = 255) -> int:
    """1 + the largest label (other than ``ignore_label``) in a folder of label PNGs."""
    top = -1
    for path in _label_files(ground_truth).values():
        labels = read_label_png(path)
        if ignore_label is not None:
            labels = labels[labels != ignore_label]
        if labels.size:
            top = max(top, int(labels.max()))
    if top < 0:
        raise InputError(f"{ground_truth}: every pixel is ignore_label; nothing to evaluate")
    return top + 1
