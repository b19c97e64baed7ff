"""Executors side by side: the ucm stage over the same BSDS500 contour maps, in one run.

    python benchmarks/executors.py [--images 100] [--workers 2] [--work DIR]

The contour maps are PiDiNet-tiny edge maps of BSDS500 test images, computed once into
``--work`` (reused by later runs). Then ``ucm`` runs into a fresh store with each executor:
in-process, ``--workers`` local processes, and a Dask ``LocalCluster`` of ``--workers``
processes. Cluster start-up is timed apart from the run; the table gives images/s and the
overhead of Dask against local processes (ratio of run times). The CPU is printed in the header.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segsort_unsup.sysinfo import cpu_model  # noqa: E402




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    shared = Path(os.environ.get("SEGSORT_SHARED", REPO.parent / "shared"))
    parser.add_argument("--bsds", type=Path, default=shared / "data" / "bsds500")
    parser.add_argument("--weights", type=Path, default=shared / "weights" / "pidinet" / "table5_pidinet-tiny.pth")
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench-executors")
    args = parser.parse_args()

    from segsort_unsup.contours import stage as contours
    from segsort_unsup.log import setup_logging
    from segsort_unsup.parallel import InProcess, ProcessPool, make_executor
    from segsort_unsup.ucm import stage as ucm

    setup_logging(-1)
    images = sorted((args.bsds / "images" / "test").glob("*.jpg"))[: args.images]
    listing = args.work / "images.txt"
    args.work.mkdir(parents=True, exist_ok=True)
    listing.write_text("".join(f"{p}\n" for p in images))
    store = args.work / "contours"
    config = contours.ContoursConfig(model="pidinet-tiny", weights=str(args.weights))
    contours.run(config, str(listing), store)  # resumes: computed once

    def time_ucm(executor, name: str) -> float:
        out = args.work / f"segments-{name}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        summary = ucm.run(ucm.UcmConfig(), store, out, executor=executor)
        elapsed = time.perf_counter() - t0
        assert summary.ok and summary.done == len(images), summary.line()
        return elapsed

    ucm.run(ucm.UcmConfig(), store, args.work / "segments-warmup")  # numba compile / cache load, excluded
    rows = []
    rows.append(("in-process", 0.0, time_ucm(InProcess(), "inprocess")))
    with ProcessPool(args.workers) as pool:
        rows.append((f"{args.workers} local processes", 0.0, time_ucm(pool, "processes")))
    t0 = time.perf_counter()
    with make_executor("dask-local", workers=args.workers) as dask:
        startup = time.perf_counter() - t0
        rows.append((f"dask-local, {args.workers} workers", startup, time_ucm(dask, "dask")))

    n = len(images)
    local = rows[1][2]
    print(f"ucm over {n} BSDS500 contour maps (PiDiNet-tiny, 481x321), {cpu_model()}, {os.cpu_count()} cores")
    print(f"{'executor':<26} {'start-up s':>10} {'run s':>8} {'img/s':>7} {'vs local processes':>19}")
    for name, start, run in rows:
        print(f"{name:<26} {start:>10.2f} {run:>8.2f} {n / run:>7.2f} {run / local:>18.2f}x")
    print(f"Dask overhead against local processes: {100 * (rows[2][2] / local - 1):+.1f}% of the run time "
          f"(cluster start-up {rows[2][1]:.1f} s not included)")


if __name__ == "__main__":
    main()
