"""BSDS region benchmarks (Arbelaez et al., TPAMI 2011; BSR ``regionBench``): Covering, PRI, VI.

A hierarchy given as a ucm2 (doubled grid, ``(2H+1, 2W+1)``) is cut at each threshold ``t``
as BSR does: connected components (8-connectivity, MATLAB ``bwlabel``) of ``ucm2 <= t`` on the
doubled grid, read at the pixel positions ``[1::2, 1::2]``
(:func:`~segsort_unsup.ucm.hierarchy.labels_from_ucm2` with ``connectivity=8``). A list of
segmentations is used as is (thresholds 1..K).

A merge tree (a segments store's ``parents``, ``altitudes``, ``leaves``) is cut without pixel maps:
:func:`region_counts_tree` counts the (leaves x human labels) contingency once and sums its rows
per threshold; for this package's ucm2s (corners are the largest of their four boundaries) that is
the same 8-connected cut, and the scores are the same to the bit.

Against the human segmentations of the image:

* Segmentation Covering of the humans by the machine: sum over human regions (all humans) of
  ``area x best Jaccard overlap with a machine region``, over the total human area (``cntR/sumR``);
  the reverse covering (machine by humans) is ``cntP/sumP``; label 0 is ignored on both sides;
* PRI: Rand index averaged over the humans; VI: variation of information (log base 2, as BSR),
  averaged over the humans.

Summaries follow BSR's ``collect_eval_reg``: covering ODS (best threshold for the dataset),
OIS (best threshold per image, counts summed) and best (best region per human region over all
thresholds); PRI and VI at ODS (best dataset mean) and OIS (mean of per-image bests).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_write_text
from ..log import progress
from ..ucm.hierarchy import labels_from_ucm2
from ._kernels import contingency


def _levels_between(values: np.ndarray, lo: float, hi: float) -> bool:
    """Whether a level lies in ``(min(lo, hi), max(lo, hi)]``: whether the cuts at ``lo`` and ``hi`` differ."""
    lo, hi = min(lo, hi), max(lo, hi)
    i = np.searchsorted(values, lo, side="right")
    return i < len(values) and values[i] <= hi


def _as_cut(t: float, dtype: np.dtype) -> np.floating:
    """A threshold in the ucm2's own float type that cuts exactly as ``v <= t`` in float64: for
    float32 the largest float32 not above ``t`` (a float32 ucm2 is compared without a float64 copy)."""
    t = np.float64(t)
    if dtype != np.float32:
        return t
    t32 = np.float32(t)
    return np.nextafter(t32, np.float32(-np.inf)) if np.float64(t32) > t else t32


def ucm2_segmentations(ucm2: np.ndarray, thresholds: np.ndarray) -> Iterator[np.ndarray]:
    """Cut a ucm2 at every threshold, one cut at a time (int32, ids from 1); while no ucm level
    lies between two thresholds the same array is yielded again.

    A float32 ucm2 (as stored) is cut in float32 at thresholds that give the float64 cut, so
    neither the ucm2 nor the cuts are held as float64/int64 full-size copies.
    """
    ucm2 = np.asarray(ucm2)
    if ucm2.dtype != np.float32:
        ucm2 = ucm2.astype(np.float64, copy=False)
    levels = np.unique(ucm2).astype(np.float64)
    seg = None
    prev_t = None
    for t in thresholds:
        if seg is None or _levels_between(levels, prev_t, t):
            seg = None  # the previous cut is not needed while the next one is labelled
            # BSR's bwlabel(ucm2 <= t)(2:2:end, 2:2:end): 8-connected, ids from 1 (0: not labelled)
            seg = labels_from_ucm2(ucm2, _as_cut(t, ucm2.dtype), connectivity=8, order="F")
            seg += 1
        yield seg
        prev_t = t


@dataclass
class RegionCounts:
    """Per-threshold region scores of one image (BSR ``*_ev2.txt``, ``*_ev3.txt``, ``*_ev4.txt``)."""

    thresholds: np.ndarray
    cnt_r: np.ndarray
    sum_r: np.ndarray
    cnt_p: np.ndarray
    sum_p: np.ndarray
    cnt_r_best: float
    ri: np.ndarray
    voi: np.ndarray


def _jaccard_best(seg: np.ndarray, gts: Sequence[np.ndarray]):
    """Best Jaccard overlaps: per machine label (over all human regions) and per human region."""
    n_seg = int(seg.max()) + 1
    seg_area = np.bincount(seg.ravel(), minlength=n_seg).astype(np.float64)
    best_seg = np.zeros(n_seg, np.float64)
    best_gt = []
    for gt in gts:
        n_gt = int(gt.max()) + 1
        table = contingency(gt, seg, n_gt, n_seg).astype(np.float64)
        gt_area = table.sum(axis=1)
        union = gt_area[:, None] + seg_area[None, :] - table
        jac = np.divide(table, union, out=np.zeros_like(table), where=union > 0)
        jac = jac[1:, 1:]  # label 0 takes no part
        if jac.size:
            best_seg[1:] = np.maximum(best_seg[1:], jac.max(axis=0))
            best_gt.append(jac.max(axis=1))
        else:
            best_gt.append(np.zeros(max(n_gt - 1, 0)))
    return best_seg, best_gt, seg_area


def rand_index_voi(seg: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Rand index and variation of information (log base 2, as BSR) of two label maps."""
    # labels start at 1, as BSR's compare_segmentations makes them
    if seg.min() < 1:
        seg = seg.astype(np.int64) - int(seg.min()) + 1
    if gt.min() < 1:
        gt = gt.astype(np.int64) - int(gt.min()) + 1
    table = contingency(seg, gt, int(seg.max()) + 1, int(gt.max()) + 1).astype(np.float64)
    rows, cols = np.nonzero(table)
    return _ri_voi(table.sum(axis=1), table.sum(axis=0), rows, cols, table[rows, cols])


