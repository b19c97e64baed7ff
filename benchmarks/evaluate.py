"""Wall time of the full BSDS500-test boundary benchmark (99 thresholds), and what makes it fast.

Inputs are real and always available: Sobel gradient magnitude of the 200 BSDS500 test images,
thinned by the project's edge NMS (the HED evaluation recipe), saved as 8-bit PNGs. Then:

1. the headline: ``run_benchmark`` over all images, 99 thresholds, ``--workers`` processes;
2. side by side on a few images in this process: the incremental matching used by ``evaluate``
   (one assignment per human, updated threshold by threshold) against solving every threshold
   afresh; same counts, the ratio is the speed-up.

Usage: python benchmarks/evaluate.py [--images 200] [--workers 2] [--compare 6]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from segsort_unsup.edgemaps import edge_nms
from segsort_unsup.evaluate import boundaries as B
from segsort_unsup.evaluate.bsds import BenchOptions, run_benchmark
from segsort_unsup.parallel import make_executor
from segsort_unsup.evaluate.inputs import load_ground_truth
from segsort_unsup.io.images import read_image

SHARED = Path(os.environ.get("SEGSORT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def sobel_nms(path: Path) -> np.ndarray:
    from skimage.color import rgb2gray
    from skimage.filters import sobel

    edge = sobel(rgb2gray(read_image(path))).astype(np.float32)
    edge /= max(float(edge.max()), 1e-6)
    return edge_nms(edge)


def make_inputs(image_dir: Path, out: Path, n: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    ids = []
    for path in sorted(image_dir.glob("*.jpg"))[:n]:
        pb = sobel_nms(path)
        Image.fromarray(np.round(np.clip(pb, 0, 1) * 255).astype(np.uint8)).save(out / f"{path.stem}.png")
        ids.append(path.stem)
    return ids


def compare_matching(pred_dir: Path, gt_dir: Path, ids: list[str]) -> tuple[float, float, bool]:
    """Seconds for incremental vs per-threshold-fresh matching on ``ids``, and whether counts agree."""
    thresholds = B.default_thresholds()
    t_inc = t_fresh = 0.0
    same = True
    for iid in ids:
        pb = np.asarray(Image.open(pred_dir / f"{iid}.png"), np.float64) / 255
        humans = load_ground_truth(gt_dir / f"{iid}.mat").boundaries
        maps = B.binary_maps(pb, thresholds)
        t0 = time.perf_counter()
        inc = B.boundary_counts(maps, humans, thresholds=thresholds)
        t1 = time.perf_counter()
        fresh = [B.boundary_counts([m], humans, thresholds=thresholds[k : k + 1]) for k, m in enumerate(maps)]
        t2 = time.perf_counter()
        t_inc += t1 - t0
        t_fresh += t2 - t1
        same &= np.array_equal(inc.cnt_r, np.concatenate([f.cnt_r for f in fresh]))
    return t_inc, t_fresh, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compare", type=int, default=6, help="images for the incremental-vs-fresh comparison")
    args = parser.parse_args()
    bsds = SHARED / "data" / "bsds500"
    gt_dir = bsds / "groundTruth" / "test"
    with tempfile.TemporaryDirectory() as tmp:
        pred_dir = Path(tmp) / "sobel"
        t0 = time.perf_counter()
        ids = make_inputs(bsds / "images" / "test", pred_dir, args.images)
        t_prep = time.perf_counter() - t0
        gt_subset = Path(tmp) / "gt"
        gt_subset.mkdir()
        for iid in ids:
            (gt_subset / f"{iid}.mat").symlink_to(gt_dir / f"{iid}.mat")
        # warm the numba cache (compiled once per machine; not part of the benchmark)
        run_benchmark(pred_dir, gt_subset, Path(tmp) / "warm", options=BenchOptions(n_thresholds=3))
        t0 = time.perf_counter()
        report = run_benchmark(pred_dir, gt_subset, Path(tmp) / "eval", options=BenchOptions(),
                              executor=make_executor("local", workers=args.workers))
        wall = time.perf_counter() - t0
        t_inc, t_fresh, same = compare_matching(pred_dir, gt_dir, ids[: args.compare])
    s = report.boundary
    from segsort_unsup.sysinfo import cpu_model

    cpu = cpu_model()
    print(f"\nBSDS500 test boundary benchmark, Sobel+NMS edge maps ({cpu}, {os.cpu_count()} cores visible)")
    print(f"{'measure':<44} {'value':>12}")
    rows = [
        ("images", f"{len(ids)}"),
        ("thresholds", "99"),
        ("workers", f"{args.workers}"),
        ("input preparation (Sobel + NMS + PNG), s", f"{t_prep:.1f}"),
        ("benchmark wall time, s", f"{wall:.1f}"),
        ("wall time per image, s", f"{wall / len(ids):.3f}"),
        ("CPU time per image (wall x workers), s", f"{wall * args.workers / len(ids):.3f}"),
        ("ODS F / OIS F / AP", f"{s.ods_f:.3f}/{s.ois_f:.3f}/{s.ap:.3f}"),
        (f"matching, incremental, {args.compare} images, s", f"{t_inc:.2f}"),
        (f"matching, fresh per threshold, {args.compare} images, s", f"{t_fresh:.2f}"),
        ("speed-up of incremental matching", f"{t_fresh / max(t_inc, 1e-9):.1f}x"),
        ("recall counts identical", f"{same}"),
    ]
    for name, value in rows:
        print(f"{name:<44} {value:>12}")


if __name__ == "__main__":
    main()
