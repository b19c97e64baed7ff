"""The transfer stage: kNN label transfer from a labelled prototypes store to a query store.

Each query segment takes the vote of its ``k`` (15) nearest labelled prototypes by cosine
similarity (exact inner-product search, :class:`ExactSearch`: faiss ``IndexFlatIP``'s neighbours,
faster; ``index="ivf"`` is faiss's approximate inverted-file index for millions of prototypes);
every pixel sums the votes of its segments in every view (scales, flips) of its image, and takes
the class with most votes (ties: the lowest class id), as the reference's
``inference_segsort_msc.py`` (one-hot votes of the top-k prototypes, summed). ``balance`` > 0
departs from the reference for rare classes: a neighbour of class c votes ``(mean class count /
count of c) ** balance``, the counts taken over the labelled prototypes (0.5: the square-root
re-weighting); ``geometry`` > 0 departs from it too: each segment's box and area, label-free, are
joined to its prototype on both sides (:mod:`~segsort_unsup.transfer.geometry`). A transfer
that repeats the search of one before it in the same process (a plain and a balanced row of the
same stores) reads its neighbour counts from :class:`CountsMemo`. The
result is a label PNG per image (``<key>.png``, written atomically), ready for ``segsort-unsup
evaluate semantic``. Pixels no segment covers (none in a query store embedded without labels) get
``ignore_label`` when set, else 255.

Output folder (:class:`~segsort_unsup.io.outdir.OutputFolder`, kind ``labels``): the PNGs and
``transfer.json`` (identity: settings + both stores' identities), written under a manifest and a
lock. A re-run with the same identity skips images whose PNG the manifest records complete; a
different one is refused unless ``overwrite``, which removes only the files the manifest lists.
Keys become file names only through :func:`~segsort_unsup.io.outdir.safe_relative_name`: an
image whose key could leave the folder fails alone, with one line.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import StageConfig, config_hash, run_only, setting
from ..errors import InputError, StoreError
from ..io.outdir import OutputFolder
from ..io.sources import store_content
from ..io.store import StoreReader
from ..log import get_logger, progress
from ..parallel import Executor
from ..stages import Stage, StageSummary, failure_reason
from .geometry import DIMENSIONS, item_geometry, join_geometry

log = get_logger("transfer")

INDEXES = ("flat", "ivf")
MANIFEST = "transfer.json"
ORIGINS = "made_from.json"  # key -> sha256 of the query shard its PNG was computed from


@dataclass(frozen=True)
class TransferConfig(StageConfig):
    """Settings of the transfer stage.

    k : neighbours that vote (15 in the reference).
    index : ``flat`` (exact) or ``ivf`` (approximate: ``nlist`` cells, ``nprobe`` searched).
    ignore_label : labelled prototypes of this class do not vote; unlabelled pixels get it.
    balance : class-balanced votes (see the module docstring); None or 0 counts votes as released.
    """

    stage = "transfer"

    k: int = setting(15, help="Nearest labelled prototypes that vote.", low=1)
    index: str = setting("flat", help="flat: exact search; ivf: approximate (for millions of prototypes).",
                         choices=("flat", "ivf"))
    nlist: int | None = setting(None, help="Cells of the ivf index (default: min(N / 39, 4 sqrt N) for N labelled "
                                           "prototypes).", low=1)
    nprobe: int = setting(16, help="Cells searched (ivf).", low=1)
    ignore_label: int | None = setting(None, help="Labelled prototypes of this class do not vote; uncovered "
                                                  "pixels get it (default 255).")
    balance: float | None = setting(None, help="Class-balanced votes: a neighbour of class c votes (mean class "
                                               "count / count of c) ** BALANCE over the labelled prototypes "
                                               "(0.5: square-root re-weighting; default: plain votes as "
                                               "released).", low=0.0)
    geometry: float | None = setting(None, help="Join each segment's geometry (box shape, position, fill, size) to "
                                                "its prototype with this weight: cosine = (embedding cosine + "
                                                "W^2 geometry cosine) / (1 + W^2) (default: the embedding alone, "
                                                "as released).", low=0.0, off=0.0)
    batch: int = run_only(65536, help="query prototypes per search call")

    def validate(self) -> None:
        if self.k < 1:
            raise self.bad_value("k", "must be >= 1")
        if self.index not in INDEXES:
            raise self.bad_value("index", f"choose one of {', '.join(INDEXES)}")
        if self.balance is not None and not (0.0 <= self.balance <= 4.0):
            raise self.bad_value("balance", "must be between 0 and 4 (0: plain votes)")
        if self.geometry is not None and not (0.0 <= self.geometry <= 10.0):
            raise self.bad_value("geometry", "must be between 0 and 10 (0: the embedding alone)")
        if self.nlist is not None and self.nlist < 1:
            raise self.bad_value("nlist", "must be >= 1")
        for key in ("nprobe", "batch"):
            if getattr(self, key) < 1:
                raise self.bad_value(key, "must be >= 1")


# --------------------------------------------------------------------------------------------
# Library functions
# --------------------------------------------------------------------------------------------
class ExactSearch:
    """Exact inner-product search over unit rows ``(N, D)`` (the ``flat`` index): the neighbours of
    faiss's ``IndexFlatIP`` up to float rounding, with its ``ntotal`` and ``search(query, k)``.

    Blocks of ``rows`` queries by ``cols`` prototypes (8 MiB of float32 scores by default) are
    multiplied and reduced to their own top ``k`` while they are in cache, then each query's
    candidates are merged. On a 2-core CPU that is several times faster than ``IndexFlatIP``,
    which keeps a heap per query over every score (``benchmarks/search.py``).
    """

    def __init__(self, prototypes: np.ndarray, *, rows: int = 256, cols: int = 8192):
        import torch

        self._columns = torch.from_numpy(np.ascontiguousarray(prototypes, dtype=np.float32)).T.contiguous()
        self.ntotal = int(self._columns.shape[1])
        self.rows, self.cols = rows, cols

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(Q, k)`` similarities and row numbers of each query row's ``k`` nearest, best first."""
        import torch

        q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
        k = min(k, self.ntotal)
        scores, ids = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        with torch.no_grad():
            for start in range(0, len(q), self.rows):
                block, values, found = q[start:start + self.rows], [], []
                for first in range(0, self.ntotal, self.cols):
                    part = block @ self._columns[:, first:first + self.cols]
                    top = part.topk(min(k, part.shape[1]), dim=1)
                    values.append(top.values)
                    found.append(top.indices + first)
                best = torch.cat(values, 1).topk(k, dim=1)
                scores[start:start + len(block)] = best.values.numpy()
                ids[start:start + len(block)] = torch.cat(found, 1).gather(1, best.indices).numpy()
        return scores, ids


