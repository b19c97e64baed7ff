"""BSDS boundary benchmark (Martin, Fowlkes & Malik 2004; BSR ``boundaryBench``), in Python.

For each image and threshold the machine boundary map is binarised (``pb >= t``), thinned
(MATLAB ``bwmorph(.., 'thin', Inf)``), and its pixels are put in correspondence with each human's
boundary pixels within ``max_dist`` x image diagonal. As in BSR's ``correspondPixels``, the
correspondence is a minimum-cost assignment where a matched pair costs its distance
(x100, rounded) and an unmatched pixel an outlier cost ``ceil(100 * 100 * max_dist_px)``:

* recall: ``cntR / sumR``, human pixels matched, summed over all humans;
* precision: ``cntP / sumP``, machine pixels matched to at least one human.

BSR solves each assignment with Goldberg's CSA on a sparse random outlier graph; here it is
solved exactly (successive shortest paths, integer costs), once per human per image: the
thresholds are visited from the sparsest map down and each threshold only inserts the pixels
it adds (see :func:`~._kernels.match_incremental`).

Summaries follow BSR's ``collect_eval_bdry``: ODS (best F of the dataset-wide P/R curve,
linearly interpolated between thresholds), OIS (per image best threshold, counts summed), AP
(area under the interpolated P/R curve on recall 0:0.01:1) and R50 (recall at 50% precision,
as in Dollar's ``edgesEvalPlot``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_write_text
from ..log import progress
from ..parallel import check_stop
from ._kernels import (_thin_lut, assign_with_outliers, candidate_edges, match_state, match_steps,
                       reverse_edges, thin_kernel)

MAX_DIST = 0.0075
OUTLIER_COST = 100.0
COST_MULTIPLIER = 100
N_THRESHOLDS = 99
PROGRESS_PIXELS = 8_000_000  # images from this size show progress bars per threshold / matching step

_NO_OBJECTIVE = np.zeros(0, np.int64)
_NO_COLS = np.zeros(0, np.int32)
EDGE_BYTES = 16  # bytes per candidate edge: ids and costs (int32), both ways
_LUTS: tuple[np.ndarray, np.ndarray] | None = None


def default_thresholds(n: int = N_THRESHOLDS) -> np.ndarray:
    """BSR's thresholds: ``linspace(1/(n+1), 1 - 1/(n+1), n)``."""
    if n < 1:
        raise ValueError(f"number of thresholds must be >= 1, got {n}")
    return np.linspace(1.0 / (n + 1), 1.0 - 1.0 / (n + 1), n)


def thin(mask: np.ndarray) -> np.ndarray:
    """Morphological thinning to 1-pixel-wide curves, as MATLAB ``bwmorph(mask, 'thin', Inf)``.

    The two-subiteration algorithm of Lam, Lee & Suen (1992, p. 879), the one scikit-image's
    ``thin`` implements; pixels outside the image count as background. Returns a new bool array.
    """
    global _LUTS
    if _LUTS is None:
        _LUTS = _thin_lut()
    image = np.array(mask, dtype=np.bool_, order="C", copy=True)
    if image.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {image.shape}")
    return thin_kernel(image, *_LUTS)


def seg_boundaries(seg: np.ndarray) -> np.ndarray:
    """Boundary pixels of a label map, BSR's ``seg2bdry(seg, 'imageSize')``.

    A pixel is a boundary when it differs from its south or east neighbour (computed on the
    doubled grid and read back at the pixel positions, with BSR's border copies).
    """
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise ValueError(f"segmentation must be 2-D, got shape {seg.shape}")
    h, w = seg.shape
    bdry = np.zeros((2 * h + 1, 2 * w + 1), np.bool_)
    edgels_v = np.zeros((h, w), np.bool_)
    edgels_v[:-1, :] = seg[:-1, :] != seg[1:, :]
    edgels_h = np.zeros((h, w), np.bool_)
    edgels_h[:, :-1] = seg[:, :-1] != seg[:, 1:]
    # MATLAB (1-based) -> numpy: bdry(3:2:end, 2:2:end) = edgels_v; bdry(2:2:end, 3:2:end) = edgels_h
    bdry[2::2, 1::2] = edgels_v
    bdry[1::2, 2::2] = edgels_h
    bdry[2:-1:2, 2:-1:2] = np.maximum(
        np.maximum(edgels_h[:-1, :-1], edgels_h[1:, :-1]),
        np.maximum(edgels_v[:-1, :-1], edgels_v[:-1, 1:]),
    )
    bdry[0, :] = bdry[1, :]
    bdry[:, 0] = bdry[:, 1]
    bdry[-1, :] = bdry[-2, :]
    bdry[:, -1] = bdry[:, -2]
    return np.ascontiguousarray(bdry[2::2, 2::2])


