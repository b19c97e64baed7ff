"""Run the BSDS boundary / region benchmarks over a dataset, in parallel, and write BSR's files."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_write_text
from ..errors import BadImageError, InputError
from ..log import get_logger
from ..parallel import Executor, InProcess
from ..stages import StageSummary
from . import boundaries as B
from . import regions as R
from .inputs import Prediction, Source, list_ground_truth, load_ground_truth, load_prediction, open_source, pair_ids

log = get_logger("evaluate")

BOUNDARY_FILES = ("eval_bdry.txt", "eval_bdry_thr.txt", "eval_bdry_img.txt")
REGION_FILES = ("eval_cover.txt", "eval_cover_img.txt", "eval_cover_th.txt", "eval_RI_VOI.txt", "eval_RI_VOI_thr.txt")


@dataclass(frozen=True)
class BenchOptions:
    """What to measure and how (BSR defaults)."""

    boundaries: bool = True
    regions: bool = False
    n_thresholds: int = B.N_THRESHOLDS
    max_dist: float = B.MAX_DIST
    thin: bool = True
    nms: bool = True


@dataclass(frozen=True)
class _Task:
    iid: str
    gt_path: str
    source: Source
    options: BenchOptions


@dataclass
class BenchReport:
    """What a benchmark run produced: summaries, the run's counts, ids without prediction."""

    stage: StageSummary
    boundary: B.BoundarySummary | None = None
    region: R.RegionSummary | None = None
    missing: list[str] = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)


def _check_shape(pred: Prediction, shape: tuple[int, int], gt_path: str, what: str, got: tuple[int, ...]) -> None:
    if tuple(got) != tuple(shape):
        raise BadImageError(pred.name, f"{what} is {got[0]}x{got[1]} but the ground truth {gt_path} is "
                                       f"{shape[0]}x{shape[1]}; predictions must be at the image size")


def _as_ucm2(pred: Prediction, shape: tuple[int, int]) -> None:
    """A PNG of the doubled size is a ucm2 saved as an image."""
    if pred.pb is not None and pred.pb.shape == (2 * shape[0] + 1, 2 * shape[1] + 1):
        pred.ucm2, pred.pb = pred.pb, None