def build_index(prototypes: np.ndarray, *, index: str = "flat", nlist: int | None = None, nprobe: int = 16,
                seed: int = 0):
    """An inner-product index over unit rows ``(N, D)`` float32: :class:`ExactSearch` for ``flat``,
    a faiss ``IndexIVFFlat`` for ``ivf``."""
    x = np.ascontiguousarray(prototypes, dtype=np.float32)
    n, d = x.shape
    if index == "flat" or n < 64:
        return ExactSearch(x)
    import faiss

    cells = nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))
    idx = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, cells, faiss.METRIC_INNER_PRODUCT)
    idx.cp.seed = seed
    idx.train(x)
    idx.nprobe = min(nprobe, cells)
    idx.add(x)
    return idx


def class_weights(labels: np.ndarray, num_classes: int, balance: float) -> np.ndarray:
    """``(C,)`` float32 vote weights ``(mean count / count of c) ** balance`` over the classes present
    in ``labels`` (classes absent get 0: they never vote); all ones when ``balance`` is 0."""
    if balance == 0:
        return np.ones(num_classes, np.float32)
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = (counts[present].mean() / counts[present]) ** balance
    return weights.astype(np.float32)


def neighbour_counts(query: np.ndarray, index, labels: np.ndarray, *, k: int, num_classes: int,
                     batch: int = 65536) -> np.ndarray:
    """``(Q, C)`` float32: for each query row, how many of its ``k`` nearest indexed prototypes
    carry each class (cosine = inner product of unit rows)."""
    q = np.ascontiguousarray(query, dtype=np.float32)
    counts = np.zeros((len(q), num_classes), np.float32)
    k = min(k, index.ntotal)
    for start in range(0, len(q), batch):
        _, nn = index.search(q[start:start + batch], k)
        ok = nn >= 0  # approximate indexes may return fewer than k
        rows = np.broadcast_to(np.arange(start, start + len(nn))[:, None], nn.shape)
        np.add.at(counts, (rows[ok], labels[nn[ok]]), 1.0)
    return counts


