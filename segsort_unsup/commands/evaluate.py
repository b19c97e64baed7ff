"""``segsort-unsup evaluate``: BSDS boundary and region benchmarks, semantic mIoU."""

from __future__ import annotations

from pathlib import Path

import click

from ..parallel import make_executor
from .options import FullHelpGroup, executor_options, finish, overwrite_option

def _bench_options(func):
    func = click.option("--thresholds", "n_thresholds", type=click.IntRange(min=1), default=99, show_default=True,
                        help="Number of thresholds (BSR: linspace(1/(n+1), 1-1/(n+1), n)); 'segs' inputs use one "
                             "threshold per segmentation instead.")(func)
    func = click.option("--gt", "ground_truth", required=True, type=click.Path(exists=True, file_okay=False),
                        help="Folder of BSDS groundTruth .mat files (e.g. BSDS500/data/groundTruth/test).")(func)
    func = click.option("-o", "--output", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
                        help="Folder for BSR's result files, pr_curve.png and summary.json.")(func)
    return func


@click.group(cls=FullHelpGroup)
def evaluate() -> None:
    """Measure results: BSDS500 boundaries/regions (BSR benchmark) and semantic mIoU."""


@evaluate.command()
@click.argument("predictions", type=click.Path(exists=True))
@_bench_options
@click.option("--max-dist", type=click.FloatRange(min=0, min_open=True), default=0.0075, show_default=True,
              help="Matching tolerance as a fraction of the image diagonal.")
@click.option("--thin/--no-thin", default=True, show_default=True,
              help="Thin thresholded maps to 1-pixel curves (BSR default).")
@click.option("--nms/--no-nms", default=True, show_default=True,
              help="Non-maximum suppression of contours-store edge maps (edge_nms, orientation recomputed as the HED/PiDiNet protocol does).")
@click.option("--label", default="", help="Name of the method in the PR-curve legend.")
@executor_options
@overwrite_option
def boundaries(predictions, ground_truth, out_dir, n_thresholds, max_dist, thin, nms, label, executor, workers,
               scheduler, overwrite):
    """Boundary precision/recall: ODS, OIS, AP, R50 (BSR boundaryBench).

    PREDICTIONS: a contours or segments store, or a folder of .png edge maps / .mat
    (BSR 'ucm2' or 'segs') files, matched to the ground truth by image id.
    """
    from ..evaluate.bsds import BenchOptions, run_benchmark

    opts = BenchOptions(boundaries=True, regions=False, n_thresholds=n_thresholds, max_dist=max_dist,
                        thin=thin, nms=nms)
    with make_executor(executor, workers=workers, scheduler=scheduler) as pool:
        report = run_benchmark(predictions, ground_truth, out_dir, options=opts, executor=pool,
                               overwrite=overwrite, label=label)
    click.echo(report.boundary.line())
    _report_missing(report.missing)
    finish(report.stage)


@evaluate.command()
@click.argument("predictions", type=click.Path(exists=True))
@_bench_options
@click.option("--with-boundaries", is_flag=True, help="Also run the boundary benchmark (BSR allBench).")
@executor_options
@overwrite_option
def regions(predictions, ground_truth, out_dir, n_thresholds, with_boundaries, executor, workers, scheduler,
            overwrite):
    """Region benchmarks of a ucm2 or segmentations: Covering, PRI, VI (BSR regionBench).

    PREDICTIONS: a segments store (ucm2), or a folder of .mat files holding 'ucm2' or 'segs'.
    """
    from ..evaluate.bsds import BenchOptions, run_benchmark

    opts = BenchOptions(boundaries=with_boundaries, regions=True, n_thresholds=n_thresholds)
    with make_executor(executor, workers=workers, scheduler=scheduler) as pool:
        report = run_benchmark(predictions, ground_truth, out_dir, options=opts, executor=pool, overwrite=overwrite)
    if report.boundary is not None:
        click.echo(report.boundary.line())
    click.echo(report.region.line())
    _report_missing(report.missing)
    finish(report.stage)


@evaluate.command()
@click.argument("predictions", type=click.Path(exists=True))
@click.option("--gt", "ground_truth", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of ground-truth label PNGs (e.g. CamVid valannot).")
@click.option("-o", "--output", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for semantic.json, per_class.txt and confusion.csv.")
@click.option("--num-classes", type=click.IntRange(min=1), default=None,
              help="Number of classes (default: 1 + the largest ground-truth label other than the ignore label).")
@click.option("--ignore-label", type=int, default=255, show_default=True,
              help="Ground-truth value left out (CamVid: 11 for void); -1 for none.")
@click.option("--hungarian", is_flag=True,
              help="Predictions are cluster ids: map them to classes by the best one-to-one assignment.")
@click.option("--class-names", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text file with one class name per line (e.g. 'Sky' or '0 Sky').")
@executor_options
@overwrite_option
def semantic(predictions, ground_truth, out_dir, num_classes, ignore_label, hungarian, class_names, executor,
             workers, scheduler, overwrite):
    """Per-class IoU, mIoU, pixel accuracy and confusion matrix of label maps.

    PREDICTIONS: a folder of label PNGs or a segments store ('labels'), matched by image id.
    """
    import json

    from ..evaluate.semantic_stage import RESULT, SemanticConfig, run

    config = SemanticConfig(ground_truth=ground_truth, num_classes=num_classes,
                            ignore_label=None if ignore_label < 0 else ignore_label, hungarian=hungarian,
                            class_names=class_names)
    with make_executor(executor, workers=workers, scheduler=scheduler) as pool:
        summary = run(config, predictions, out_dir, executor=pool, overwrite=overwrite)
    result = json.loads((Path(out_dir) / RESULT).read_text())
    click.echo(f"mIoU={result['miou']:.4f}  pixel accuracy={result['pixel_accuracy']:.4f}  "
               f"({len(result['iou'])} classes)")
    _report_missing(result.get("missing", []))
    finish(summary)


def _report_missing(missing: list[str]) -> None:
    if missing:
        click.echo(f"warning: {len(missing)} ground-truth images had no prediction and were left out "
                   f"(listed in missing.txt)", err=True)
