"""BSDS500 test results of this project's own pipeline: contours (every model and scale setting)
and X-owt-ucm, next to the published numbers. Prints the tables that README.md shows.

    python benchmarks/bsds_results.py --work /tmp/bsds-runs [--models hed-bsds500,pidinet] [--images 200]

Every stage writes a resumable store under --work, so an interrupted run picks up where it
stopped. Weights come from the cache (`segsort-unsup weights fetch`) or ../shared/weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from segsort_unsup.contours.registry import MODELS
from segsort_unsup.contours import stage as contours_stage
from segsort_unsup.contours.stage import ContoursConfig
from segsort_unsup.evaluate.bsds import BenchOptions, run_benchmark
from segsort_unsup.io.images import list_images
from segsort_unsup.log import setup_logging
from segsort_unsup.parallel import make_executor
from segsort_unsup.sysinfo import cpu_model
from segsort_unsup.ucm import stage as ucm_stage
from segsort_unsup.ucm.stage import UcmConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LOCAL_WEIGHTS = {
    "hed-bsds500": SHARED / "weights/hed-bsds500/hed_bsds500.weights.h5",
    "pidinet": SHARED / "weights/pidinet/table5_pidinet.pth",
    "pidinet-small": SHARED / "weights/pidinet/table5_pidinet-small.pth",
    "pidinet-tiny": SHARED / "weights/pidinet/table5_pidinet-tiny.pth",
}
# gPb-owt-ucm on BSDS500 test, Arbelaez et al. TPAMI 2011 (boundary ODS/OIS/AP; regions at ODS/OIS)
GPB_OWT_UCM = {"ods": 0.73, "ois": 0.76, "ap": 0.73, "covering_ods": 0.59, "covering_ois": 0.65,
               "pri_ods": 0.83, "pri_ois": 0.86, "vi_ods": 1.69, "vi_ois": 1.48}




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--bsds", type=Path, default=SHARED / "data/bsds500")
    ap.add_argument("--models", default="hed-bsds500,pidinet,pidinet-small,pidinet-tiny")
    ap.add_argument("--scales", default="1;0.5,1,1.5", help="scale settings separated by ';'")
    ap.add_argument("--ucm-models", default="hed-bsds500,pidinet", help="models also run through owt-ucm")
    ap.add_argument("--images", type=int, default=200, help="first N test images (200 = all)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    setup_logging(-1)
    refs = list_images(args.bsds / "images/test")[: args.images]
    gt = args.bsds / "groundTruth/test"
    rows, ucm_rows = [], []
    pool = make_executor("local", workers=args.workers)
    for name in args.models.split(","):
        for scales in args.scales.split(";"):
            scale_t = tuple(float(s) for s in scales.split(","))
            tag = f"{name}-s{'_'.join(f'{s:g}' for s in scale_t)}"
            t0 = time.perf_counter()
            weights = LOCAL_WEIGHTS.get(name)
            cfg = ContoursConfig(model=name, scales=scale_t, weights=str(weights) if weights else None)
            summary = contours_stage.run(cfg, refs, args.work / tag / "contours")
            t_contours = time.perf_counter() - t0
            t0 = time.perf_counter()
            report = run_benchmark(args.work / tag / "contours", gt, args.work / tag / "eval_bdry",
                                   options=BenchOptions(), executor=pool, overwrite=True, label=tag)
            b = report.boundary
            rows.append((name, scales, b.ods_f, b.ois_f, b.ap, b.r50, MODELS[name].published, summary.done,
                         t_contours, time.perf_counter() - t0))
            print(f"{tag}: ODS {b.ods_f:.3f} OIS {b.ois_f:.3f} AP {b.ap:.3f}", flush=True)
            if name in args.ucm_models.split(",") and scale_t == (1.0,):
                t0 = time.perf_counter()
                ucm_stage.run(UcmConfig(), args.work / tag / "contours", args.work / tag / "segments", executor=pool)
                t_ucm = time.perf_counter() - t0
                rep = run_benchmark(args.work / tag / "segments", gt, args.work / tag / "eval_ucm",
                                    options=BenchOptions(regions=True), executor=pool, overwrite=True,
                                    label=f"{name}-owt-ucm")
                ucm_rows.append((f"{name}-owt-ucm", rep.boundary, rep.region, t_ucm))
    print(f"\nBSDS500 test, {len(refs)} images, CPU: {cpu_model()}\n")
    print("| model | scales | ODS | OIS | AP | R50 | published ODS / OIS / AP | contours s/img | eval s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, scales, ods, ois, apv, r50, pub, n, tc, te in rows:
        pubtxt = " / ".join(f"{pub[k]:.3f}" if k in pub else "-" for k in ("ods", "ois", "ap")) if pub else "-"
        print(f"| {name} | {scales} | {ods:.3f} | {ois:.3f} | {apv:.3f} | {r50:.3f} | {pubtxt} | "
              f"{tc / max(n, 1):.3f} | {te:.0f} |")
    if ucm_rows:
        print("\n| method | bdry ODS | OIS | AP | Covering ODS | OIS | Best | PRI ODS | OIS | VI ODS | OIS | ucm s/img |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        g = GPB_OWT_UCM
        print(f"| gPb-owt-ucm (published) | {g['ods']:.2f} | {g['ois']:.2f} | {g['ap']:.2f} | {g['covering_ods']:.2f} | "
              f"{g['covering_ois']:.2f} | 0.74 | {g['pri_ods']:.2f} | {g['pri_ois']:.2f} | {g['vi_ods']:.2f} | "
              f"{g['vi_ois']:.2f} | - |")
        for method, b, r, t in ucm_rows:
            print(f"| {method} | {b.ods_f:.3f} | {b.ois_f:.3f} | {b.ap:.3f} | {r.cover_ods:.3f} | {r.cover_ois:.3f} | "
                  f"{r.cover_best:.3f} | {r.ri_ods:.3f} | {r.ri_ois:.3f} | {r.voi_ods:.3f} | {r.voi_ois:.3f} | "
                  f"{t / len(refs):.3f} |")
    (args.work / "results.json").write_text(json.dumps({"rows": [r[:6] for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
