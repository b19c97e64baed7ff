"""The transfer stage's exact search side by side: faiss ``IndexFlatIP`` against :class:`ExactSearch`.

    python benchmarks/search.py [--labelled STORE --query STORE] [--images 10] [--k 15]

With two prototypes stores (e.g. ``runs/camvid/prototypes/unsup-labelled`` and ``unsup-scored``)
it searches the first ``--images`` query images' prototypes, one search call per image as the
stage does; without them, random unit vectors of CamVid's headline size (438,294 labelled
prototypes of 32 dimensions, 1,000 queries an image). The table gives seconds, the speed-up, and
how many query rows found a different neighbour set (0 expected; a near-tie may differ by rounding).
The CPU is printed in the header.
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

from segsort_unsup.sysinfo import cpu_model  # noqa: E402


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _inputs(args) -> tuple[np.ndarray, list[np.ndarray], str]:
    if args.labelled is None:
        rng = np.random.default_rng(0)
        queries = [_unit(rng, 1000, 32) for _ in range(args.images)]
        return _unit(rng, 438_294, 32), queries, "random unit vectors"
    from segsort_unsup.io.store import StoreReader

    with StoreReader(args.labelled, kind="prototypes") as lab, StoreReader(args.query, kind="prototypes") as qry:
        labelled = lab.stack("prototypes")[0].array
        queries = [qry.read(key, ("prototypes",)).arrays["prototypes"] for key in qry.keys()[: args.images]]
    return labelled, queries, f"{args.labelled.name} -> {args.query.name}"


def _timed(search, queries: list[np.ndarray], k: int) -> tuple[float, list[np.ndarray]]:
    started = time.perf_counter()
    found = [search.search(q, k)[1] for q in queries]
    return time.perf_counter() - started, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelled", type=Path)
    parser.add_argument("--query", type=Path)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--k", type=int, default=15)
    args = parser.parse_args()
    if (args.labelled is None) != (args.query is None):
        parser.error("give both --labelled and --query, or neither")

    import faiss
    import torch

    from segsort_unsup.transfer.stage import ExactSearch

    labelled, queries, what = _inputs(args)
    peer = faiss.IndexFlatIP(labelled.shape[1])
    peer.add(labelled)
    ours = ExactSearch(labelled)
    faiss_s, want = _timed(peer, queries, args.k)
    ours_s, got = _timed(ours, queries, args.k)
    differing = sum(int((np.sort(a, 1) != np.sort(b, 1)).any(1).sum()) for a, b in zip(got, want))
    rows = sum(len(q) for q in queries)
    print(f"exact kNN (k={args.k}) of {rows:,} query rows in {len(queries)} calls against {len(labelled):,} x "
          f"{labelled.shape[1]} prototypes ({what}); {cpu_model()}, {os.cpu_count()} cores, "
          f"faiss {faiss.omp_get_max_threads()} / torch {torch.get_num_threads()} threads")
    print(f"{'search':<28} {'seconds':>8} {'rows/s':>9} {'speed-up':>9}")
    print(f"{'faiss IndexFlatIP':<28} {faiss_s:>8.2f} {rows / faiss_s:>9.0f} {1.0:>8.2f}x")
    print(f"{'ExactSearch (blocked topk)':<28} {ours_s:>8.2f} {rows / ours_s:>9.0f} {faiss_s / ours_s:>8.2f}x")
    print(f"query rows whose neighbour set differs: {differing} of {rows}")


if __name__ == "__main__":
    main()
