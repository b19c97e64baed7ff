"""Reproduce BSR's own expected outputs (bench/data/test_1..test_5 of test_benchs.m).

test_benchs.m runs, on the 5-image sample with nthresh = 5:
  test_1  allBench(ucm2)        boundaries + regions of ucm2 .mat files
  test_2  boundaryBench(png)    boundaries of 8-bit edge maps (thinned)
  test_3  boundaryBench(segs)   boundaries of segmentation cells (thresholds 1..5)
  test_4  allBench(segs)        boundaries + regions of segmentation cells
  test_5  regionBench(segs)     regions of segmentation cells
Every number of every expected file must match within 0.005.
"""

from __future__ import annotations

import numpy as np
import pytest

from segsort_unsup.evaluate.bsds import BOUNDARY_FILES, REGION_FILES, BenchOptions, run_benchmark

TOLERANCE = 0.005

CASES = {
    "test_1": ("ucm2", BenchOptions(boundaries=True, regions=True, n_thresholds=5)),
    "test_2": ("png", BenchOptions(boundaries=True, regions=False, n_thresholds=5)),
    "test_3": ("segs", BenchOptions(boundaries=True, regions=False, n_thresholds=5)),
    "test_4": ("segs", BenchOptions(boundaries=True, regions=True, n_thresholds=5)),
    "test_5": ("segs", BenchOptions(boundaries=False, regions=True, n_thresholds=5)),
}


@pytest.fixture(scope="module")
def deviations(bsds, tmp_path_factory):
    sample = bsds / "bench_sample"
    table = {}
    for case, (inputs, options) in CASES.items():
        out = tmp_path_factory.mktemp(case)
        run_benchmark(sample / inputs, sample / "groundTruth", out, options=options)
        expected_files = sorted(p.name for p in (sample / case).glob("*.txt"))
        produced = (BOUNDARY_FILES if options.boundaries else ()) + (REGION_FILES if options.regions else ())
        assert sorted(produced) == expected_files, case
        for name in expected_files:
            expected = np.loadtxt(sample / case / name, ndmin=2)
            ours = np.loadtxt(out / name, ndmin=2)
            assert ours.shape == expected.shape, (case, name)
            table[(case, name)] = (float(np.abs(ours - expected).max()), expected.size)
    lines = [f"{'case':<8} {'file':<22} {'numbers':>7} {'max |dev|':>10}"]
    lines += [f"{c:<8} {n:<22} {size:>7} {dev:>10.6f}" for (c, n), (dev, size) in table.items()]
    print("\nBSR bench_sample reproduction\n" + "\n".join(lines))
    # For scale: test_1, test_3 and test_4 threshold the very same binary maps (the segs are the
    # ucm2 cuts), yet BSR's randomised outlier graph makes its own three runs disagree this much.
    spread = {}
    for name, cols in (("eval_bdry.txt", slice(1, 8)), ("eval_bdry_thr.txt", slice(1, 4)),
                       ("eval_bdry_img.txt", slice(2, 5))):
        runs = [np.loadtxt(sample / c / name, ndmin=2)[:, cols] for c in ("test_1", "test_3", "test_4")]
        spread[name] = max(float(np.abs(a - b).max()) for a in runs for b in runs)
    print("BSR's own run-to-run spread on identical maps: " + ", ".join(f"{k} {v:.6f}" for k, v in spread.items()))
    return table


def test_every_expected_number_matches(deviations):
    worst = max(deviations.items(), key=lambda kv: kv[1][0])
    assert worst[1][0] <= TOLERANCE, f"{worst[0]} deviates by {worst[1][0]:.4f}"


def test_region_numbers_are_exact(deviations):
    """Regions have no randomised matching: only %10g rounding separates us from BSR."""
    for (case, name), (dev, _) in deviations.items():
        if name.startswith(("eval_cover", "eval_RI_VOI")):
            assert dev < 1e-5, (case, name, dev)
