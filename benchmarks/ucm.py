"""OWT-UCM speed: this project (numba) vs higra, side by side on the same BSDS500 contour maps.

    python benchmarks/ucm.py [--images 10] [--repeat 3] [--bsds PATH]

Two kinds of contour map per image (481x321): the blurred mean human boundaries used by the
peer test (few watershed regions), and the Sobel gradient of the photo (thousands of regions,
the hard case). Both pipelines get the same 4-adjacency edge weights and orientations;
timings are per image, best of ``--repeat``, after numba's warm-up (compilation excluded),
one process. This project: pixel maps -> edge weights -> watershed -> OWT -> merging -> ucm2.
higra: ``mean_pb_hierarchy`` -> ``saliency`` -> ``graph_4_adjacency_2_khalimsky`` (its graph
and the edge-weight reindexing are built outside the timed part).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _best(fn, repeat):
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bsds", type=Path,
                        default=Path(os.environ.get("SEGSORT_SHARED", REPO.parent / "shared")) / "data" / "bsds500")
    parser.add_argument("--contours", type=Path, action="append", default=[],
                        help="also time the maps of a contours store (e.g. PiDiNet or HED on BSDS500); repeatable")
    args = parser.parse_args()

    import higra as hg
    from skimage import color, filters, io

    from segsort_unsup.edgemaps import edge_orientation
    from segsort_unsup.ucm.hierarchy import ultrametric_contour_map
    from tests.ucm.grid_oracle import grid_edge_weights
    from tests.ucm.maps import TEST_IDS, gt_contour_map

    ids = TEST_IDS[: args.images]
    inputs = {"gt-blur": [], "sobel": []}
    for image_id in ids:
        edge = gt_contour_map(args.bsds / "groundTruth" / "test" / f"{image_id}.mat")
        inputs["gt-blur"].append((edge, edge_orientation(edge)))
        photo = io.imread(args.bsds / "images" / "test" / f"{image_id}.jpg")
        sob = filters.sobel(color.rgb2gray(photo)).astype(np.float32)
        sob /= max(float(sob.max()), 1e-6)
        inputs["sobel"].append((sob, edge_orientation(sob)))

    from segsort_unsup.io.store import StoreReader

    for root in args.contours:
        with StoreReader(root, kind="contours", required=("edge", "orientation")) as store:
            label = str(store.meta.get("model", root.name))
            inputs[label] = [
                tuple(np.asarray(store[k].arrays[n], np.float32) for n in ("edge", "orientation"))
                for k in store.keys()[: args.images]
            ]

    edge, orient = inputs["gt-blur"][0]
    t0 = time.perf_counter()
    ultrametric_contour_map(edge, orient)  # compile (or load the numba cache)
    warmup = time.perf_counter() - t0

    rows = []
    for kind, maps in inputs.items():
        ours_t, hg_t, regions = [], [], []
        for edge, orient in maps:
            h, w = edge.shape
            graph = hg.get_4_adjacency_graph((h, w))
            src, dst = graph.edge_list()
            idx = np.where(dst == src + 1, src, h * w + src)
            weights, orients = grid_edge_weights(edge, orient)
            hw, ho = weights[idx], orients[idx]

            def run_higra():
                tree, alt = hg.mean_pb_hierarchy(graph, hw, shape=(h, w), edge_orientations=ho)
                return hg.graph_4_adjacency_2_khalimsky(graph, hg.saliency(tree, alt), shape=(h, w),
                                                        add_extra_border=True)

            ours_t.append(_best(lambda: ultrametric_contour_map(edge, orient), args.repeat))
            hg_t.append(_best(run_higra, args.repeat))
            regions.append(int(ultrametric_contour_map(edge, orient).leaves.max()) + 1)
        rows.append((kind, len(maps), int(np.mean(regions)), np.mean(ours_t), np.mean(hg_t)))

    print(f"OWT-UCM, {len(ids)} BSDS500 test images (481x321), s/image, best of {args.repeat}, one process")
    print(f"numba warm-up (first call, compile or cache load): {warmup:.2f} s, excluded")
    print(f"{'input':<14} {'images':>6} {'regions':>8} {'segsort-unsup':>14} {'higra':>8} {'higra/ours':>11}")
    for kind, n, reg, ours, theirs in rows:
        print(f"{kind:<14} {n:>6} {reg:>8} {ours:>14.4f} {theirs:>8.4f} {theirs / ours:>10.2f}x")


if __name__ == "__main__":
    main()
