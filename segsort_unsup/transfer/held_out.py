"""Choosing transfer settings without the scored set: leave one group of labelled images out.

Each labelled segment of one group (a video sequence, a site, a camera) takes the vote of its
``k`` nearest labelled prototypes of the *other* groups, exactly as :mod:`.stage` votes, and the
score is the IoU per class of the segments' majority classes against their votes, each segment
weighted by its area. Leaving single images out flatters every setting when neighbouring images
are near copies (frames of one video hold the same pole); leaving a whole group out does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stage import build_index, class_weights, neighbour_counts


@dataclass(frozen=True)
class HeldOutScore:
    """Per-class IoU (``iou``, C) of a held-out vote, and its mean over the classes present."""

    iou: np.ndarray

    @property
    def miou(self) -> float:
        return float(np.nanmean(self.iou))


def held_out_votes(prototypes: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, k: int = 15,
                   num_classes: int | None = None, balance: float = 0.0) -> np.ndarray:
    """``(N,)`` the class each labelled row gets from the rows of the other groups (ties: the lowest
    class). ``prototypes`` (N, D) unit rows, ``labels`` (N,) classes, ``groups`` (N,) any ids;
    ``balance`` weighs the votes as the transfer stage does, by the counts of the whole table."""
    labels = np.asarray(labels, np.int64)
    groups = np.asarray(groups)
    c = num_classes or int(labels.max()) + 1
    weights = class_weights(labels, c, balance)
    predicted = np.empty(len(labels), np.int64)
    for group in np.unique(groups):
        inside = groups == group
        if inside.all():
            raise ValueError("leaving a group out needs at least two groups")
        index = build_index(prototypes[~inside])
        counts = neighbour_counts(prototypes[inside], index, labels[~inside], k=k, num_classes=c)
        predicted[inside] = (counts * weights[None, :]).argmax(axis=1)
    return predicted


def area_weighted_iou(truth: np.ndarray, predicted: np.ndarray, area: np.ndarray, num_classes: int) -> HeldOutScore:
    """IoU per class of segments' classes ``predicted`` against ``truth``, each segment counting its
    ``area`` pixels (NaN for a class in neither)."""
    truth, predicted = np.asarray(truth, np.int64), np.asarray(predicted, np.int64)
    area = np.asarray(area, np.float64)
    hit = truth == predicted
    inter = np.bincount(truth[hit], weights=area[hit], minlength=num_classes)
    union = (np.bincount(truth, weights=area, minlength=num_classes)
             + np.bincount(predicted, weights=area, minlength=num_classes) - inter)
    with np.errstate(invalid="ignore", divide="ignore"):
        return HeldOutScore(np.where(union > 0, inter / union, np.nan))


@dataclass(frozen=True)
class LabelledRows:
    """Every labelled segment of a prototypes store: ``prototypes`` (N, D), ``labels``, ``area``,
    ``geometry`` (N, 10, :func:`~.geometry.region_geometry`) and ``keys`` (N,), the image of each row."""

    prototypes: np.ndarray
    labels: np.ndarray
    area: np.ndarray
    geometry: np.ndarray
    keys: np.ndarray


def labelled_rows(path, *, ignore_label: int | None = None) -> LabelledRows:
    """:class:`LabelledRows` of the labelled prototypes store at ``path`` (``ignore_label`` rows dropped)."""
    from .geometry import item_geometry
    from .stage import open_prototypes

    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("prototypes", "label", "area", "geometry", "keys")}
    with open_prototypes(path, "labelled") as reader:
        for key in reader.keys():
            item = reader.read(key, ("prototypes", "label", "area", "bbox"))
            for name in ("prototypes", "label", "area"):
                parts[name].append(item.arrays[name])
            parts["geometry"].append(item_geometry(item))
            parts["keys"].append(np.full(len(item.arrays["label"]), key, dtype=object))
    rows = {name: np.concatenate(values) for name, values in parts.items()}
    keep = np.ones(len(rows["label"]), bool) if ignore_label is None else rows["label"] != ignore_label
    return LabelledRows(rows["prototypes"][keep], rows["label"][keep].astype(np.int64), rows["area"][keep],
                        rows["geometry"][keep], rows["keys"][keep])