def evaluate_image(task: _Task) -> tuple[B.BoundaryCounts | None, R.RegionCounts | None]:
    """Benchmark one image (runs in worker processes)."""
    opts = task.options
    gt = load_ground_truth(task.gt_path, boundaries=opts.boundaries)
    thresholds = B.default_thresholds(opts.n_thresholds)
    bcounts = rcounts = None
    pred = None
    if opts.regions and task.source.kind == "segments":
        # a segments store's regions are scored from its merge tree, before (and without) its ucm2
        pred = load_prediction(task.source, task.iid, ucm2=False, tree=True)
        if pred.tree is not None:
            t = pred.tree
            _check_shape(pred, gt.shape, task.gt_path, "the leaves map", t.leaves.shape)
            rcounts = R.region_counts_tree(t.parents, t.altitudes, t.leaves, gt.segmentations, thresholds=thresholds)
            pred = t = None
            if not opts.boundaries:
                return None, rcounts
    if pred is None:
        pred = load_prediction(task.source, task.iid, nms=opts.nms)
    _as_ucm2(pred, gt.shape)
    if pred.ucm2 is not None:
        h, w = pred.ucm2.shape
        _check_shape(pred, gt.shape, task.gt_path, "ucm2 (halved)", ((h - 1) // 2, (w - 1) // 2))
        if h % 2 == 0 or w % 2 == 0:
            raise BadImageError(pred.name, f"ucm2 must be (2H+1)x(2W+1), got {h}x{w}")
    elif pred.segs is not None:
        for seg in pred.segs:
            _check_shape(pred, gt.shape, task.gt_path, "a segmentation", seg.shape)
    else:
        _check_shape(pred, gt.shape, task.gt_path, "the edge map", pred.pb.shape)
    if opts.boundaries:
        if pred.segs is not None:
            bcounts = B.boundary_counts_segs(pred.segs, gt.boundaries, max_dist=opts.max_dist, thin_maps=opts.thin)
        else:
            pb = B.ucm2_to_pb(pred.ucm2) if pred.ucm2 is not None else pred.pb
            if rcounts is not None or not opts.regions:
                pred.ucm2 = None  # only pb is needed now
            bcounts = B.boundary_counts_pb(pb, gt.boundaries, thresholds=thresholds, max_dist=opts.max_dist,
                                           thin_maps=opts.thin)
            del pb
    if opts.regions and rcounts is None:
        if pred.ucm2 is not None:
            rcounts = R.region_counts_ucm2(pred.ucm2, gt.segmentations, thresholds=thresholds)
        elif pred.segs is not None:
            rcounts = R.region_counts(pred.segs, gt.segmentations)
        else:
            raise BadImageError(pred.name, "region benchmarks need a ucm2 or segmentations, not an edge map")
    return bcounts, rcounts


def _check_out(out_dir: Path, names: tuple[str, ...], overwrite: bool) -> None:
    """Refuse to replace results without ``overwrite``; the folder is only made once there are results."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a folder; choose another output path")
    existing = [n for n in names if (out_dir / n).exists()]
    if existing and not overwrite:
        raise InputError(f"{out_dir} already holds {existing[0]}; pass --overwrite to replace the results")


def run_benchmark(
    predictions: str | os.PathLike,
    ground_truth: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    options: BenchOptions = BenchOptions(),
    executor: Executor | None = None,
    overwrite: bool = False,
    label: str = "",
) -> BenchReport:
    """Benchmark every image that has both a prediction and ground truth; write BSR's result files.

    Ground-truth ids without a prediction are reported (``missing.txt``) and left out; images that
    fail (unreadable, wrong size) are reported with the reason and the rest still count.
    """
    out = Path(out_dir)
    names = (BOUNDARY_FILES if options.boundaries else ()) + (REGION_FILES if options.regions else ())
    _check_out(out, names, overwrite)
    source = open_source(predictions)
    gts = list_ground_truth(ground_truth)
    ids, missing = pair_ids(source, gts, predictions, ground_truth)
    tasks = [_Task(i, str(gts[i]), source, options) for i in ids]
    stage, results = collect(evaluate_image, tasks, executor, stage="evaluate", output=out)
    done_ids = [i for i in ids if i in results]
    out.mkdir(parents=True, exist_ok=True)
    label = f"{label or method_name(source)} ({len(done_ids)} images)"
    report = BenchReport(stage=stage, missing=missing, image_ids=done_ids)
    summary_json: dict = {"images": len(done_ids), "missing": missing, "failed": stage.failed,
                          "options": asdict(options), "predictions": str(predictions),
                          "ground_truth": str(ground_truth)}
    if options.boundaries:
        s = report.boundary = _summarize([results[i][0] for i in done_ids], B.summarize_boundaries,
                                         B.write_boundary_results, B.plot_pr_curve, out / "pr_curve.png", label)
        summary_json["boundaries"] = {"ods": s.ods_f, "ods_threshold": s.ods_threshold, "ods_recall": s.ods_r,
                                      "ods_precision": s.ods_p, "ois": s.ois_f, "ois_recall": s.ois_r,
                                      "ois_precision": s.ois_p, "ap": s.ap, "r50": s.r50}
    if options.regions:
        s = report.region = _summarize([results[i][1] for i in done_ids], R.summarize_regions,
                                       R.write_region_results, R.plot_regions, out / "regions.png", label)
        summary_json["regions"] = {"covering_ods": s.cover_ods, "covering_ois": s.cover_ois,
                                   "covering_best": s.cover_best, "pri_ods": s.ri_ods, "pri_ois": s.ri_ois,
                                   "vi_ods": s.voi_ods, "vi_ois": s.voi_ois}
    atomic_write_text(out / "images.txt", "".join(f"{k + 1:10d} {i}\n" for k, i in enumerate(done_ids)))
    atomic_write_text(out / "missing.txt", "".join(f"{i}\n" for i in missing))
    atomic_write_text(out / "summary.json", json.dumps(_no_nan(summary_json), indent=2, default=_jsonable))
    return report


def _summarize(counts: list, summarize: Callable, write: Callable, plot: Callable, figure: Path, label: str):
    """One benchmark's dataset summary of per-image ``counts``, its BSR result files and its plot."""
    _same_thresholds([c.thresholds for c in counts], "segmentations per image")
    summary = summarize(counts)
    write(figure.parent, summary)
    plot(summary, figure, label=label)
    return summary


def method_name(source: Source) -> str:
    """What made the predictions, for plots: the contour model (+ owt-ucm for segments), else the folder."""
    if source.kind in ("contours", "segments"):
        from ..io.store import read_manifest

        meta = read_manifest(source.root).get("meta", {})
        model = str(meta.get("model", ""))
        if not model and meta.get("source"):
            try:
                model = str(read_manifest(meta["source"]).get("meta", {}).get("model", ""))
            except Exception:  # noqa: BLE001 - the upstream store may have moved: fall back to the folder
                model = ""
        if model:
            return model + ("-owt-ucm" if source.kind == "segments" else "")
    return Path(source.root).name


def collect(fn, tasks: list, executor: Executor | None, *, stage: str, output: Path) -> tuple[StageSummary, dict]:
    """Run a per-image evaluation over ``tasks`` (each with an ``iid``): the summary and the results by id.

    Failures are logged as they happen; if no image could be evaluated, an :class:`InputError`
    names the first failure.
    """
    summary = StageSummary(stage, total=len(tasks), output=str(output))
    results: dict = {}
    for outcome in (executor or InProcess()).map(fn, tasks, desc=stage):
        if outcome.ok:
            results[outcome.item.iid] = outcome.result
            summary.done += 1
        else:
            summary.failed.append((outcome.item.iid, str(outcome.error)))
            log.warning("%s: %s", outcome.item.iid, outcome.error)
    if not results:
        raise InputError(f"no image could be evaluated; first failure: {summary.failed[0][1]}")
    return summary, results


def _no_nan(obj):
    """NaN (e.g. R50 of a curve that never reaches 50% precision) becomes null: strict JSON."""
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


def _same_thresholds(all_thresholds: list[np.ndarray], what: str) -> None:
    lengths = {len(t) for t in all_thresholds}
    if len(lengths) > 1:
        raise InputError(f"images differ in the number of thresholds ({sorted(lengths)}): "
                         f"BSR needs the same number of {what}")