def knn_votes(query: np.ndarray, index, labels: np.ndarray, *, k: int, num_classes: int,
              batch: int = 65536, weights: np.ndarray | None = None) -> np.ndarray:
    """``(Q, C)`` float32 votes: :func:`neighbour_counts`, each class's count times ``weights[c]``
    when given (:func:`class_weights`)."""
    votes = neighbour_counts(query, index, labels, k=k, num_classes=num_classes, batch=batch)
    if weights is not None:
        votes *= np.asarray(weights, np.float32)[None, :]
    return votes


class CountsMemo:
    """The neighbour counts of recent searches, kept in this process for a transfer that repeats one.

    A plain and a class-balanced transfer of the same two stores (``camvid.toml``'s rows) differ
    only in how the counts are weighted, so the second one reads the counts instead of searching
    again. A search is named by the labelled store (identity and content) and the settings that
    change its neighbours; an item by its key and the sha256 of the query shard it was read from,
    so a recomputed item is searched again. At most ``limit`` bytes are kept (the oldest searches
    are dropped first); the counts are the search's own, so a result never depends on the memo.
    """

    def __init__(self, limit: int = 256 << 20):
        self.limit = limit
        self._searches: dict[str, dict[tuple[str, str], np.ndarray]] = {}
        self._bytes = 0

    def get(self, search: str, item: tuple[str, str]) -> np.ndarray | None:
        found = self._searches.get(search, {}).get(item)
        return None if found is None else found.astype(np.float32)

    def put(self, search: str, item: tuple[str, str], counts: np.ndarray) -> None:
        small = counts.astype(np.uint16 if counts.max(initial=0) < 65536 else np.float32)
        if small.nbytes > self.limit:
            return
        replaced = self._searches.get(search, {}).pop(item, None)
        self._bytes -= 0 if replaced is None else replaced.nbytes
        while self._bytes + small.nbytes > self.limit:
            oldest = next(iter(self._searches))
            self._bytes -= sum(a.nbytes for a in self._searches.pop(oldest).values())
        self._searches.setdefault(search, {})[item] = small
        self._bytes += small.nbytes

    def clear(self) -> None:
        self._searches.clear()
        self._bytes = 0


COUNTS_MEMO = CountsMemo()


def pixel_labels(votes: np.ndarray, maps: np.ndarray, *, fill: int = 255) -> np.ndarray:
    """Per-pixel argmax of the votes summed over views.

    votes : (K, C) votes of an image's segments. maps : (V, H, W) or (H, W) segment ids (-1: none).
    Returns (H, W) int64 classes (``fill`` where no view has a segment).
    """
    maps = np.asarray(maps)
    if maps.ndim == 2:
        maps = maps[None]
    c = votes.shape[1]
    total = np.zeros(maps.shape[1:] + (c,), np.float32)
    covered = np.zeros(maps.shape[1:], bool)
    for m in maps:
        inside = m >= 0
        total[inside] += votes[m[inside]]
        covered |= inside
    out = total.argmax(axis=-1).astype(np.int64)
    out[~covered] = fill
    return out


def open_prototypes(path: str | os.PathLike, what: str) -> StoreReader:
    """A prototypes store to read (``what`` names its role in errors: labelled, query, scored)."""
    from ..io.store import is_store

    if not is_store(path):
        raise InputError(f"{path}: not a store folder (the {what} set must be a prototypes store written by "
                         "`segsort-unsup embed`)")
    reader = StoreReader(path)
    if reader.kind != "prototypes":
        raise StoreError(path, f"is a {reader.kind!r} store; the {what} set must be a prototypes store "
                               "(run `segsort-unsup embed`)")
    if len(reader) == 0:
        raise StoreError(path, f"the {what} prototypes store is empty (its embed run stored no image)")
    return reader


