"""The ``discover`` stage: FINCH groups of a prototypes store, a gallery and a 2-D map.

Input: a prototypes store (``embed``: per image ``prototypes`` K x D, ``segments``, ``area``,
``bbox``, optional ``label``; item attr ``source`` = the image). What is clustered can be
filtered (minimum area, classes kept or excluded when prototypes carry labels) and capped
(seeded random sample). FINCH (:func:`~segsort_unsup.discover.finch.finch`) clusters the rows;
every level is kept.

Output: a store of kind ``groups`` (schema in :mod:`segsort_unsup.io.store`) written as ONE
shard, so it appears whole or not at all:

- item ``rows``: ``image_keys`` (UTF-8 JSON list of the prototypes store's keys), ``image``
  (index into it), ``segment``, ``area`` and, when labelled, ``label`` for every clustered row;
- item ``level-00``, ``level-01``... (finest first): ``partition`` (group of each row),
  ``means`` (k x D), ``sizes``, ``parent`` (the group containing it at the next coarser level,
  -1 at the last) and, when labelled, ``class_counts`` (k x C) with attrs ``purity``/``nmi``;
- item ``requested`` (with ``req_clust``): the partition with exactly that many groups.

Same inputs and settings: nothing is recomputed. Beside the shard, ``gallery/`` holds
``gallery.html`` and its pages (:mod:`segsort_unsup.discover.gallery`: groups largest first with
crops of their members, photo pages, a thumbnail map); gallery settings are run-only, so changing
them redraws the gallery without re-clustering. The store's lock is held until the gallery is
drawn, so a concurrent ``--overwrite`` waits instead of pulling the store from under it. The
summary counts the prototypes store's images: one that cannot be read is left out and reported
as failed (on every later run that keeps these groups, too); non-finite prototypes are refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import SEED_MAX, StageConfig, run_only, setting
from ..errors import InputError, StoreError
from ..io.sources import store_content
from ..io.store import Item, StoreReader, is_store, read_manifest
from ..log import get_logger
from ..parallel import Executor
from ..stages import Stage, StageRun, StageSummary
from .finch import finch

log = get_logger("discover")

ROWS_KEY = "rows"
REQUESTED_KEY = "requested"
GALLERY_DIR = "gallery"


def level_key(level: int) -> str:
    """Item key of FINCH level ``level`` (0 = finest)."""
    return f"level-{level:02d}"


@dataclass(frozen=True)
class DiscoverConfig(StageConfig):
    """Settings of the discover stage.

    min_area : segments smaller than this many pixels are not clustered.
    classes / exclude_classes : keep only / drop these classes (needs labelled prototypes).
    max_prototypes : cluster at most this many rows, a seeded random sample (0: all).
    seed : the sample, and the random members shown in the gallery.
    req_clust : also store the partition with exactly this many groups (item ``requested``).
    distance : FINCH's distance, ``"cosine"`` or ``"euclidean"``.
    level : gallery level (default: ``requested`` if given, else the level with a group count
        closest to 20-50); run-only, like the rest of the gallery settings.
    """

    stage = "discover"

    min_area: int = setting(0, help="Leave out segments smaller than this (pixels).", low=0)
    classes: tuple[int, ...] = setting((), help="Cluster only these classes (labelled prototypes), e.g. 1,3,8.",
                                       low=0, metavar="C1,C2,...")
    exclude_classes: tuple[int, ...] = setting((), help="Leave out these classes (labelled prototypes), e.g. the "
                                                        "background.", low=0, metavar="C1,C2,...")
    max_prototypes: int = setting(0, help="Cluster a random sample of at most this many prototypes (0: all); drawn "
                                          "with --seed.", low=0)
    seed: int = setting(0, help="Seed of every random choice (same seed, same result).", low=0, high=SEED_MAX)
    req_clust: int | None = setting(None, help="Also store the partition with exactly this many groups.", low=1)
    distance: str = setting("cosine", help="FINCH's distance.", choices=("cosine", "euclidean"))
    level: int | str | None = run_only(None, help="Gallery level [default: the requested partition, else the level "
                                                  "with ~20-50 groups].", metavar="N|requested")
    gallery: bool = run_only(True, help="--no-gallery: only the groups store (no gallery pages, crops or map).")
    representatives: int = run_only(5, help="Members nearest the group mean shown per group.", low=0)
    random_members: int = run_only(2, help="Random members shown per group.", low=0)
    max_groups: int = run_only(200, help="Levels with more groups get no gallery page (the chosen level shows its "
                                         "largest).", low=1)
    groups_per_page: int = run_only(30, help="Group cards per gallery page (pages stay small at any store size).",
                                    low=1)
    map_method: str = run_only("auto", help="2-D map: t-SNE (scikit-learn), PCA, or none; auto = t-SNE if "
                                            "available.", flags=("--map",), choices=("auto", "tsne", "pca", "none"))
    map_points: int = run_only(1000, help="Sample of prototypes placed on the map (seeded; one per grid cell is "
                                          "drawn).", low=2)
    overviews: str | None = run_only(None, help="Folder of ucm <key>_overview.png pictures to link from the photo "
                                                "pages [default: png/segments beside OUTPUT, if there].")
    threads: int | None = run_only(None, help="FINCH worker threads.", low=1)

    def validate(self) -> None:
        for key in ("min_area", "max_prototypes", "seed"):
            if getattr(self, key) < 0:
                raise self.bad_value(key, "must be >= 0")
        if self.classes and self.exclude_classes:
            raise self.bad_value("classes", "give classes or exclude_classes, not both")
        if self.req_clust is not None and self.req_clust < 1:
            raise self.bad_value("req_clust", "must be >= 1")
        if self.distance not in ("cosine", "euclidean"):
            raise self.bad_value("distance", "must be 'cosine' or 'euclidean'")
        if isinstance(self.level, str) and self.level != REQUESTED_KEY:
            raise self.bad_value("level", f"must be a level number (0 = finest) or {REQUESTED_KEY!r}")
        if isinstance(self.level, int) and self.level < 0:
            raise self.bad_value("level", "must be >= 0 (0 = finest)")
        if self.representatives < 0 or self.random_members < 0:
            raise self.bad_value("representatives", "member counts must be >= 0")
        if self.representatives + self.random_members < 1:
            raise self.bad_value("representatives", "show at least one member per group")
        if self.max_groups < 1 or self.map_points < 2 or self.groups_per_page < 1:
            raise self.bad_value("max_groups", "max_groups and groups_per_page must be >= 1, map_points >= 2")
        if self.map_method not in ("auto", "tsne", "pca", "none"):
            raise self.bad_value("map_method", "must be auto, tsne, pca or none")


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------
def contingency(groups: np.ndarray, labels: np.ndarray, *, n_groups: int | None = None,
                n_classes: int | None = None) -> np.ndarray:
    """``counts[g, c]``: rows of group ``g`` with class ``c`` (rows with ``label < 0`` are left out)."""
    groups = np.asarray(groups, np.int64)
    labels = np.asarray(labels, np.int64)
    keep = labels >= 0
    k = int(n_groups if n_groups is not None else (groups.max() + 1 if groups.size else 0))
    c = int(n_classes if n_classes is not None else (labels.max() + 1 if labels.size else 0))
    flat = groups[keep] * c + labels[keep]
    return np.bincount(flat, minlength=k * c).reshape(k, c)


def purity(counts: np.ndarray) -> float:
    """Fraction of rows whose class is their group's majority class."""
    total = counts.sum()
    return float(counts.max(axis=1).sum() / total) if total else float("nan")