def _ri_voi(a: np.ndarray, b: np.ndarray, rows: np.ndarray, cols: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """Rand index and VI of a contingency table given by its nonzero entries in row-major order
    (``counts`` float64 at ``rows``, ``cols``) and its row and column sums ``a``, ``b``.

    Sums of squared counts are sums of integers below 2**53, exact in any order; the entropies
    are summed in label order, so a dense table and its nonzeros give the same bits.
    """
    n = counts.sum()
    ri = 1.0 - ((a * a).sum() / 2 + (b * b).sum() / 2 - (counts * counts).sum()) / (n * (n - 1) / 2)
    pa = a[a > 0] / n
    pb = b[b > 0] / n
    h1 = -(pa * np.log2(pa)).sum()
    h2 = -(pb * np.log2(pb)).sum()
    joint = counts / n
    outer = (a[rows] * b[cols]) / (n * n)
    mi = (joint * np.log2(joint / outer)).sum()
    return float(ri), float(h1 + h2 - 2 * mi)


def _labels(array: np.ndarray) -> np.ndarray:
    """A C-contiguous integer label map in its own type (int64 only for other types)."""
    array = np.asarray(array)
    return np.ascontiguousarray(array, dtype=array.dtype if array.dtype.kind in "iu" else np.int64)


def region_counts(
    segs: Iterable[np.ndarray],
    gts: Sequence[np.ndarray],
    *,
    thresholds: np.ndarray | None = None,
) -> RegionCounts:
    """BSR ``evaluation_reg_image`` for machine segmentations (one per threshold) vs human ``gts``.

    ``segs`` may be an iterator (as :func:`ucm2_segmentations` gives): one segmentation is held at
    a time, and the scores of one that is the same array as the previous one are reused.
    """
    if not gts:
        raise ValueError("no human segmentations")
    gts = [_labels(g) for g in gts]
    if thresholds is None:
        segs = list(segs)
        thresholds = np.arange(1, len(segs) + 1, dtype=np.float64)
    thresholds = np.asarray(thresholds, np.float64)

    def scores() -> Iterator[_Scores]:
        previous = cached = None
        for seg in segs:
            if seg is not previous:
                previous = seg
                cached = _seg_scores(seg, gts)
            yield cached

    return _accumulate(thresholds, gts, scores())


@dataclass(frozen=True)
class _Scores:
    """Region scores of one segmentation against all humans."""

    cnt_p: float
    sum_p: float
    best_gt: np.ndarray  # best Jaccard of each human region (label >= 1), humans concatenated
    ri: float  # mean over the humans
    voi: float


def _seg_scores(seg: np.ndarray, gts: Sequence[np.ndarray]) -> _Scores:
    seg = _labels(seg)
    shape = gts[0].shape
    if seg.shape != shape:
        raise ValueError(f"segmentation {seg.shape} differs from the ground truth {shape}")
    if seg.min() < 0:
        raise ValueError("segment labels must be >= 0")
    best_seg, best_gt, seg_area = _jaccard_best(seg, gts)
    pairs = [rand_index_voi(seg, g) for g in gts]
    return _Scores(float((seg_area[1:] * best_seg[1:]).sum()), float(seg_area[1:].sum()),
                   np.concatenate(best_gt) if best_gt else np.zeros(0),
                   float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs])))


