"""FINCH speed and memory: this project vs the reference finch-clust, side by side in one table.

    python benchmarks/finch.py [--quick] [--repeat 3] [--seed 0] [--no-reference] [--no-large]

Data: a Gaussian mixture on the unit sphere (n/1000 random directions, isotropic noise of norm
about 0.5, rows normalised), float32, generated from ``--seed`` in every row alike.

Rows, each in its own process (so peak RSS, from ``resource.getrusage``, is that row's alone; it
includes the interpreter, the libraries and the data):

- 100k x 64: finch-clust with its defaults (above its ann_threshold of 20k it uses pynndescent;
  without pynndescent it cannot run with its defaults, and the row uses its own faiss HNSW path
  instead, ``faiss_threshold=ann_threshold``, and says so);
- 100k x 64: this project with its defaults (IVF index above exact_limit=20k), and with exact
  first neighbours everywhere (``exact_limit=N``), the reference for the ARI column;
- 1M x 32: this project with its defaults.

Seconds are for the clustering call only: data generation and imports excluded, numba /
pynndescent JIT compilation excluded by a small warm-up run first. The two 100k rows of the
reference and of this project run side by side and alternate ``--repeat`` calls (the machine's
load, if shared, is then the same for both); the best call is shown. The exact and 1M rows make
one call. ARI is the adjusted Rand index against exact FINCH at each level both have (the
minimum is shown).
``--quick`` runs 10k x 64 and 50k x 32 instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# This file is named like the reference package (import name ``finch``): keep its folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))


def cpu_model() -> str:
    from segsort_unsup.sysinfo import cpu_model as model

    return model()


def mixture(n: int, d: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """n x d float32 rows: n // 1000 (at least 10) directions + noise, normalised; built in chunks."""
    rng = np.random.default_rng(seed)
    k = max(10, n // 1000)
    centres = rng.normal(size=(k, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        part = centres[rng.integers(0, k, e - s)] + rng.standard_normal((e - s, d), dtype=np.float32) * (0.5 / np.sqrt(d))
        x[s:e] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x


def ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index from the contingency table."""
    a = np.unique(a, return_inverse=True)[1].reshape(-1).astype(np.int64)
    b = np.unique(b, return_inverse=True)[1].reshape(-1).astype(np.int64)

    def comb2(v):
        v = np.asarray(v, np.float64)
        return float((v * (v - 1) / 2).sum())

    index = comb2(np.unique(a * (b.max() + 1) + b, return_counts=True)[1])
    rows, cols = comb2(np.bincount(a)), comb2(np.bincount(b))
    expected = rows * cols / comb2([a.size])
    top = (rows + cols) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


def _has_pynndescent() -> bool:
    try:
        import pynndescent  # noqa: F401
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# one row (runs in a subprocess)
# ----------------------------------------------------------------------------------------------


def serve_row(kind: str, n: int, d: int, seed: int, out: Path) -> None:
    """Row process: build the data, warm up, then one clustering call per "run" line on stdin.

    Prints one JSON line per call ({"seconds"}); on "done" saves the last partitions and prints
    {"peak", "counts", "note"}.
    """
    import warnings

    warnings.simplefilter("ignore")
    x = mixture(n, d, seed)
    note = ""
    if kind == "reference":
        from finch import FINCH

        kwargs, warm = {}, {}
        if n > 20_000:  # above its ann_threshold: pynndescent (numba JIT), warmed up on a small slice
            warm = {"ann_threshold": 1000}
            if not _has_pynndescent():
                kwargs = {"faiss_threshold": 20_000}  # its own faiss path: the defaults need pynndescent here
                warm["faiss_threshold"] = 1000
                note = "pynndescent missing: its faiss HNSW path (faiss_threshold=20000)"
        FINCH(x[:3000], **warm)

        def call():
            c, counts, _ = FINCH(x, **kwargs)
            return np.asarray(c).reshape(n, -1), counts
    else:
        from segsort_unsup.discover import finch

        kwargs = {"exact_limit": n} if kind == "exact" else {}
        finch(x[:3000], exact_limit=1000, req_clust=50)  # numba warm-up (normally a cache hit)

        def call():
            res = finch(x, **kwargs)
            return res.partitions, res.counts

    print("ready", flush=True)
    partitions, counts = None, []
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t0 = time.perf_counter()
        partitions, counts = call()
        print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
    np.save(out / f"{kind}-{n}x{d}.npy", partitions)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "counts": [int(c) for c in counts], "note": note}), flush=True)


class Row:
    """One table row, run in its own process (so its peak RSS is its own)."""

    def __init__(self, label: str, kind: str, n: int, d: int, calls: int) -> None:
        self.label, self.kind, self.n, self.d, self.calls = label, kind, n, d, calls
        self.times: list[float] = []
        self.result: dict = {}

    def start(self, seed: int, out: Path) -> None:
        cmd = [sys.executable, __file__, "--row", self.kind, "--n", str(self.n), "--d", str(self.d),
               "--seed", str(seed), "--out", str(out)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        self.out = out
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        self._read()  # "ready"

    def _read(self) -> str:
        line = self.proc.stdout.readline() if self.proc else ""
        if not line:
            self.proc.wait()
            self.stderr.seek(0)
            tail = self.stderr.read().strip().splitlines()[-1:] or ["?"]
            self.result = {"error": f"exit {self.proc.returncode}: {tail[0][:100]}"}
            self.proc = None
            raise RuntimeError(self.result["error"])
        return line

    def call(self) -> None:
        if self.proc is None:
            return
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        try:
            self.times.append(json.loads(self._read())["seconds"])
        except RuntimeError:
            pass

    def finish(self) -> None:
        if self.proc is None:
            return
        self.proc.stdin.write("done\n")
        self.proc.stdin.flush()
        try:
            self.result = json.loads(self._read())
        except RuntimeError:
            return
        self.proc.wait()
        self.result["seconds"] = min(self.times)
        self.result["partitions"] = np.load(self.out / f"{self.kind}-{self.n}x{self.d}.npy")


def run_rows(rows: list[Row], seed: int, out: Path) -> None:
    """Start the rows together, alternate their calls round by round (same machine load for each)."""
    for row in rows:
        print(f"  starting {row.label} on {row.n} x {row.d} ...", file=sys.stderr, flush=True)
        try:
            row.start(seed, out)
        except RuntimeError:
            pass
    for _ in range(max(row.calls for row in rows)):
        for row in rows:
            if len(row.times) < row.calls:
                row.call()
    for row in rows:
        row.finish()


# ----------------------------------------------------------------------------------------------
# table
# ----------------------------------------------------------------------------------------------




def _counts(counts: list[int], width: int = 30) -> str:
    text = ",".join(map(str, counts))
    return text if len(text) <= width else text[: width - 3] + "..."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k x 64 and 50k x 32 instead of 100k x 64 and 1M x 32")
    parser.add_argument("--repeat", type=int, default=3, help="calls per 100k row (best is shown)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true", help="skip the finch-clust row")
    parser.add_argument("--no-large", action="store_true", help="skip the 1M x 32 row")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--d", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        serve_row(args.row, args.n, args.d, args.seed, args.out)
        return

    import faiss

    try:
        from importlib.metadata import version

        ref_version = version("finch-clust")
    except Exception:
        ref_version = None
    medium, large = ((10_000, 64), (50_000, 32)) if args.quick else ((100_000, 64), (1_000_000, 32))
    print(f"FINCH benchmark: {cpu_model()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM")
    print(f"python {platform.python_version()}, numpy {np.__version__}, faiss {faiss.__version__}, "
          f"finch-clust {ref_version or 'not installed'}, pynndescent {'yes' if _has_pynndescent() else 'no'}; "
          f"seed {args.seed}")
    print("seconds: clustering call only (no data generation, imports or JIT); peak RSS: whole row process\n")

    # Rows of one group run side by side, calls alternating; groups run one after the other.
    groups = []
    medium_rows = []
    if not args.no_reference and ref_version:
        medium_rows.append(Row("finch-clust, defaults", "reference", *medium, args.repeat))
    medium_rows.append(Row("this project, defaults", "ours", *medium, args.repeat))
    groups += [medium_rows, [Row("this project, exact (exact_limit=N)", "exact", *medium, 1)]]
    if not args.no_large:
        groups.append([Row("this project, defaults", "ours", *large, 1)])

    with tempfile.TemporaryDirectory() as tmp:
        for group in groups:
            run_rows(group, args.seed, Path(tmp))
    rows = [(row.label, row.kind, row.n, row.d, dict(row.result, repeat=len(row.times))) for group in groups for row in group]

    exact = {(n, d): r for _, kind, n, d, r in rows if kind == "exact" and "error" not in r}
    ref = {(n, d): r for _, kind, n, d, r in rows if kind == "reference" and "error" not in r}
    header = (f"{'data':>11}  {'method':<36} {'seconds':>8} {'calls':>5} {'peak RSS':>9} {'speed-up':>8}  "
              f"{'ARI vs exact':>12}  levels (counts)")
    print(header)
    print("-" * len(header))
    notes: list[str] = []
    for label, kind, n, d, r in rows:
        data = f"{n // 1000}k x {d}" if n < 1_000_000 else f"{n // 1_000_000}M x {d}"
        if "error" in r:
            print(f"{data:>11}  {label:<36} {'failed':>8}  {r['error']}")
            continue
        speed = ""
        if (n, d) in ref and kind != "reference":
            speed = f"{ref[(n, d)]['seconds'] / r['seconds']:.1f}x"
        score = ""
        if (n, d) in exact and kind != "exact":
            e = exact[(n, d)]["partitions"]
            levels = min(e.shape[1], r["partitions"].shape[1])
            values = [ari(r["partitions"][:, i], e[:, i]) for i in range(levels)]
            score = f"{min(values):.4f}"
            notes.append(f"{label}, {data}: ARI vs exact per level " + ", ".join(f"{v:.4f}" for v in values))
        elif kind == "exact":
            score = "1 (itself)"
        else:
            score = "n/a"
        print(f"{data:>11}  {label:<36} {r['seconds']:8.1f} {r['repeat']:>5} {r['peak'] / 2**30:7.2f}Gi {speed:>8}  "
              f"{score:>12}  {_counts(r['counts'])}")
        if r.get("note"):
            notes.append(f"{label}: {r['note']}")
    for note in notes:
        print(f"note - {note}")


if __name__ == "__main__":
    main()