def nmi(counts: np.ndarray) -> float:
    """Normalised mutual information I(G; C) / ((H(G) + H(C)) / 2) (arithmetic mean, as scikit-learn)."""
    total = counts.sum()
    if not total:
        return float("nan")
    p = counts / total
    pg, pc = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pg, pc)[nz])).sum())
    hg = float(-(pg[pg > 0] * np.log(pg[pg > 0])).sum())
    hc = float(-(pc[pc > 0] * np.log(pc[pc > 0])).sum())
    if hg == 0 and hc == 0:
        return 1.0  # one group and one class: identical partitions
    denom = (hg + hc) / 2
    return max(0.0, mi / denom) if denom > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------
@dataclass
class Selection:
    """The rows clustered: prototypes plus where each comes from."""

    prototypes: np.ndarray  # N x D float32
    image_keys: list[str]  # keys of the prototypes store (image index -> key)
    image: np.ndarray  # N int32
    segment: np.ndarray  # N int32
    area: np.ndarray  # N int64
    label: np.ndarray | None  # N int32, or None when unlabelled
    total: int  # rows in the store before filtering
    unreadable: list[tuple[str, str]]  # items left out: (key, reason)


def open_prototypes(source: str | os.PathLike) -> StoreReader:
    """A reader of a non-empty prototypes store, or a one-line error naming it."""
    source = Path(source)
    if not is_store(source):
        read_manifest(source)  # raises the precise reason (missing, not a store...)
    reader = StoreReader(source, kind="prototypes")
    if not len(reader):
        reader.close()
        raise StoreError(source, "the prototypes store holds no items; run `segsort-unsup embed` first")
    return reader