def labelled_table(reader: StoreReader, *, ignore_label: int | None = None,
                   geometry: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All labelled prototypes ``(N, D)`` and their classes ``(N,)`` of a store (``ignore_label`` rows
    dropped); with ``geometry`` > 0 each joined to its region's geometry (:func:`query_prototypes`)."""
    keys = reader.keys()
    first = reader.read(keys[0])
    if "label" not in first.arrays:
        raise StoreError(reader.root, "this prototypes store has no labels: embed the labelled set with "
                                      "--labels DIR")
    protos, failed = reader.stack("prototypes")
    labels, failed2 = reader.stack("label")
    if failed or failed2:
        bad = (failed or failed2)[0]
        raise StoreError(reader.root, f"item {bad[0]} cannot be read ({bad[1]})")
    if protos.keys != labels.keys:
        unlabelled = sorted(set(protos.keys) - set(labels.keys))
        raise StoreError(reader.root, f"{len(unlabelled)} item(s) have prototypes but no labels (e.g. "
                                      f"{unlabelled[0]!r}); embed the labelled set again with --labels DIR "
                                      "holding a label PNG for every image")
    x = joined_prototypes(reader, protos.keys, protos.array, geometry)
    y = labels.array.astype(np.int64)
    if ignore_label is not None:
        keep = y != ignore_label
        x, y = x[keep], y[keep]
    if not len(x):
        raise StoreError(reader.root, "no labelled prototype left (every one has the ignore label)")
    return x, y


def joined_prototypes(reader: StoreReader, keys: list[str], prototypes: np.ndarray,
                      geometry: float | None) -> np.ndarray:
    """``prototypes`` stacked from the items ``keys`` of ``reader``; with ``geometry`` > 0 each row joined
    to its region's geometry (:mod:`~segsort_unsup.transfer.geometry`)."""
    if not geometry:
        return prototypes
    shapes = [item_geometry(reader.read(key, ("bbox", "area"))) for key in keys]
    return join_geometry(prototypes, np.concatenate(shapes), geometry)


def query_prototypes(item: Any, geometry: float | None = None) -> np.ndarray:
    """A store item's prototypes, with ``geometry`` > 0 joined to its regions' geometry
    (:mod:`~segsort_unsup.transfer.geometry`) as :func:`labelled_table` joins the labelled ones."""
    if not geometry:
        return item.arrays["prototypes"]
    return join_geometry(item.arrays["prototypes"], item_geometry(item), geometry)


def write_label_map(folder: OutputFolder, target: Path, item: Any, votes: np.ndarray, *, fill: int) -> None:
    """``target``: the label PNG of an embed-store item whose segments voted ``votes`` (K, C), over
    its views where it has them (:func:`pixel_labels`)."""
    maps = item.arrays["views"] if "views" in item.arrays else item.arrays["segments"]
    folder.write_bytes(target, label_png(target, pixel_labels(votes, maps, fill=fill)))


def label_png(path: Path, labels: np.ndarray) -> bytes:
    """The label PNG's bytes (8-bit, or 16-bit for class ids above 255)."""
    import cv2

    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    ok, data = cv2.imencode(".png", labels.astype(dtype))
    if not ok:
        raise OSError(f"cannot encode {path}")
    return data.tobytes()


def run(config: TransferConfig, inputs: Any, output: str | os.PathLike, *,
        executor: Executor | None = None, overwrite: bool | str = False) -> StageSummary:
    """Label PNGs for every image of the query store, by kNN from the labelled store.

    ``inputs`` is ``[labelled, query]``: two prototypes stores (the labelled one embedded with
    ``--labels``). ``executor`` is unused (one in-process pass; the search uses the cores).
    """
    try:
        labelled_path, query_path = inputs
    except (TypeError, ValueError):
        raise InputError("transfer needs two inputs: a labelled prototypes store and a query prototypes store") from None
    labelled = open_prototypes(labelled_path, "labelled")
    query = open_prototypes(query_path, "query")
    x, y = labelled_table(labelled, ignore_label=config.ignore_label, geometry=config.geometry)
    num_classes = int(y.max()) + 1
    known = set(np.unique(y).tolist())
    if _has_labels(query):
        qlab, _ = query.stack("label")
        q_classes = set(np.unique(qlab.array).tolist()) - ({config.ignore_label} if config.ignore_label is not None else set())
        extra = sorted(q_classes - known)
        if extra:
            raise InputError(f"class sets differ: the query store {query_path} has classes {extra} that the "
                             f"labelled store {labelled_path} lacks (embed both with the same labelling)")
    joined = DIMENSIONS if config.geometry else 0
    if x.shape[1] - joined != query.read(query.keys()[0], ("prototypes",)).arrays["prototypes"].shape[1]:
        raise InputError(f"prototype dimensions differ between {labelled_path} and {query_path} "
                         "(embed both with the same model and --features)")
    identity = config.identity(labelled=labelled.config_hash, query=query.config_hash,
                               labelled_content=store_content(labelled))
    from ..embed.stage import units_of

    units = {"labelled": units_of(labelled), "query": units_of(query)}
    log.info("transfer: segment units: labelled %s, query %s", units["labelled"], units["query"])
    weights = class_weights(y, num_classes, config.balance or 0.0)
    record = {"identity": identity, "num_classes": num_classes, "labelled": str(labelled_path),
              "query": str(query_path), "units": units,
              "class_weights": [round(float(w), 6) for w in weights]}
    with OutputFolder(output, kind="labels", identity=identity, overwrite=overwrite,
                      meta={"labelled": str(labelled_path), "query": str(query_path)}) as folder:
        if folder.replaced_keys:
            log.info("transfer: settings or stores changed (%s); %s starts over", ", ".join(folder.replaced_keys),
                     output)
        folder.write_text(folder.path_for(MANIFEST), json.dumps(record, indent=2))
        # the search: everything in the identity but the vote weights and the query store
        search = config_hash({key: value for key, value in identity.items() if key not in ("balance", "query")})
        summary = _label_images(config, folder, query, _LazyIndex(x, config), y, num_classes, weights, search)
    summary.identity_hash = config_hash(identity)
    labelled.close()
    query.close()
    return summary


class _LazyIndex:
    """The labelled prototypes' index, built on the first search (none when every item's
    counts are already in :data:`COUNTS_MEMO`)."""

    def __init__(self, prototypes: np.ndarray, config: TransferConfig):
        self.prototypes, self.config, self._index = prototypes, config, None

    def get(self):
        if self._index is None:
            self._index = build_index(self.prototypes, index=self.config.index, nlist=self.config.nlist,
                                      nprobe=self.config.nprobe)
        return self._index


def _label_images(config: TransferConfig, folder: OutputFolder, query: StoreReader, index: _LazyIndex,
                  y: np.ndarray, num_classes: int, weights: np.ndarray, search: str) -> StageSummary:
    """A label PNG per query image not yet complete in ``folder``; a bad key or item fails alone."""
    keys = query.keys()
    summary = StageSummary("transfer", output=str(folder.path), total=len(keys))
    fill = config.ignore_label if config.ignore_label is not None else 255
    log.info("transfer: %d labelled prototypes (%d classes), %d query images, k=%d, %s index%s%s", len(y),
             num_classes, len(keys), config.k, config.index,
             f", class-balanced votes ({config.balance})" if config.balance else "",
             f", region geometry joined (weight {config.geometry})" if config.geometry else "")
    origins = _forget_stale(folder, query, keys)
    for key in progress(keys, desc="transfer"):
        try:
            target = folder.file_for(key, ".png")
            if folder.is_complete(target):
                summary.skipped += 1
                continue
            item = query.read(key)
            counts = COUNTS_MEMO.get(search, (key, origins[key]))
            if counts is None:
                rows = query_prototypes(item, config.geometry)
                counts = neighbour_counts(rows, index.get(), y, k=config.k, num_classes=num_classes,
                                          batch=config.batch)
                COUNTS_MEMO.put(search, (key, origins[key]), counts)
            write_label_map(folder, target, item, counts * weights[None, :], fill=fill)
            summary.done += 1
        except Exception as exc:  # noqa: BLE001 - one bad item never stops the run
            reason = failure_reason(exc)
            log.warning("transfer: %s: %s", key, reason)
            summary.failed.append((key, reason))
    return summary


def _forget_stale(folder: OutputFolder, query: StoreReader, keys: list[str]) -> dict[str, str]:
    """Un-record the PNGs of query items recomputed since they were written (a changed photo lands in
    a new shard), then record what every PNG of this run is made from: the query shard's sha256
    (returned, key -> sha256)."""
    made_from = _read_origins(folder)
    origins = {key: query.shard_sha256(key) for key in keys}
    for key in keys:
        if made_from.get(key) != origins[key]:
            with contextlib.suppress(InputError):  # a key unfit for a file name fails in the loop
                folder.forget(folder.file_for(key, ".png"))
    folder.write_text(folder.path_for(ORIGINS), json.dumps(origins, indent=0, sort_keys=True))
    return origins


def _read_origins(folder: OutputFolder) -> dict[str, str]:
    """Which query item (its shard's sha256) each recorded PNG was made from: a query item
    recomputed since (a changed photo) has its PNG redone; a damaged record redoes them all."""
    path = folder.path_for(ORIGINS)
    if not folder.is_complete(path):
        return {}
    try:
        origins = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return origins if isinstance(origins, dict) else {}


def _has_labels(reader: StoreReader) -> bool:
    try:
        return "label" in reader.read(reader.keys()[0], None).arrays
    except (StoreError, KeyError):
        return False


STAGE = Stage("transfer", TransferConfig, run, sources=("embed", "embed"), output="predictions", optional=True,
              arguments=("labelled", "query"), executor=False,
              help="kNN label transfer from labelled prototypes, label PNG per image")
