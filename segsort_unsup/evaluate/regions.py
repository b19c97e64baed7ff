"""BSDS region benchmarks (Arbelaez et al., TPAMI 2011; BSR ``regionBench``): Covering, PRI, VI.

A hierarchy given as a ucm2 (doubled grid, ``(2H+1, 2W+1)``) is cut at each threshold ``t``
as BSR does: connected components (8-connectivity, MATLAB ``bwlabel``) of ``ucm2 <= t`` on the
doubled grid, read at the pixel positions ``[1::2, 1::2]``
(:func:`~segsort_unsup.ucm.hierarchy.labels_from_ucm2` with ``connectivity=8``). A list of
segmentations is used as is (thresholds 1..K). Against the human segmentations of the image:

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

from ..ucm.hierarchy import labels_from_ucm2
from ._kernels import contingency


def _levels_between(values: np.ndarray, lo: float, hi: float) -> bool:
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
    n = table.sum()
    a = table.sum(axis=1)
    b = table.sum(axis=0)
    ri = 1.0 - ((a * a).sum() / 2 + (b * b).sum() / 2 - (table * table).sum()) / (n * (n - 1) / 2)
    pa = a[a > 0] / n
    pb = b[b > 0] / n
    h1 = -(pa * np.log2(pa)).sum()
    h2 = -(pb * np.log2(pb)).sum()
    nz = table > 0
    joint = table[nz] / n
    outer = (a[:, None] * b[None, :])[nz] / (n * n)
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
    shape = gts[0].shape
    if thresholds is None:
        segs = list(segs)
        thresholds = np.arange(1, len(segs) + 1, dtype=np.float64)
    thresholds = np.asarray(thresholds, np.float64)
    n_steps = len(thresholds)
    gt_areas = np.concatenate([np.bincount(g.ravel(), minlength=int(g.max()) + 1)[1:] for g in gts]).astype(np.float64)
    cnt_r = np.zeros(n_steps)
    sum_r = np.zeros(n_steps)
    cnt_p = np.zeros(n_steps)
    sum_p = np.zeros(n_steps)
    ri = np.zeros(n_steps)
    voi = np.zeros(n_steps)
    best_overall = np.zeros_like(gt_areas)
    previous = cached = None
    steps = 0
    for t, seg in enumerate(segs):
        steps += 1
        if t >= n_steps:
            raise ValueError(f"more segmentations than the {n_steps} thresholds")
        if seg is not previous:
            previous = seg
            seg = _labels(seg)
            if seg.shape != shape:
                raise ValueError(f"segmentation {seg.shape} differs from the ground truth {shape}")
            if seg.min() < 0:
                raise ValueError("segment labels must be >= 0")
            best_seg, best_gt, seg_area = _jaccard_best(seg, gts)
            best_gt_all = np.concatenate(best_gt) if best_gt else np.zeros(0)
            pairs = [rand_index_voi(seg, g) for g in gts]
            del seg
            cached = (
                float((seg_area[1:] * best_seg[1:]).sum()), float(seg_area[1:].sum()), best_gt_all,
                float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs])),
            )
        cp, sp, best_gt_all, r_i, v_i = cached
        cnt_p[t] = cp
        sum_p[t] = sp
        cnt_r[t] = float((gt_areas * best_gt_all).sum())
        sum_r[t] = float(gt_areas.sum())
        best_overall = np.maximum(best_overall, best_gt_all)
        ri[t] = r_i
        voi[t] = v_i
    if steps != n_steps:
        raise ValueError(f"{steps} segmentations for {n_steps} thresholds")
    return RegionCounts(thresholds, cnt_r, sum_r, cnt_p, sum_p, float((gt_areas * best_overall).sum()), ri, voi)


def region_counts_ucm2(ucm2: np.ndarray, gts: Sequence[np.ndarray], *, thresholds: np.ndarray) -> RegionCounts:
    """Region counts of a ucm2 at ``thresholds``."""
    return region_counts(ucm2_segmentations(ucm2, thresholds), gts, thresholds=thresholds)


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
        path.write_text(text)
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