def source_identity(reader: StoreReader) -> dict[str, Any]:
    """What the input is: its identity hash and a digest of its complete shards (so new items count)."""
    return {"source_identity": reader.config_hash, "source_content": store_content(reader)}


def select(reader: StoreReader, config: DiscoverConfig) -> Selection:
    """Stack the store's prototypes and apply the filters and the cap of ``config``."""
    stacked, failed = reader.stack("prototypes")
    for key, reason in failed:
        log.warning("discover: %s: left out, unreadable (%s)", key, reason)
    keys = stacked.keys
    if not keys or stacked.array.shape[0] == 0:
        raise StoreError(reader.root, "no prototypes could be read from this store; run `segsort-unsup embed` again")
    protos = np.ascontiguousarray(stacked.array, np.float32)
    counts = np.diff(stacked.offsets)
    _refuse_non_finite(reader.root, protos, stacked.offsets, keys)
    image = np.repeat(np.arange(len(keys), dtype=np.int32), counts)
    segment = np.concatenate([np.arange(c, dtype=np.int32) for c in counts])
    area = np.concatenate([reader.read(k, ("area",)).arrays["area"] for k in keys]).astype(np.int64)
    labelled = all("label" in reader.layout(k) for k in keys)
    label = (np.concatenate([reader.read(k, ("label",)).arrays["label"] for k in keys]).astype(np.int32)
             if labelled else None)
    if area.shape[0] != protos.shape[0] or (label is not None and label.shape[0] != protos.shape[0]):
        raise StoreError(reader.root, "prototypes, area and label differ in length; re-run `segsort-unsup embed`")
    total = protos.shape[0]
    keep = area >= config.min_area
    if config.classes or config.exclude_classes:
        if label is None:
            raise InputError(f"{reader.root}: --classes/--exclude-classes need labelled prototypes "
                             "(this store has no 'label'); drop the class filter")
        if config.classes:
            keep &= np.isin(label, np.asarray(config.classes))
        else:
            keep &= ~np.isin(label, np.asarray(config.exclude_classes))
    rows = np.flatnonzero(keep)
    if rows.size == 0:
        raise InputError(f"{reader.root}: no prototype passes the filters (min_area={config.min_area}, "
                         f"classes={list(config.classes)}, exclude_classes={list(config.exclude_classes)}); "
                         "loosen them")
    if config.max_prototypes and rows.size > config.max_prototypes:
        rng = np.random.default_rng(config.seed)
        rows = np.sort(rng.choice(rows, size=config.max_prototypes, replace=False))
    return Selection(protos[rows], list(keys), image[rows], segment[rows], area[rows],
                     None if label is None else label[rows], total, list(failed))


def _refuse_non_finite(root: Path, protos: np.ndarray, offsets: np.ndarray, keys: list[str]) -> None:
    """One line naming the first image with NaN/inf prototype rows (a broken model made them)."""
    bad_rows = np.flatnonzero(~np.isfinite(protos).all(axis=1))
    if bad_rows.size:
        images = np.searchsorted(offsets, bad_rows, side="right") - 1
        first = keys[int(images[0])]
        others = len(np.unique(images)) - 1
        raise InputError(f"{root}: item {first!r} has {int((images == images[0]).sum())} non-finite (NaN/inf) "
                         f"prototype row(s)" + (f", and {others} more item(s) too" if others else "")
                         + "; the model that made them is broken: retrain it, then re-run `segsort-unsup embed`")


