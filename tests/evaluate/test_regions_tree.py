"""Region benchmarks from a merge tree equal those of its ucm2's 8-connected cuts, to the bit.

References: :func:`region_counts_ucm2` (BSR's ``bwlabel`` cut of the doubled grid, itself checked
against BSR's published outputs in test_bsr_reproduce.py) on the ucm2 of the same hierarchy.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage.measure import label as connected

from segsort_unsup.cli import main
from segsort_unsup.evaluate import regions as R
from segsort_unsup.evaluate.boundaries import default_thresholds
from segsort_unsup.evaluate.inputs import load_ground_truth
from segsort_unsup.io.store import DatasetSpec, Item, StoreReader, StoreSchema, StoreWriter
from segsort_unsup.ucm.hierarchy import ucm2_from_tree, ultrametric_contour_map

FIELDS = ("cnt_r", "sum_r", "cnt_p", "sum_p", "ri", "voi")


def assert_same(a: R.RegionCounts, b: R.RegionCounts) -> None:
    for name in FIELDS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.cnt_r_best == b.cnt_r_best


def random_hierarchy(rng: np.random.Generator, shape: tuple[int, int], n_seeds: int, steps: int):
    """Connected leaves (Voronoi cells split into 4-connected parts) merged along their adjacencies
    in random order at non-decreasing altitudes (``steps`` distinct levels, so ties happen)."""
    h, w = shape
    seeds = rng.uniform((0, 0), (h, w), (n_seeds, 2))
    yy, xx = np.mgrid[0:h, 0:w]
    nearest = ((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2).argmin(-1)
    leaves = (connected(nearest + 1, connectivity=1, background=0) - 1).astype(np.int32)
    n = int(leaves.max()) + 1
    pairs = np.concatenate([np.stack([leaves[:, :-1].ravel(), leaves[:, 1:].ravel()], 1),
                            np.stack([leaves[:-1].ravel(), leaves[1:].ravel()], 1)])
    pairs = np.unique(np.sort(pairs[pairs[:, 0] != pairs[:, 1]], axis=1), axis=0)
    parents = np.arange(2 * n - 1, dtype=np.int32)
    altitudes = np.zeros(2 * n - 1, np.float32)
    root = np.arange(2 * n - 1)

    def find(x):
        while root[x] != x:
            root[x] = root[root[x]]
            x = root[x]
        return x

    node = n
    levels = np.sort(rng.choice(np.arange(1, steps + 1), n - 1)) / (steps + 1)
    for a, b in pairs[rng.permutation(len(pairs))]:
        ra, rb = find(a), find(b)
        if ra == rb:
            continue
        parents[ra] = parents[rb] = node
        root[ra] = root[rb] = node
        altitudes[node] = levels[node - n]
        node += 1
    assert node == 2 * n - 1  # the leaves are connected: one tree
    return parents, altitudes, leaves


@pytest.mark.parametrize("seed", range(6))
def test_tree_equals_ucm2_cuts_on_random_hierarchies(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(20, 45)), int(rng.integers(20, 45)))
    parents, altitudes, leaves = random_hierarchy(rng, shape, int(rng.integers(5, 60)), int(rng.integers(3, 40)))
    ucm2 = ucm2_from_tree(parents, altitudes, leaves)
    # humans: coarse blocks, label 0 (unlabelled) in some of them, a gap in the ids in one
    gts = [rng.integers(0, k, (shape[0] // 4 + 1, shape[1] // 4 + 1)).repeat(4, 0).repeat(4, 1)[:shape[0], :shape[1]]
           for k in (2, 5, 9)]
    gts[1] = (gts[1] * 3).astype(np.uint16)
    for thresholds in (default_thresholds(99), default_thresholds(7)[::-1], rng.uniform(0, 1, 12)):
        tree = R.region_counts_tree(parents, altitudes, leaves, gts, thresholds=thresholds)
        assert_same(tree, R.region_counts_ucm2(ucm2, gts, thresholds=thresholds))
    # the pixel cut of the tree is the reference too (every threshold a fresh map)
    thresholds = default_thresholds(9)
    from segsort_unsup.ucm.hierarchy import cut_labels

    cuts = [cut_labels(parents, altitudes, threshold=t)[leaves] + 1 for t in thresholds]
    direct = R.region_counts(cuts, gts, thresholds=thresholds)
    tree = R.region_counts_tree(parents, altitudes, leaves, gts, thresholds=thresholds)
    for name in ("sum_r", "sum_p", "ri"):  # sums of integers: the same in any order
        assert np.array_equal(getattr(tree, name), getattr(direct, name)), name
    for name in ("cnt_r", "cnt_p", "voi"):  # raster-order region ids sum in another order
        assert np.allclose(getattr(tree, name), getattr(direct, name), rtol=1e-13, atol=0), name


def test_tree_equals_ucm2_cuts_on_real_bsds(bsds):
    """OWT-UCM of real edge maps (BSR's sample) against their human segmentations, 99 thresholds."""
    sample = bsds / "bench_sample"
    for iid in ("2018", "5096"):
        edge = np.asarray(Image.open(sample / "png" / f"{iid}.png"), np.float32) / 255
        ucm = ultrametric_contour_map(edge)
        gt = load_ground_truth(sample / "groundTruth" / f"{iid}.mat")
        thresholds = default_thresholds(99)
        tree = R.region_counts_tree(ucm.parents, ucm.altitudes, ucm.leaves, gt.segmentations, thresholds=thresholds)
        assert_same(tree, R.region_counts_ucm2(ucm.ucm2, gt.segmentations, thresholds=thresholds))
        assert tree.cnt_r.max() > 0.2 * tree.sum_r[0]  # a real benchmark, not an empty one


def test_segments_store_regions_use_the_tree_and_match_the_ucm2(bsds, tmp_path):
    """``evaluate regions`` of a ``ucm`` store (tree path) writes the same files as the same ucm2s
    in a store without the tree (the ucm2 path)."""
    sample = bsds / "bench_sample"
    ids = ["2018", "3063"]
    edges = tmp_path / "edges"
    edges.mkdir()
    for iid in ids:
        Image.open(sample / "png" / f"{iid}.png").save(edges / f"{iid}.png")
    store = tmp_path / "segments"
    result = CliRunner().invoke(main, ["-q", "ucm", str(edges), "-o", str(store)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    ucm2_only = tmp_path / "ucm2_only"
    with StoreReader(store) as reader, StoreWriter(ucm2_only, kind="segments", config={"k": 1},
                                                   schema=StoreSchema("segments", (DatasetSpec("ucm2", "float32", 2),))) as w:
        for key in reader.keys():
            w.add(Item(key, {"ucm2": reader.read(key, ("ucm2",)).arrays["ucm2"]}))
    texts = []
    for src in (store, ucm2_only):
        out = tmp_path / f"out_{src.name}"
        result = CliRunner().invoke(main, ["-q", "evaluate", "regions", str(src), "--gt", str(sample / "groundTruth"),
                                           "-o", str(out)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        texts.append({n: (out / n).read_text() for n in ("eval_cover.txt", "eval_cover_img.txt", "eval_cover_th.txt",
                                                        "eval_RI_VOI.txt", "eval_RI_VOI_thr.txt")})
    assert texts[0] == texts[1]