def match_radius(shape: tuple[int, int], max_dist: float = MAX_DIST) -> float:
    """Matching tolerance in pixels: ``max_dist`` x the image diagonal."""
    return float(max_dist * math.sqrt(shape[0] ** 2 + shape[1] ** 2))


def _outlier_weight(radius: float, outlier_cost: float) -> int:
    return int(math.ceil(outlier_cost * radius * COST_MULTIPLIER))


def _check_edge_memory(n_edges: int, n_rows: int, n_cols: int) -> None:
    """A clear error, before any allocation, when the matching graph cannot fit in the memory
    available now (``MemAvailable`` of /proc/meminfo; no check where that is unknown)."""
    need = n_edges * EDGE_BYTES + (n_rows + n_cols) * 64
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return
    if need > avail:
        raise MemoryError(
            f"boundary matching needs {n_edges:,} candidate pixel pairs (about {need / 2**30:.1f} GiB, "
            f"{avail / 2**30:.1f} GiB available): the tolerance (max_dist x image diagonal) spans too many "
            f"pixels at this image size; evaluate a downscaled copy of the maps and ground truth")


def _graph(ys: np.ndarray, xs: np.ndarray, human: np.ndarray, radius: float, *, reachable: bool = False):
    """Candidate edges machine pixel -> human pixel within ``radius`` and the reverse adjacency
    (int32 ids and costs: the edges are the benchmark's largest arrays on big images).

    With ``reachable=True`` the rows are only the machine pixels with a human pixel in reach, and
    their indices into ``ys`` come first in the returned tuple (a disk dilation of the human map
    costs O(pixels x radius²), this O(machine pixels x radius))."""
    hy, hx = np.nonzero(human)
    n_cols = hy.size
    if n_cols >= 2**31 or len(ys) >= 2**31:
        raise ValueError("more than 2**31 boundary pixels")
    row_ptr = np.zeros(human.shape[0] + 1, np.int64)
    np.cumsum(np.bincount(hy, minlength=human.shape[0]), out=row_ptr[1:])
    del hy
    ys = np.ascontiguousarray(ys, np.int64)
    xs = np.ascontiguousarray(xs, np.int64)
    hx = hx.astype(np.int64)
    indptr = np.empty(len(ys) + 1, np.int64)
    candidate_edges(ys, xs, row_ptr, hx, float(radius), indptr, _NO_COLS, _NO_COLS)  # count
    n_edges = int(indptr[-1])
    _check_edge_memory(n_edges, len(ys), n_cols)
    cols = np.empty(n_edges, np.int32)
    costs = np.empty(n_edges, np.int32)
    candidate_edges(ys, xs, row_ptr, hx, float(radius), indptr, cols, costs)
    del hx
    if reachable:
        sel = np.flatnonzero(np.diff(indptr))
        indptr = np.append(indptr[sel], indptr[-1])  # rows without edges hold none: the edges stay as they are
    rev_indptr = np.zeros(n_cols + 1, np.int64)
    np.cumsum(np.bincount(cols, minlength=n_cols), out=rev_indptr[1:])
    rev_rows = np.empty(len(cols), np.int32)
    rev_costs = np.empty(len(cols), np.int32)
    reverse_edges(indptr, cols, costs, rev_indptr, rev_rows, rev_costs)
    if reachable:
        return sel, indptr, cols, costs, rev_indptr, rev_rows, rev_costs, n_cols
    return indptr, cols, costs, rev_indptr, rev_rows, rev_costs, n_cols


