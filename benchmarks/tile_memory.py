"""Working memory of one tile's forward pass, per contour model and precision (Linux).

For each model and precision a fresh Python process builds the detector, runs a small warm-up
tile, resets its peak resident size (``/proc/self/clear_refs``) and runs three tiles of the
huge-image path: cut from a uint8 image, converted to float, through the network, times the blend
weights. The peak growth of resident memory over those passes is the tile's working memory (freed
memory is not always reused by the next tile, so one pass alone can read low); divided by the
tile's pixels it is the per-pixel figure that ``ContourModel.tile_bytes`` records (measured at
1024 x 1024, rounded up) and from which :func:`~segsort_unsup.contours.detect.auto_tile_side`
picks the tile side::

    .venv/bin/python benchmarks/tile_memory.py                 # 1024 x 1024 tiles
    .venv/bin/python benchmarks/tile_memory.py --side auto     # each model's automatic side

The columns: the figure in the registry, the one measured now, the automatic tile side, and the
measured working memory at the side asked for against the budget. A model whose weights are
missing is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))  # this checkout, not an installed copy
PRECISIONS = ("fp32", "bf16")

_PROBE = r"""
import gc, json, sys
import numpy as np
import torch
from segsort_unsup.contours.detect import EdgeDetector, _edge_weights, auto_tile_side

model, weights, precision, side, passes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
det = EdgeDetector(model, weights, device="cpu", precision=precision)
rng = np.random.default_rng(0)
image = rng.integers(0, 256, (1, side, side, 3), dtype=np.uint8)
weight = _edge_weights(side, True, True, det.tile_overlap, torch.device("cpu"))

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(key)

with torch.inference_mode():
    det._run_network(torch.from_numpy(image[:, :64, :64]).permute(0, 3, 1, 2).float())  # warm-up
    gc.collect()
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current resident size
    for _ in range(passes):  # a huge image runs many tiles: freed memory may not all be reused
        tile = torch.from_numpy(image).permute(0, 3, 1, 2).float()
        prob = det._run_network(tile)
        blended = prob[:, 0] * (weight[:, None] * weight[None, :])
        del tile, prob, blended
    peak = status("VmHWM")
print(json.dumps({"bytes": peak - before, "pixels": side * side, "auto": auto_tile_side(model, det.precision),
                  "precision": det.precision}))
"""


def weights_of(model: str, shared: Path = SHARED) -> Path | None:
    """The shared weights file of a registry model, or None when it is not there."""
    from segsort_unsup.contours.registry import get_model

    entry = get_model(model)
    folder = shared / "weights" / ("pidinet" if entry.arch == "pidinet" else "hed-bsds500")
    path = folder / entry.upstream_name
    return path if path.exists() else None


def measure(model: str, weights: str | Path, precision: str, side: int | str, *, passes: int = 3) -> dict:
    """``{"bytes", "pixels", "auto", "precision"}``: the peak over ``passes`` tile passes in a fresh
    process; ``side`` ``"auto"`` measures at the model's automatic tile side."""
    if side == "auto":
        from segsort_unsup.contours.detect import auto_tile_side

        side = auto_tile_side(model, precision)
    proc = subprocess.run([sys.executable, "-c", _PROBE, model, str(weights), precision, str(side), str(passes)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{model} {precision}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from segsort_unsup.contours.detect import TILE_MEMORY_BUDGET, auto_tile_side
    from segsort_unsup.contours.registry import MODELS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", default="1024", help="tile side to measure, or auto (default 1024)")
    parser.add_argument("--models", default="hed-bsds500,pidinet,pidinet-small,pidinet-tiny")
    args = parser.parse_args()
    side = args.side if args.side == "auto" else int(args.side)
    print(f"budget {TILE_MEMORY_BUDGET / 2**20:.0f} MiB per tile; measured at {side}")
    print(f"{'model':<15} {'prec':<5} {'registry B/px':>13} {'measured B/px':>13} {'auto side':>9} "
          f"{'tile side':>9} {'working MiB':>11}")
    for model in args.models.split(","):
        weights = weights_of(model)
        if weights is None:
            print(f"{model:<15} skipped: weights not found under {SHARED / 'weights'}")
            continue
        for precision in PRECISIONS:
            got = measure(model, weights, precision, side)
            tile = int(got["pixels"] ** 0.5)
            print(f"{model:<15} {precision:<5} {MODELS[model].tile_bytes.get(precision, 0):>13} "
                  f"{got['bytes'] / got['pixels']:>13.0f} {auto_tile_side(model, precision):>9} {tile:>9} "
                  f"{got['bytes'] / 2**20:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
