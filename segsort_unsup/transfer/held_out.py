"""Choosing transfer settings without the scored set: leave one group of labelled images out.

Each labelled segment of one group (a video sequence, a site, a camera) takes the vote of its
``k`` nearest labelled prototypes of the *other* groups, exactly as :mod:`.stage` votes, and the
score is the IoU per class of the label maps those votes paint against the label PNGs, pixel by
pixel, as ``evaluate semantic`` scores a transfer (:func:`pixel_iou`). Scoring each segment by its
majority class instead (:func:`area_weighted_iou`) ignores the pixels of a class that no segment
is mostly made of, and flatters thin classes: CamVid's poles live mostly inside segments of the
building or tree behind them. Leaving single images out flatters every setting when neighbouring
images are near copies (frames of one video hold the same pole); leaving a whole group out does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .stage import build_index, class_weights, knn_votes


@dataclass(frozen=True)
class HeldOutScore:
    """Per-class IoU (``iou``, C) of a held-out vote, and its mean over the classes present."""

    iou: np.ndarray

    @property
    def miou(self) -> float:
        return float(np.nanmean(self.iou))


def held_out_votes(prototypes: np.ndarray, labels: np.ndarray, groups: np.ndarray, *, k: int = 15,
                   num_classes: int | None = None, balance: float = 0.0,
                   voters: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """``(N,)`` the class each labelled row gets from the rows of the other groups (ties: the lowest
    class). ``prototypes`` (N, D) unit rows, ``labels`` (N,) classes, ``groups`` (N,) any ids;
    ``balance`` weighs the votes as the transfer stage does, by the counts of the voters' classes.
    ``voters``: the (prototypes, labels, groups) of another table that votes instead of these rows
    (the same images' segments made otherwise, e.g. split by class with ``class_parts``: units
    drawn with the labels' help must not be the ones voted on)."""
    v_prototypes, v_labels, v_groups = voters if voters is not None else (prototypes, labels, groups)
    v_labels = np.asarray(v_labels, np.int64)
    groups, v_groups = np.asarray(groups), np.asarray(v_groups)
    c = num_classes or int(max(v_labels.max(), np.max(labels))) + 1
    weights = class_weights(v_labels, c, balance)
    predicted = np.empty(len(groups), np.int64)
    for group in np.unique(groups):
        inside, others = groups == group, v_groups != group
        if not others.any():
            raise ValueError("leaving a group out needs at least two groups")
        votes = knn_votes(prototypes[inside], build_index(v_prototypes[others]), v_labels[others], k=k,
                          num_classes=c, weights=weights)
        predicted[inside] = votes.argmax(axis=1)
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
    ``geometry`` (N, 10, :func:`~.geometry.region_geometry`), ``keys`` (N,), the image of each row,
    and ``ids`` (N,), its segment id in that image's ``segments`` map."""

    prototypes: np.ndarray
    labels: np.ndarray
    area: np.ndarray
    geometry: np.ndarray
    keys: np.ndarray
    ids: np.ndarray


def labelled_rows(path, *, ignore_label: int | None = None) -> LabelledRows:
    """:class:`LabelledRows` of the labelled prototypes store at ``path`` (``ignore_label`` rows dropped)."""
    from .geometry import item_geometry
    from .stage import open_prototypes

    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("prototypes", "label", "area", "geometry", "keys",
                                                                  "ids")}
    with open_prototypes(path, "labelled") as reader:
        for key in reader.keys():
            item = reader.read(key, ("prototypes", "label", "area", "bbox"))
            for name in ("prototypes", "label", "area"):
                parts[name].append(item.arrays[name])
            parts["geometry"].append(item_geometry(item))
            parts["keys"].append(np.full(len(item.arrays["label"]), key, dtype=object))
            parts["ids"].append(np.arange(len(item.arrays["label"])))
    rows = {name: np.concatenate(values) for name, values in parts.items()}
    keep = np.ones(len(rows["label"]), bool) if ignore_label is None else rows["label"] != ignore_label
    return LabelledRows(rows["prototypes"][keep], rows["label"][keep].astype(np.int64), rows["area"][keep],
                        rows["geometry"][keep], rows["keys"][keep], rows["ids"][keep])


def pixel_iou(path, rows: LabelledRows, predicted: np.ndarray, num_classes: int, *,
              ignore_label: int | None = None) -> HeldOutScore:
    """IoU per class of each image's label map painted with ``predicted`` (a class per row of
    ``rows``) over the store's ``segments`` map, against the label PNGs the store at ``path`` was
    embedded with (its ``labels`` setting, found by :class:`~segsort_unsup.io.labels.LabelFiles`).

    Pixels of ``ignore_label`` and pixels of no row are left out; in a store of several views the
    first view's segments paint (one-view stores are what this is for).
    """
    from ..errors import StoreError
    from ..evaluate.semantic import confusion_matrix, semantic_scores
    from ..io.images import read_label_png
    from ..io.labels import LabelFiles
    from .stage import open_prototypes

    confusion = np.zeros((num_classes, num_classes), np.int64)
    with open_prototypes(path, "labelled") as reader:
        if not reader.config.get("labels"):
            raise StoreError(path, "records no label folders: embed the labelled set with --labels DIR")
        files = LabelFiles(reader.config["labels"])
        for key in np.unique(rows.keys):
            mine = rows.keys == key
            item = reader.read(key, ("segments",))
            lookup = np.full(int(rows.ids[mine].max()) + 1, -1, np.int64)
            lookup[rows.ids[mine]] = predicted[mine]
            segments = item.arrays["segments"]
            truth = read_label_png(files.require(key, item.attrs.get("source", ""))).astype(np.int64)
            inside = (segments >= 0) & (segments < len(lookup))
            painted = np.full(segments.shape, -1, np.int64)
            painted[inside] = lookup[segments[inside]]
            scored = (painted >= 0) & (truth < num_classes)
            confusion += confusion_matrix(painted[scored], truth[scored], num_classes=num_classes,
                                          ignore_label=ignore_label, num_pred=num_classes)
    return HeldOutScore(semantic_scores(confusion).iou)