def _accumulate(thresholds: np.ndarray, gts: Sequence[np.ndarray], scores: Iterable[_Scores]) -> RegionCounts:
    """Per-threshold counts from one :class:`_Scores` per threshold (BSR's ``*_ev2/3/4.txt``)."""
    n_steps = len(thresholds)
    gt_areas = np.concatenate([np.bincount(g.ravel(), minlength=int(g.max()) + 1)[1:] for g in gts]).astype(np.float64)
    cnt_r = np.zeros(n_steps)
    sum_r = np.zeros(n_steps)
    cnt_p = np.zeros(n_steps)
    sum_p = np.zeros(n_steps)
    ri = np.zeros(n_steps)
    voi = np.zeros(n_steps)
    best_overall = np.zeros_like(gt_areas)
    steps = 0
    for t, sc in enumerate(scores):
        steps += 1
        if t >= n_steps:
            raise ValueError(f"more segmentations than the {n_steps} thresholds")
        cnt_p[t] = sc.cnt_p
        sum_p[t] = sc.sum_p
        cnt_r[t] = float((gt_areas * sc.best_gt).sum())
        sum_r[t] = float(gt_areas.sum())
        best_overall = np.maximum(best_overall, sc.best_gt)
        ri[t] = sc.ri
        voi[t] = sc.voi
    if steps != n_steps:
        raise ValueError(f"{steps} segmentations for {n_steps} thresholds")
    return RegionCounts(thresholds, cnt_r, sum_r, cnt_p, sum_p, float((gt_areas * best_overall).sum()), ri, voi)


def region_counts_ucm2(ucm2: np.ndarray, gts: Sequence[np.ndarray], *, thresholds: np.ndarray) -> RegionCounts:
    """Region counts of a ucm2 at ``thresholds`` (one cut held at a time)."""
    gts_checked = [_labels(g) for g in gts]
    thresholds = np.asarray(thresholds, np.float64)
    segs = _with_progress(ucm2_segmentations(ucm2, thresholds), thresholds, gts_checked)
    return region_counts(segs, gts_checked, thresholds=thresholds)


# --------------------------------------------------------------------------------------
# A merge tree: contingency of (leaves x humans) once, every cut by summing its rows
# --------------------------------------------------------------------------------------

PROGRESS_PIXELS = 8_000_000  # images from this size show a per-threshold progress bar
_CHUNK_PIXELS = 1 << 21


@dataclass
class _Table:
    """Nonzero entries of a contingency table, row-major: ``rows`` (region ids), ``cols`` (human
    labels), ``counts`` (float64, exact integers)."""

    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray


def _sum_rows(table: _Table, new_ids: np.ndarray, n_rows: int, n_cols: int) -> _Table:
    """The table whose row ``new_ids[r]`` sums the rows ``r`` of ``table`` (entries sorted row-major)."""
    keys = new_ids[table.rows].astype(np.int64) * n_cols + table.cols
    if n_rows * n_cols <= max(4 * keys.size, 1 << 22):
        dense = np.bincount(keys, weights=table.counts, minlength=n_rows * n_cols)
        flat = np.flatnonzero(dense)
        counts = dense[flat]
    else:
        flat, inverse = np.unique(keys, return_inverse=True)
        counts = np.bincount(inverse, weights=table.counts, minlength=flat.size)
    rows, cols = np.divmod(flat, n_cols)
    return _Table(rows, cols, counts)