def correspond_pixels(
    machine: np.ndarray,
    human: np.ndarray,
    *,
    max_dist: float = MAX_DIST,
    outlier_cost: float = OUTLIER_COST,
) -> tuple[np.ndarray, np.ndarray]:
    """Match two boundary maps as BSR's ``correspondPixels``; returns (matched1, matched2) bool maps.

    ``max_dist`` is a fraction of the image diagonal; ``outlier_cost`` a multiple of it.
    """
    machine = _as_mask(machine, "machine")
    human = _as_mask(human, "human")
    if machine.shape != human.shape:
        raise ValueError(f"maps differ in shape: {machine.shape} vs {human.shape}")
    radius = match_radius(machine.shape, max_dist)
    ys, xs = np.nonzero(machine)
    ys = ys.astype(np.int64)
    xs = xs.astype(np.int64)
    indptr, cols, costs, _, _, _, n_cols = _graph(ys, xs, human, radius)
    row_to_col = np.empty(len(ys), np.int64)
    assign_with_outliers(indptr, cols, costs, n_cols, _outlier_weight(radius, outlier_cost), row_to_col)
    m1 = np.zeros_like(machine)
    hit = row_to_col >= 0
    m1[ys[hit], xs[hit]] = True
    m2 = np.zeros_like(human)
    hy, hx = np.nonzero(human)
    matched_cols = row_to_col[hit]
    m2[hy[matched_cols], hx[matched_cols]] = True
    return m1, m2