# --------------------------------------------------------------------------------------------
# Levels
# --------------------------------------------------------------------------------------------
def group_means(x: np.ndarray, partition: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean row of each group and the group sizes."""
    sizes = np.bincount(partition, minlength=k).astype(np.int64)
    sums = np.zeros((k, x.shape[1]), np.float64)
    np.add.at(sums, partition, x)
    return (sums / np.maximum(sizes, 1)[:, None]).astype(np.float32), sizes


def parent_links(fine: np.ndarray, coarse: np.ndarray, k_fine: int) -> np.ndarray:
    """For each fine group, the coarse group holding it (FINCH levels are nested)."""
    parent = np.full(k_fine, -1, np.int32)
    parent[fine] = coarse
    return parent


def default_level(counts: np.ndarray, *, low: int = 20, high: int = 50) -> int:
    """The level whose group count is closest to the range ``low..high`` (the finer one on ties)."""
    dist = [0 if low <= c <= high else min(abs(c - low), abs(c - high)) for c in counts]
    return int(np.argmin(dist))


def _level_item(key: str, x: np.ndarray, partition: np.ndarray, parent: np.ndarray | None, label: np.ndarray | None,
                n_classes: int, attrs: dict[str, Any]) -> Item:
    k = int(partition.max()) + 1
    means, sizes = group_means(x, partition, k)
    arrays: dict[str, np.ndarray] = {"partition": partition.astype(np.int32), "means": means, "sizes": sizes}
    if parent is not None:
        arrays["parent"] = parent
    attrs = {**attrs, "groups": k}
    if label is not None:
        counts = contingency(partition, label, n_groups=k, n_classes=n_classes)
        arrays["class_counts"] = counts.astype(np.int64)
        attrs.update(purity=purity(counts), nmi=nmi(counts))
    return Item(key, arrays, attrs)


def _score_note(levels: list[Item]) -> str:
    parts = []
    for item in levels:
        a = item.attrs
        text = f"L{a['level']} {a['groups']}"
        if "purity" in a:
            text += f" (purity {a['purity']:.3f}, NMI {a['nmi']:.3f})"
        parts.append(text)
    return "groups per level: " + "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Reading a groups store
# --------------------------------------------------------------------------------------------
@dataclass
class Groups:
    """A groups store read back: rows, every level and (optionally) the requested partition."""

    root: Path
    rows: Item
    levels: list[Item]
    requested: Item | None
    meta: dict[str, Any]

    @property
    def image_keys(self) -> list[str]:
        return json.loads(bytes(self.rows.arrays["image_keys"]).decode("utf-8"))

    def level(self, level: int | str) -> Item:
        """Level ``level`` (int) or ``"requested"``; an error listing the levels that exist."""
        if level == REQUESTED_KEY:
            if self.requested is None:
                raise InputError(f"{self.root}: no requested partition (run discover with --req-clust)")
            return self.requested
        if not isinstance(level, (int, np.integer)) or not 0 <= int(level) < len(self.levels):
            raise InputError(f"{self.root}: level {level} does not exist; levels are 0..{len(self.levels) - 1} "
                             f"({', '.join(str(i.attrs['groups']) for i in self.levels)} groups)")
        return self.levels[int(level)]


def read_groups(root: str | os.PathLike) -> Groups:
    """Load a groups store written by :func:`run`."""
    root = Path(root)
    with StoreReader(root, kind="groups") as reader:
        if ROWS_KEY not in reader:
            raise StoreError(root, "incomplete groups store (no 'rows'); re-run `segsort-unsup discover`")
        rows = reader.read(ROWS_KEY)
        levels = []
        while level_key(len(levels)) in reader:
            levels.append(reader.read(level_key(len(levels))))
        requested = reader.read(REQUESTED_KEY) if REQUESTED_KEY in reader else None
        meta = dict(reader.meta)
    return Groups(root, rows, levels, requested, meta)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------
def run(config: DiscoverConfig, inputs: str | os.PathLike, output: str | os.PathLike, *,
        executor: Executor | None = None, overwrite: bool | str = False) -> StageSummary:
    """Cluster the prototypes store ``inputs`` with FINCH into the groups store ``output``.

    ``executor`` is unused (FINCH runs on threads in this process); it is accepted so the
    pipeline calls every stage alike. A complete store with the same identity is kept as is.
    The summary counts images of the prototypes store (an unreadable one is a failure, left
    out of the groups); the store's lock is held until the gallery is drawn.
    """
    del executor
    output = Path(output)
    with open_prototypes(inputs) as reader:
        provenance = source_identity(reader)
        identity = config.identity(**provenance)
        meta = {"source": os.path.abspath(inputs), "source_kind": "prototypes"}
        n_images = len(reader)
        with StageRun("discover", output, kind="groups", identity=identity, meta=meta, overwrite=overwrite,
                      shard_size=1 << 30) as run_:
            summary = run_.summary
            summary.total = n_images
            if ROWS_KEY in run_.writer.completed:
                groups = read_groups(output)
                unreadable = [tuple(pair) for pair in json.loads(str(groups.rows.attrs.get("unreadable", "[]")))]
                summary.skipped = n_images - len(unreadable)
                log.info("discover: %s is complete for these settings: kept", output)
                for key, reason in unreadable:
                    log.warning("discover: %s: left out when these groups were made (%s)", key, reason)
            else:
                items, unreadable = _cluster(reader, config)
                for item in items:
                    run_.writer.add(item)
                summary.done = n_images - len(unreadable)
                groups = _groups_from_items(output, items, meta)
            summary.failed.extend((key, reason) for key, reason in unreadable)
            summary.note = _note(groups)
            if config.gallery:
                _draw(config, groups, inputs, output, run_.writer.config_hash)
    return summary


def _note(groups: Groups) -> str:
    note = _score_note(groups.levels)
    if groups.requested is not None and "purity" in groups.requested.attrs:
        a = groups.requested.attrs
        note += f"; requested {a['groups']} (purity {a['purity']:.3f}, NMI {a['nmi']:.3f})"
    for item in groups.levels:
        log.info("discover: level %d: %d groups%s", item.attrs["level"], item.attrs["groups"],
                 f", purity {item.attrs['purity']:.4f}, NMI {item.attrs['nmi']:.4f}" if "purity" in item.attrs else "")
    return note


def _groups_from_items(root: Path, items: list[Item], meta: dict[str, Any]) -> Groups:
    """The groups just computed, as :func:`read_groups` would return them once written."""
    by_key = {item.key: item for item in items}
    levels = []
    while level_key(len(levels)) in by_key:
        levels.append(by_key[level_key(len(levels))])
    return Groups(root, by_key[ROWS_KEY], levels, by_key.get(REQUESTED_KEY), dict(meta))


def default_overviews(output: Path) -> Path | None:
    """The ucm overview pictures of a pipeline run: ``png/segments`` beside the groups folder."""
    candidate = output.absolute().parent / "png" / "segments"
    return candidate if candidate.is_dir() else None


def _draw(config: DiscoverConfig, groups: Groups, inputs: str | os.PathLike, output: Path, identity: str) -> None:
    from .gallery import write_gallery

    level: int | str | None = config.level
    if level is None:
        level = REQUESTED_KEY if groups.requested is not None else \
            default_level(np.array([i.attrs["groups"] for i in groups.levels]))
    groups.level(level)  # a level that does not exist: one-line error before any drawing
    overviews = config.overviews if config.overviews is not None else default_overviews(output)
    write_gallery(groups, inputs, output / GALLERY_DIR, level=level, identity=identity,
                  representatives=config.representatives, random_members=config.random_members,
                  max_groups=config.max_groups, groups_per_page=config.groups_per_page, seed=config.seed,
                  map_method=config.map_method, map_points=config.map_points, overview_dir=overviews)


def _cluster(reader: StoreReader, config: DiscoverConfig) -> tuple[list[Item], list[tuple[str, str]]]:
    """FINCH of the selected rows: the store's items, and the unreadable prototypes items left out."""
    sel = select(reader, config)
    n, d = sel.prototypes.shape
    log.info("discover: clustering %d of %d prototypes (D=%d) from %d images", n, sel.total, d, len(sel.image_keys))
    result = finch(sel.prototypes, req_clust=min(config.req_clust, n) if config.req_clust else None,
                   distance=config.distance, seed=config.seed, threads=config.threads, verbose=True)
    n_classes = int(sel.label.max()) + 1 if sel.label is not None and sel.label.size and sel.label.max() >= 0 else 0
    label = sel.label if n_classes else None
    rows = {"image_keys": np.frombuffer(json.dumps(sel.image_keys).encode("utf-8"), np.uint8).copy(),
            "image": sel.image, "segment": sel.segment, "area": sel.area}
    if sel.label is not None:
        rows["label"] = sel.label
    items = []
    parts = result.partitions
    for level in range(parts.shape[1]):
        fine = parts[:, level]
        k = int(result.counts[level])
        parent = (parent_links(fine, parts[:, level + 1], k) if level + 1 < parts.shape[1]
                  else np.full(k, -1, np.int32))
        items.append(_level_item(level_key(level), sel.prototypes, fine, parent, label, n_classes, {"level": level}))
    if result.req_partition is not None:
        items.append(_level_item(REQUESTED_KEY, sel.prototypes, result.req_partition, None, label, n_classes,
                                 {"level": -1, "req_clust": int(config.req_clust)}))
    items.append(Item(ROWS_KEY, rows, {"rows": n, "total": sel.total, "dim": d, "levels": parts.shape[1],
                                       "labelled": sel.label is not None,
                                       "unreadable": json.dumps(sel.unreadable)}))
    return items, sel.unreadable


STAGE = Stage("discover", DiscoverConfig, run, sources=("embed",), output="groups", optional=True,
              arguments=("prototypes",), executor=False,
              help="FINCH groups of the prototypes, a gallery and a 2-D map")