def _leaf_table(leaves: np.ndarray, gt: np.ndarray) -> _Table:
    """Contingency of (leaves x human labels), nonzeros only; read in row strips so no full-size
    temporary is made."""
    n_cols = int(gt.max()) + 1
    h, w = leaves.shape
    step = max(1, _CHUNK_PIXELS // max(w, 1))
    keys, counts = [], []
    for y in range(0, h, step):
        k = leaves[y:y + step].astype(np.int64).ravel() * n_cols + gt[y:y + step].ravel()
        u, c = np.unique(k, return_counts=True)
        keys.append(u)
        counts.append(c)
    keys = np.concatenate(keys)
    counts = np.concatenate(counts).astype(np.float64)
    flat, inverse = np.unique(keys, return_inverse=True)
    del keys
    total = np.bincount(inverse, weights=counts, minlength=flat.size)
    rows, cols = np.divmod(flat, n_cols)
    return _Table(rows, cols, total)


def _tree_scores(table: _Table, seg_area: np.ndarray, gt_area: np.ndarray,
                 best_seg: np.ndarray) -> tuple[np.ndarray, float, float]:
    """One human's part of :func:`_seg_scores` from the nonzeros of (cut regions x human labels):
    best Jaccard per human region (``best_seg`` updated in place), Rand index, VI."""
    s, g, c = table.rows, table.cols, table.counts
    fg = g >= 1  # label 0 takes no part in the covering
    jac = c[fg] / (gt_area[g[fg]] + seg_area[s[fg]] - c[fg])
    np.maximum.at(best_seg, s[fg], jac)
    best_gt = np.zeros(max(gt_area.size - 1, 0))
    np.maximum.at(best_gt, g[fg] - 1, jac)
    ri, vi = _ri_voi(seg_area, gt_area, s, g, c)
    return best_gt, ri, vi


def tree_region_scores(parents: np.ndarray, altitudes: np.ndarray, leaves: np.ndarray,
                       gts: Sequence[np.ndarray], thresholds: np.ndarray) -> Iterator[_Scores]:
    """Region scores of the cuts of a merge tree, one per threshold, without a pixel map per cut.

    The (leaves x human labels) contingency is counted once (O(pixels)); the table of each cut
    sums its rows through :func:`~segsort_unsup.ucm.hierarchy.cut_labels` (O(nonzeros)), from the
    previous cut's table while the thresholds increase. Regions are numbered as BSR's column-major
    ``bwlabel`` numbers them, so every sum runs in the same order and the scores equal those of
    the pixel cuts ``cut_labels(parents, altitudes, threshold=t)[leaves]`` to the bit.
    """
    from ..ucm.hierarchy import cut_labels
    from ._kernels import first_in_column_order, ids_in_visit_order

    leaves = np.ascontiguousarray(leaves, dtype=np.int32)
    n_leaves = (np.asarray(parents).size + 1) // 2
    if leaves.ndim != 2 or leaves.shape != gts[0].shape:
        raise ValueError(f"leaves {leaves.shape} differ from the ground truth {gts[0].shape}")
    if leaves.size and (leaves.min() < 0 or leaves.max() >= n_leaves):
        raise ValueError(f"leaves holds labels outside 0..{n_leaves - 1} (the tree's leaves)")
    big = np.iinfo(np.int64).max
    first = np.full(n_leaves, big, np.int64)
    first_in_column_order(leaves, first)
    order = np.argsort(first, kind="stable")
    n_valid = int(np.count_nonzero(first != big))
    del first
    leaf_area = np.bincount(leaves.ravel(), minlength=n_leaves).astype(np.float64)
    gt_areas = [np.bincount(g.ravel(), minlength=int(g.max()) + 1).astype(np.float64) for g in gts]
    n_cols = [a.size for a in gt_areas]
    leaf_tables = [_leaf_table(leaves, g) for g in gts]
    del leaves
    thresholds = np.asarray(thresholds, np.float64)
    increasing = bool(np.all(np.diff(thresholds) >= 0))
    levels = np.unique(np.asarray(altitudes)).astype(np.float64)
    tables = leaf_tables
    to_leaf = np.arange(n_leaves)  # a leaf of each row of ``tables``
    if increasing:
        leaf_tables = None  # each cut is summed from the previous one
    ids = np.empty(n_leaves, np.int64)
    cached = prev_t = None
    for t in thresholds:
        if cached is None or _levels_between(levels, prev_t, t):
            cut = cut_labels(parents, altitudes, threshold=t)
            k = ids_in_visit_order(cut, order, n_valid, ids)
            sid = ids[cut]  # region id (1..k) of every leaf
            seg_area = np.bincount(sid, weights=leaf_area, minlength=k + 1)
            if not increasing:  # each cut from the leaves
                tables, to_leaf = leaf_tables, np.arange(n_leaves)
            new_ids = sid[to_leaf]
            tables = [_sum_rows(tb, new_ids, k + 1, nc) for tb, nc in zip(tables, n_cols)]
            rep = np.zeros(k + 1, np.int64)
            rep[sid] = np.arange(n_leaves)
            to_leaf = rep
            best_seg = np.zeros(k + 1)
            parts = [_tree_scores(tb, seg_area, a, best_seg) for tb, a in zip(tables, gt_areas)]
            cached = _Scores(float((seg_area[1:] * best_seg[1:]).sum()), float(seg_area[1:].sum()),
                             np.concatenate([p[0] for p in parts]) if parts else np.zeros(0),
                             float(np.mean([p[1] for p in parts])), float(np.mean([p[2] for p in parts])))
        prev_t = t
        yield cached


def region_counts_tree(parents: np.ndarray, altitudes: np.ndarray, leaves: np.ndarray,
                       gts: Sequence[np.ndarray], *, thresholds: np.ndarray) -> RegionCounts:
    """Region counts of a merge tree's cuts at ``thresholds`` (a segments store's ``parents``,
    ``altitudes``, ``leaves``): for this package's ucm2s the same numbers as
    :func:`region_counts_ucm2` on its ucm2, in O(pixels) once plus O(nonzeros) per threshold."""
    if not gts:
        raise ValueError("no human segmentations")
    gts = [_labels(g) for g in gts]
    for g in gts:
        if g.min() < 0:
            raise ValueError("human segmentation labels must be >= 0")
    thresholds = np.asarray(thresholds, np.float64)
    scores = tree_region_scores(parents, altitudes, leaves, gts, thresholds)
    return _accumulate(thresholds, gts, _with_progress(scores, thresholds, gts))


def _with_progress(items: Iterator, thresholds: np.ndarray, gts: Sequence[np.ndarray]) -> Iterator:
    """Items one per threshold, with a progress bar (and a stop check) when the image is huge."""
    from ..parallel import check_stop

    huge = gts[0].size >= PROGRESS_PIXELS
    with progress(total=len(thresholds), desc="regions: thresholds", unit="thr", disable=None if huge else True) as bar:
        for item in items:
            check_stop()
            yield item
            bar.update(1)


@dataclass
class RegionSummary:
    """Dataset-level region scores (BSR ``eval_cover.txt`` and ``eval_RI_VOI.txt``) and curves."""

    thresholds: np.ndarray
    covering: np.ndarray  # dataset covering per threshold
    cover_ods_threshold: float
    cover_ods: float
    cover_ois: float
    cover_best: float
    per_image: np.ndarray  # (N, 3): best threshold, covering, reverse covering
    ri: np.ndarray
    voi: np.ndarray
    ri_ods_threshold: float
    ri_ods: float
    ri_ois: float
    voi_ods_threshold: float
    voi_ods: float
    voi_ois: float

    def line(self) -> str:
        return (f"Covering ODS={self.cover_ods:.3f} OIS={self.cover_ois:.3f} best={self.cover_best:.3f}  "
                f"PRI ODS={self.ri_ods:.3f} OIS={self.ri_ois:.3f}  VI ODS={self.voi_ods:.3f} OIS={self.voi_ois:.3f}")


def _ratio(cnt, tot):
    cnt = np.asarray(cnt, np.float64)
    tot = np.asarray(tot, np.float64)
    return cnt / (tot + (tot == 0))


def summarize_regions(counts: Sequence[RegionCounts]) -> RegionSummary:
    """Combine per-image region counts as BSR's ``collect_eval_reg``."""
    if not counts:
        raise ValueError("no images to summarise")
    thresholds = counts[0].thresholds
    n = len(thresholds)
    tot = np.zeros((4, n))
    best = np.zeros(4)
    cnt_r_best_total = 0.0
    ri_sum = np.zeros(n)
    voi_sum = np.zeros(n)
    ri_best = 0.0
    voi_best = 0.0
    per_image = np.zeros((len(counts), 3))
    for k, c in enumerate(counts):
        if len(c.thresholds) != n:
            raise ValueError("all images need the same number of thresholds")
        r = _ratio(c.cnt_r, c.sum_r)
        p = _ratio(c.cnt_p, c.sum_p)
        i = int(np.argmax(r))
        per_image[k] = (thresholds[i], r[i], p[i])
        tot += np.array([c.cnt_r, c.sum_r, c.cnt_p, c.sum_p])
        j = int(np.flatnonzero(r == r.max())[-1])
        best += np.array([c.cnt_r[j], c.sum_r[j], c.cnt_p[j], c.sum_p[j]])
        cnt_r_best_total += c.cnt_r_best
        ri_sum += c.ri
        voi_sum += c.voi
        ri_best += c.ri.max()
        voi_best += c.voi.min()
    covering = _ratio(tot[0], tot[1])
    i = int(np.argmax(covering))
    m = len(counts)
    ri = ri_sum / m
    voi = voi_sum / m
    iri = int(np.argmax(ri))
    ivoi = int(np.argmin(voi))
    return RegionSummary(
        thresholds=thresholds, covering=covering,
        cover_ods_threshold=float(thresholds[i]), cover_ods=float(covering[i]),
        cover_ois=float(_ratio(best[0], best[1])), cover_best=float(cnt_r_best_total / tot[1][0]),
        per_image=per_image, ri=ri, voi=voi,
        ri_ods_threshold=float(thresholds[iri]), ri_ods=float(ri[iri]), ri_ois=ri_best / m,
        voi_ods_threshold=float(thresholds[ivoi]), voi_ods=float(voi[ivoi]), voi_ois=voi_best / m,
    )


def _g(x: float) -> str:
    return f"{x:10g}"


def write_region_results(out_dir: str | Path, summary: RegionSummary) -> list[Path]:
    """Write BSR's ``eval_cover*.txt`` and ``eval_RI_VOI*.txt`` (images numbered 1..N in order)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = summary
    files = {
        "eval_cover.txt": " ".join(_g(x) for x in (s.cover_ods_threshold, s.cover_ods, s.cover_ois, s.cover_best)) + "\n",
        "eval_cover_img.txt": "".join(f"{k + 1:10d} " + " ".join(_g(x) for x in row) + "\n"
                                      for k, row in enumerate(s.per_image)),
        "eval_cover_th.txt": "".join(f"{_g(t)} {_g(c)}\n" for t, c in zip(s.thresholds, s.covering)),
        "eval_RI_VOI_thr.txt": "".join(f"{_g(t)} {_g(a)} {_g(b)}\n" for t, a, b in zip(s.thresholds, s.ri, s.voi)),
        "eval_RI_VOI.txt": " ".join(_g(x) for x in (s.ri_ods_threshold, s.ri_ods, s.ri_ois,
                                                    s.voi_ods_threshold, s.voi_ods, s.voi_ois)) + "\n",
    }
    paths = []
    for name, text in files.items():
        path = out / name
        atomic_write_text(path, text)
        paths.append(path)
    return paths


def plot_regions(summary: RegionSummary, path: str | Path, *, label: str = "") -> Path:
    """Covering, PRI and VI against the ucm threshold, ODS points marked (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), dpi=110)
    rows = (("Covering", s.covering, s.cover_ods_threshold, s.cover_ods, "higher is better"),
            ("PRI", s.ri, s.ri_ods_threshold, s.ri_ods, "higher is better"),
            ("VI", s.voi, s.voi_ods_threshold, s.voi_ods, "lower is better"))
    for ax, (name, values, t, v, hint) in zip(axes, rows):
        ax.plot(s.thresholds, values, lw=2)
        ax.plot([t], [v], "o", color="C3")
        ax.set(xlabel="ucm threshold (boundaries weaker than this are removed)", ylabel=name,
               title=f"{name} ODS {v:.3f} at {t:.2f} ({hint})")
        ax.title.set_fontsize(9)
        ax.xaxis.label.set_fontsize(8)
        ax.grid(True, color="0.9")
    if label:
        fig.suptitle(f"BSDS region benchmarks: {label}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