def _as_mask(arr: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D map, got shape {arr.shape}")
    return np.ascontiguousarray(arr != 0)


@dataclass
class BoundaryCounts:
    """Per-threshold counts of one image: recall = cnt_r / sum_r, precision = cnt_p / sum_p."""

    thresholds: np.ndarray
    cnt_r: np.ndarray
    sum_r: np.ndarray
    cnt_p: np.ndarray
    sum_p: np.ndarray


def binary_maps(pb: np.ndarray, thresholds: np.ndarray, *, thin_maps: bool = True) -> list[np.ndarray]:
    """``pb >= t`` for every threshold, thinned (BSR); identical maps are shared, not recomputed."""
    maps: list[np.ndarray] = []
    prev_count = -1
    prev = None
    for t in thresholds:
        bmap = pb >= t
        count = int(bmap.sum())
        # thresholded maps are nested: the same count means the same map
        if prev is not None and count == prev_count:
            maps.append(prev)
            continue
        prev = thin(bmap) if thin_maps else bmap
        prev_count = count
        maps.append(prev)
    return maps


def _flat_maps(maps: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Sorted flat indices of each binary map's pixels (int32 below 2**31 pixels); a map that is
    the same array as the previous one gives the same index array again."""
    previous = flat = None
    for bmap in maps:
        if bmap is not previous:
            previous = bmap
            flat = np.flatnonzero(bmap)
            flat = flat.astype(np.int32) if bmap.size < 2**31 else flat
        yield flat


def _flat_binary_maps(pb: np.ndarray, thresholds: np.ndarray, *, thin_maps: bool) -> Iterator[np.ndarray]:
    """:func:`binary_maps` one threshold at a time, each map as :func:`_flat_maps` gives it."""
    prev_count = -1
    flat = None
    with _bar(pb.size, len(thresholds), "boundaries: thresholds") as bar:
        for t in thresholds:
            check_stop()
            bmap = pb >= t
            count = int(bmap.sum())
            if flat is None or count != prev_count:  # nested maps: the same count means the same map
                flat = next(_flat_maps([thin(bmap) if thin_maps else bmap]))
                prev_count = count
            del bmap
            bar.update(1)
            yield flat


def _bar(n_pixels: int, total: int, desc: str):
    """A progress bar (unit: threshold) shown for huge images only."""
    return progress(total=total, desc=desc, unit="thr", disable=None if n_pixels >= PROGRESS_PIXELS else True)


def boundary_counts(
    maps: Sequence[np.ndarray],
    humans: Sequence[np.ndarray],
    *,
    thresholds: np.ndarray,
    max_dist: float = MAX_DIST,
    outlier_cost: float = OUTLIER_COST,
) -> BoundaryCounts:
    """Counts for a sequence of binary machine maps (one per threshold) against human boundaries."""
    if len(maps) != len(thresholds):
        raise ValueError("one binary map per threshold is needed")
    if not maps:
        raise ValueError("no machine maps")
    return _boundary_counts_flat(list(_flat_maps(maps)), maps[0].shape, humans, thresholds=thresholds,
                                 max_dist=max_dist, outlier_cost=outlier_cost)


def _boundary_counts_flat(
    flats: Sequence[np.ndarray],
    shape: tuple[int, int],
    humans: Sequence[np.ndarray],
    *,
    thresholds: np.ndarray,
    max_dist: float = MAX_DIST,
    outlier_cost: float = OUTLIER_COST,
) -> BoundaryCounts:
    """:func:`boundary_counts` for maps given as sorted flat pixel indices: a thinned map is a few
    percent of the pixels, so 99 thresholds no longer hold 99 full-size bool maps."""
    if len(flats) != len(thresholds):
        raise ValueError("one binary map per threshold is needed")
    if not humans:
        raise ValueError("no human boundary maps")
    radius = match_radius(shape, max_dist)
    ow = _outlier_weight(radius, outlier_cost)
    n_steps = len(flats)
    # all pixels that appear at any threshold (in raster order), and which are present at each step
    distinct = list({id(f): f for f in flats}.values())
    union = np.unique(np.concatenate(distinct)) if distinct else np.zeros(0, np.int64)
    del distinct
    ys, xs = np.divmod(union.astype(np.int64), shape[1])
    # visit the thresholds from the sparsest map down
    sizes = np.array([f.size for f in flats])
    order = np.argsort(sizes, kind="stable")
    active = np.zeros((n_steps, len(ys)), np.bool_)
    for step, idx in enumerate(order):
        active[step, np.searchsorted(union, flats[idx])] = True
    del union
    acc = np.zeros((n_steps, len(ys)), np.bool_)
    cnt_r = np.zeros(n_steps, np.int64)
    sum_r = np.zeros(n_steps, np.int64)
    for k, human in enumerate(humans):
        check_stop()
        human = _as_mask(human, "human boundaries")
        if human.shape != shape:
            raise ValueError(f"human boundaries {human.shape} differ from the machine map {shape}")
        n_cols = int(human.sum())
        sum_r += n_cols
        if len(ys) == 0 or n_cols == 0:
            continue
        # only machine pixels with a human pixel in reach can match
        sel, indptr, cols, costs, rev_indptr, rev_rows, rev_costs, n_cols = _graph(ys, xs, human, radius,
                                                                                   reachable=True)
        if len(sel) == 0:
            continue
        state = match_state(len(sel), n_cols, len(costs))
        counts = np.zeros(n_steps, np.int64)
        # one threshold per call, so a stop request (Ctrl-C, SIGTERM) is seen between thresholds
        with _bar(int(np.prod(shape)), n_steps, f"boundaries: matching human {k + 1}/{len(humans)}") as bar:
            for step in range(n_steps):
                match_steps(step, step + 1, active, sel, indptr, cols, costs, rev_indptr, rev_rows, rev_costs, n_cols,
                            ow, acc, _NO_OBJECTIVE, counts, state)
                bar.update(1)
                check_stop()
        del state, indptr, cols, costs, rev_indptr, rev_rows, rev_costs
        cnt_r[order] += counts
    cnt_p = np.empty(n_steps, np.int64)
    cnt_p[order] = acc.sum(axis=1)
    sum_p = sizes
    return BoundaryCounts(np.asarray(thresholds, np.float64), cnt_r, sum_r, cnt_p, sum_p)


def boundary_counts_pb(
    pb: np.ndarray,
    humans: Sequence[np.ndarray],
    *,
    thresholds: np.ndarray | None = None,
    max_dist: float = MAX_DIST,
    thin_maps: bool = True,
) -> BoundaryCounts:
    """BSR ``evaluation_bdry_image`` for a soft boundary map ``pb`` in [0, 1]."""
    pb = np.asarray(pb, np.float64)
    thresholds = default_thresholds() if thresholds is None else np.asarray(thresholds, np.float64)
    flats = list(_flat_binary_maps(pb, thresholds, thin_maps=thin_maps))
    return _boundary_counts_flat(flats, pb.shape, humans, thresholds=thresholds, max_dist=max_dist)


def boundary_counts_segs(
    segs: Sequence[np.ndarray],
    humans: Sequence[np.ndarray],
    *,
    max_dist: float = MAX_DIST,
    thin_maps: bool = True,
) -> BoundaryCounts:
    """BSR ``evaluation_bdry_image`` for a list of segmentations (thresholds 1..len(segs))."""
    flats = []
    for seg in segs:
        bmap = seg_boundaries(seg)
        flats.append(next(_flat_maps([thin(bmap) if thin_maps else bmap])))
    if not flats:
        raise ValueError("no segmentations")
    thresholds = np.arange(1, len(segs) + 1, dtype=np.float64)
    return _boundary_counts_flat(flats, np.shape(segs[0]), humans, thresholds=thresholds, max_dist=max_dist)


def ucm2_to_pb(ucm2: np.ndarray) -> np.ndarray:
    """Boundary strength on the pixel grid from a doubled-grid ucm2: BSR's ``ucm2(3:2:end, 3:2:end)``."""
    ucm2 = np.asarray(ucm2)
    if ucm2.ndim != 2 or ucm2.shape[0] % 2 != 1 or ucm2.shape[1] % 2 != 1:
        raise ValueError(f"ucm2 must be (2H+1, 2W+1), got shape {ucm2.shape}")
    return np.ascontiguousarray(ucm2[2::2, 2::2], dtype=np.float64)


# --------------------------------------------------------------------------------------
# Dataset summary (BSR collect_eval_bdry)
# --------------------------------------------------------------------------------------


def f_measure(r, p):
    """``2PR / (P + R)``, 0 where both are 0 (BSR's ``fmeasure``)."""
    r = np.asarray(r, np.float64)
    p = np.asarray(p, np.float64)
    s = p + r
    return 2 * p * r / (s + (s == 0))


def _ratio(cnt, tot):
    cnt = np.asarray(cnt, np.float64)
    tot = np.asarray(tot, np.float64)
    return cnt / (tot + (tot == 0))


def best_f(thresholds: np.ndarray, r: np.ndarray, p: np.ndarray) -> tuple[float, float, float, float]:
    """BSR ``maxF``: best F along the P/R curve, interpolating 100 points between thresholds.

    Returns (threshold, R, P, F).
    """
    best = (float(thresholds[0]), float(r[0]), float(p[0]), float(f_measure(r[0], p[0])))
    d = np.linspace(0.0, 1.0, 100)
    for i in range(1, len(thresholds)):
        t = thresholds[i] * d + thresholds[i - 1] * (1 - d)
        rr = r[i] * d + r[i - 1] * (1 - d)
        pp = p[i] * d + p[i - 1] * (1 - d)
        ff = f_measure(rr, pp)
        k = int(np.argmax(ff))
        if ff[k] > best[3]:
            best = (float(t[k]), float(rr[k]), float(pp[k]), float(ff[k]))
    return best


def _unique(values: np.ndarray, *, last: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique values and the index of their last (MATLAB < R2013a) or first occurrence."""
    if not last:
        return np.unique(values, return_index=True)
    uniq, first_in_rev = np.unique(values[::-1], return_index=True)
    return uniq, len(values) - 1 - first_in_rev


@dataclass
class BoundarySummary:
    """Dataset-level boundary scores (BSR ``eval_bdry.txt`` plus R50) and the curves behind them."""

    ods_threshold: float
    ods_r: float
    ods_p: float
    ods_f: float
    ois_r: float
    ois_p: float
    ois_f: float
    ap: float
    r50: float
    thresholds: np.ndarray
    r: np.ndarray
    p: np.ndarray
    f: np.ndarray
    per_image: np.ndarray  # (N, 4): best threshold, R, P, F (interpolated), image order as given

    def line(self) -> str:
        return (f"ODS F={self.ods_f:.3f} (thr {self.ods_threshold:.3g}, R={self.ods_r:.3f}, P={self.ods_p:.3f})  "
                f"OIS F={self.ois_f:.3f}  AP={self.ap:.3f}  R50={self.r50:.3f}")


def summarize_boundaries(counts: Sequence[BoundaryCounts]) -> BoundarySummary:
    """Combine per-image counts as BSR's ``collect_eval_bdry`` does."""
    if not counts:
        raise ValueError("no images to summarise")
    thresholds = counts[0].thresholds
    n = len(thresholds)
    tot = np.zeros((4, n), np.float64)
    ois = np.zeros(4, np.float64)
    per_image = np.zeros((len(counts), 4), np.float64)
    for k, c in enumerate(counts):
        if len(c.thresholds) != n:
            raise ValueError("all images need the same number of thresholds")
        r = _ratio(c.cnt_r, c.sum_r)
        p = _ratio(c.cnt_p, c.sum_p)
        f = f_measure(r, p)
        per_image[k] = best_f(thresholds, r, p)
        tot += np.array([c.cnt_r, c.sum_r, c.cnt_p, c.sum_p], np.float64)
        i = int(np.flatnonzero(f == f.max())[0])
        ois += np.array([c.cnt_r[i], c.sum_r[i], c.cnt_p[i], c.sum_p[i]], np.float64)
    r = _ratio(tot[0], tot[1])
    p = _ratio(tot[2], tot[3])
    f = f_measure(r, p)
    ods_t, ods_r, ods_p, ods_f = best_f(thresholds, r, p)
    ois_r = float(_ratio(ois[0], ois[1]))
    ois_p = float(_ratio(ois[2], ois[3]))
    ois_f = float(f_measure(ois_r, ois_p))
    return BoundarySummary(
        ods_threshold=ods_t, ods_r=ods_r, ods_p=ods_p, ods_f=ods_f,
        ois_r=ois_r, ois_p=ois_p, ois_f=ois_f,
        ap=average_precision(r, p), r50=recall_at_precision(r, p, 0.5),
        thresholds=thresholds, r=r, p=p, f=f, per_image=per_image,
    )


def average_precision(r: np.ndarray, p: np.ndarray) -> float:
    """BSR's AP: P interpolated (linearly, in R) at R = 0, 0.01, ..., 1; 0 outside the curve; x 0.01."""
    ru, idx = _unique(np.asarray(r, np.float64), last=True)
    if len(ru) <= 1:
        return 0.0
    pu = np.asarray(p, np.float64)[idx]
    grid = np.linspace(0.0, 1.0, 101)
    inside = (grid >= ru[0]) & (grid <= ru[-1])
    return float(np.interp(grid[inside], ru, pu).sum() * 0.01)


def recall_at_precision(r: np.ndarray, p: np.ndarray, precision: float = 0.5) -> float:
    """R50 as Dollar's ``edgesEvalPlot``: recall interpolated at ``max(min P, precision)``."""
    r = np.asarray(r, np.float64)
    p = np.asarray(p, np.float64)
    keep = r >= 1e-3
    r, p = r[keep], p[keep]
    if len(p) == 0:
        return 0.0
    pu, idx = _unique(p, last=False)
    if len(pu) == 1:
        return float(r[idx[0]])
    target = max(pu[0], precision)
    if target > pu[-1]:
        return float("nan")  # the curve never reaches that precision
    return float(np.interp(target, pu, r[idx]))


# --------------------------------------------------------------------------------------
# BSR output files
# --------------------------------------------------------------------------------------


def _g(x: float) -> str:
    return f"{x:10g}"


def write_boundary_results(out_dir: str | Path, summary: BoundarySummary) -> list[Path]:
    """Write ``eval_bdry.txt``, ``eval_bdry_thr.txt``, ``eval_bdry_img.txt`` in BSR's layout.

    ``eval_bdry_img.txt`` numbers images 1..N in the order given (BSR: sorted file names).
    R50 goes to ``eval_bdry_r50.txt`` (not a BSR file).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = summary
    paths = [out / "eval_bdry.txt", out / "eval_bdry_thr.txt", out / "eval_bdry_img.txt", out / "eval_bdry_r50.txt"]
    atomic_write_text(paths[0], " ".join(_g(x) for x in (s.ods_threshold, s.ods_r, s.ods_p, s.ods_f,
                                                  s.ois_r, s.ois_p, s.ois_f, s.ap)) + "\n")
    atomic_write_text(paths[1], "".join(" ".join(_g(x) for x in row) + "\n"
                                for row in zip(s.thresholds, s.r, s.p, s.f)))
    atomic_write_text(paths[2], "".join(f"{i + 1:10d} " + " ".join(_g(x) for x in row) + "\n"
                                for i, row in enumerate(s.per_image)))
    atomic_write_text(paths[3], _g(s.r50) + "\n")
    return paths


def plot_pr_curve(summary: BoundarySummary, path: str | Path, *, label: str = "") -> Path:
    """PR curve with iso-F lines, the ODS point, and ODS/OIS/AP in the legend (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    for f in np.arange(0.1, 1.0, 0.1):
        rr = np.linspace(f / (2 - f) + 1e-6, 1, 200)
        pp = f * rr / (2 * rr - f)
        ax.plot(rr, pp, color="0.85", lw=0.7)
    keep = summary.r >= 1e-3
    name = f"{label} " if label else ""
    ax.plot(summary.r[keep], summary.p[keep], lw=2,
            label=f"{name}[F={summary.ods_f:.3f}, OIS {summary.ois_f:.3f}, AP {summary.ap:.3f}]")
    ax.plot([summary.ods_r], [summary.ods_p], "o", color="C3")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="Recall", ylabel="Precision", title="BSDS boundary benchmark")
    ax.grid(True, color="0.9")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
