"""SegSort training throughput on CPU, side by side in one run.

Two paths do the same work on the same synthetic batch (random pixels, Voronoi segments on the
stride-8 grid, the last image's bottom rows as crop padding), steps interleaved one by one so
that other jobs on a shared machine slow both alike:

* ``baseline``: the straightforward PyTorch port: fp32, NCHW, eager, ``torch.optim.SGD`` with
  its default (per-tensor) update;
* ``default``: this project's path: bf16 autocast + channels_last where the CPU has native bf16
  (AMX or AVX512-BF16 in /proc/cpuinfo), else fp32 channels_last; parameters stay fp32;
  ``SGD(fused=True)``.

Rows (the three training regimes of the backbone protocol, ``train_blocks`` = how many upper
trunk blocks train):

* ``full``: vgg16-hed trunk + embedding head + unsupervised SegSort loss, forward, backward, SGD
  (momentum 0.9, head at 10x lr, weight decay 5e-4 on weights);
* ``partial``: the last ``--train-blocks`` trunk blocks (default 1: conv4 at conv4_3, from
  pool3's cached 256-channel stride-8 maps) + the head, from maps cached once
  (:meth:`SegSortNet.features_at` / :meth:`SegSortNet.forward_from`);
* ``head``: the head alone on cached feature-layer maps (the head-only cached mode);
* ``feature pass``: the one-off no-grad trunk forward that fills the cache; the default path adds
  oneDNN's fused conv+ReLU with pre-cast weights (:meth:`VggTrunk.fuse_for_cpu`).

FLOPs are counted from the convs that actually run (forward hooks): 2 * Cin * Cout * k * k *
Hout * Wout / groups each; a training step is 3x the forward FLOPs (forward, input gradient,
weight gradient) less the input gradient of the first conv, whose input needs none (conv1_1 of
the trunk; the first trainable conv on cached maps). The loss and pointwise ops are not counted. The machine's
peak is cores x clock x FLOPs/cycle (see :func:`cpu_peak`; override with ``--peak-gflops``)::

    .venv/bin/python benchmarks/train.py                      # crop 320, batch 8, 3 steps
    .venv/bin/python benchmarks/train.py --quick              # crop 160, batch 2, 2 steps
    .venv/bin/python benchmarks/train.py --train-blocks 2     # partial row: conv3 + conv4 from pool2
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning. On a shared machine with more runnable threads
# than cores, spinning made every small op (the loss, ReLUs, the optimizer) up to 10x slower for
# both paths alike; set OMP_WAIT_POLICY=ACTIVE yourself to measure the spinning behaviour.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("SEGSORT_SHARED", ROOT.parent / "shared"))
DEFAULT_WEIGHTS = SHARED / "weights" / "hed-bsds500" / "hed_bsds500.weights.h5"

from segsort_unsup.contours.hed import MEAN_BGR  # noqa: E402
from segsort_unsup.embed.losses import PAD_SEGMENT, unsupervised_segsort_loss  # noqa: E402
from segsort_unsup.embed.model import SegSortNet, build_model  # noqa: E402


# -- machine -------------------------------------------------------------------------------------
def cpu_info() -> dict:
    """Model name, clock (MHz as /proc/cpuinfo reports it), flags, vendor."""
    info = {"model": "unknown CPU", "mhz": None, "flags": set(), "vendor": ""}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and info["model"] == "unknown CPU":
                    info["model"] = value
                elif key == "cpu MHz" and info["mhz"] is None:
                    info["mhz"] = float(value)
                elif key == "flags" and not info["flags"]:
                    info["flags"] = set(value.split())
                elif key == "vendor_id":
                    info["vendor"] = value
    except OSError:
        pass
    return info


def native_bf16(flags: set[str]) -> bool:
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def cpu_peak(info: dict, cores: int) -> tuple[float, float, str]:
    """(bf16, fp32) peak FLOP/s and the assumption behind them.

    FLOPs per cycle per core: AMX-BF16 (Intel): 1024 bf16 (one 16x32 x 32x16 tile product per
    16 cycles), 64 fp32 (two 512-bit FMA ports); AVX512-BF16 on AMD (Zen 4): 64 bf16 (one 512-bit
    VDPBF16PS per cycle, executed as two 256-bit halves), 32 fp32 (two 256-bit FMA pipes);
    AVX512-BF16 on Intel: 128 bf16, 64 fp32; otherwise AVX2: fp32 32, no native bf16 (= fp32).
    The clock is /proc/cpuinfo's "cpu MHz" (under a hypervisor the nominal clock; boost ignored).
    """
    flags, amd = info["flags"], info["vendor"] == "AuthenticAMD"
    if "amx_bf16" in flags:
        bf16, fp32, what = 1024, 64, "AMX-BF16"
    elif "avx512_bf16" in flags:
        bf16, fp32, what = (64, 32, "AVX512-BF16 (Zen 4)") if amd else (128, 64, "AVX512-BF16")
    elif "avx512f" in flags and not amd:
        bf16 = fp32 = 64
        what = "AVX-512, no bf16"
    else:
        bf16 = fp32 = 32
        what = "AVX2 FMA, no bf16"
    hz = (info["mhz"] or 2000.0) * 1e6
    note = (f"{cores} cores x {hz / 1e9:.2f} GHz x {bf16} bf16 / {fp32} fp32 FLOP/cycle ({what}) = "
            f"{cores * hz * bf16 / 1e9:.0f} GFLOP/s bf16, {cores * hz * fp32 / 1e9:.0f} GFLOP/s fp32")
    return cores * hz * bf16, cores * hz * fp32, note


def matmul_rate(dtype: torch.dtype, n: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of an n x n matmul in ``dtype``: what the BLAS reaches on this machine now."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2.0 * n ** 3 * repeats / (time.perf_counter() - start)


# -- FLOPs ---------------------------------------------------------------------------------------
def conv_flops(conv: torch.nn.Conv2d, h: int, w: int) -> float:
    """Forward FLOPs of a conv with an h x w output (one image)."""
    k = conv.kernel_size[0] * conv.kernel_size[1]
    return 2.0 * conv.in_channels // conv.groups * conv.out_channels * k * h * w


def counted_flops(module: torch.nn.Module, fn: Callable[[], object]) -> tuple[float, float]:
    """(total forward conv FLOPs, FLOPs of the first conv that ran) of ``fn()``, from hooks on
    ``module``'s convs; ``fn`` runs once without grad."""
    calls: list[float] = []

    def hook(conv, _inputs, out):
        calls.append(conv_flops(conv, out.shape[-2], out.shape[-1]) * out.shape[0])

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return sum(calls), (calls[0] if calls else 0.0)


def train_flops(module: torch.nn.Module, fn: Callable[[], object]) -> float:
    """A training step's FLOPs: 3x the forward less the first conv's input gradient."""
    total, first = counted_flops(module, fn)
    return 3 * total - first


# -- synthetic batch -----------------------------------------------------------------------------
def synthetic_batch(batch: int, crop: int, *, segments: int = 40, seed: int = 0):
    """Random RGB 0..255 images and Voronoi segments on the stride-8 grid; the last image's
    bottom quarter is crop padding (mean colour, :data:`PAD_SEGMENT`)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, crop, crop, generator=g) * 255
    side = -(-crop // 8)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    seeds = torch.randint(0, side, (batch, segments, 2), generator=g)
    d = (ys[None, None] - seeds[..., 0, None, None]) ** 2 + (xs[None, None] - seeds[..., 1, None, None]) ** 2
    seg = d.argmin(dim=1)
    pad = side // 4
    if pad:
        seg[-1, -pad:] = PAD_SEGMENT
        images[-1, :, -pad * 8:] = torch.tensor(MEAN_BGR[::-1]).view(3, 1, 1)
    return images, seg


# -- the two paths -------------------------------------------------------------------------------
def make_optimizer(params, *, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=2e-3, momentum=0.9, **({"fused": True} if fused else {}))


def train_step(model: SegSortNet, forward: Callable[[], torch.Tensor], seg, *, bf16: bool,
               fused: bool) -> Callable[[], None]:
    """One SGD step of the trainable parameters of ``model`` on ``forward()``'s embeddings."""
    opt = make_optimizer(model.param_groups(2e-3, weight_decay=5e-4), fused=fused)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = forward()
        unsupervised_segsort_loss(emb, seg).backward()
        opt.step()

    return step


def feature_pass(model: SegSortNet, images, layer: str, *, bf16: bool, fused: bool) -> Callable[[], torch.Tensor]:
    """The no-grad trunk forward up to ``layer`` (what a cached mode stores)."""
    trunk = copy.deepcopy(model.backbone).eval()
    if fused:
        trunk = trunk.to(memory_format=torch.channels_last).fuse_for_cpu(torch.bfloat16 if bf16 else torch.float32)

    def run() -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and not fused):
            return trunk.features_at(layer, images)

    return run


def interleaved(fns: dict[str, Callable], *, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crop", type=int, default=320, help="square crop side (pixels)")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per path (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per path first")
    parser.add_argument("--quick", action="store_true", help="crop 160, batch 2, 2 steps")
    parser.add_argument("--feature-layer", default="conv4_3", choices=("conv4_3", "conv5_3"))
    parser.add_argument("--train-blocks", type=int, default=1, help="upper trunk blocks of the partial row")
    parser.add_argument("--weights", type=Path, default=None, help="HED weights (default: ../shared copy, else cache)")
    parser.add_argument("--peak-gflops", type=float, default=None, help="override the bf16 peak (GFLOP/s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-full", action="store_true", help="only the cached-map rows")
    args = parser.parse_args(argv)
    if args.quick:
        args.crop, args.batch, args.steps = 160, 2, 2
    return args


def measure_regime(base: SegSortNet, images, seg, *, train_blocks: int | str, bf16: bool, steps: int,
                   warmup: int) -> tuple[dict[str, float], float, str]:
    """Seconds per step of baseline and default for one regime, its training FLOPs and the layer
    its cached maps come from (``image`` for the full regime)."""
    layer = base.cache_layer(train_blocks)
    models = {"baseline": copy.deepcopy(base).train_blocks(train_blocks),
              "default": copy.deepcopy(base).train_blocks(train_blocks).to(memory_format=torch.channels_last)}
    fns = {}
    for path, model in models.items():
        if layer == "image":
            x = images if path == "baseline" else images.contiguous(memory_format=torch.channels_last)
        else:
            x = feature_pass(model, images, layer, bf16=bf16 and path == "default", fused=path == "default")()
            x = x.contiguous() if path == "baseline" else x
        forward = (lambda m=model, x=x: m(x)) if layer == "image" else (lambda m=model, x=x: m.forward_from(layer, x))
        fns[path] = train_step(model, forward, seg, bf16=bf16 and path == "default", fused=path == "default")
    if layer == "image":
        flops = train_flops(base, lambda: base(images))
    else:
        cached = base.features_at(layer, images)
        flops = train_flops(base, lambda: base.forward_from(layer, cached))
    return interleaved(fns, warmup=warmup, repeats=steps), flops, layer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = args.weights or (DEFAULT_WEIGHTS if DEFAULT_WEIGHTS.is_file() else None)

    info = cpu_info()
    cores = torch.get_num_threads()
    bf16 = native_bf16(info["flags"])
    peak_bf16, peak_fp32, peak_note = cpu_peak(info, cores)
    if args.peak_gflops:
        peak_bf16 = args.peak_gflops * 1e9
        peak_note = f"bf16 peak given: {args.peak_gflops:.0f} GFLOP/s; fp32 {peak_fp32 / 1e9:.0f} GFLOP/s"
    peak_default = peak_bf16 if bf16 else peak_fp32
    matmul_fp32, matmul_default = matmul_rate(torch.float32), matmul_rate(torch.bfloat16 if bf16 else torch.float32)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU: {info['model']} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, {cores} threads, "
          f"native bf16: {'yes' if bf16 else 'no'}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average at start {load:.1f}")
    print(f"peak assumption: {peak_note}")
    print(f"measured 4096x4096 matmul: {matmul_fp32 / 1e9:.0f} GFLOP/s fp32, {matmul_default / 1e9:.0f} GFLOP/s "
          f"{'bf16' if bf16 else 'fp32'} (the nominal clock ignores boost: a path can pass the nominal peak)")
    print(f"work: vgg16-hed trunk ({args.feature_layer}, stride 8) + conv3 head (256 -> 32) + unsupervised "
          f"SegSort loss; crop {args.crop}, batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up")
    default_desc = "bf16 autocast + channels_last" if bf16 else "fp32 channels_last"
    print(f"baseline: fp32 NCHW eager, SGD per-tensor | default: {default_desc}, fused SGD, params fp32\n")

    torch.manual_seed(0)
    base = build_model({"feature_layer": args.feature_layer}, backbone_weights=weights)
    images, seg = synthetic_batch(args.batch, args.crop)

    rows = []
    regimes = [("head", 0), (f"partial ({args.train_blocks} block)", args.train_blocks)]
    if not args.skip_full:
        regimes.append(("full", "all"))
    for name, n in regimes:
        t, flops, layer = measure_regime(base, images, seg, train_blocks=n, bf16=bf16,
                                         steps=max(args.steps, 5) if n == 0 else args.steps,
                                         warmup=2 if n == 0 else args.warmup)
        rows.append((f"{name} step from {layer}", "steps/s", t, flops, 1.0))  # flops: the whole batch

    layer = base.cache_layer(args.train_blocks)
    passes = {"baseline": feature_pass(base, images, layer, bf16=False, fused=False),
              "default": feature_pass(base, images.contiguous(memory_format=torch.channels_last), layer,
                                      bf16=bf16, fused=True)}
    t = interleaved(passes, warmup=1, repeats=args.steps)
    fwd, _ = counted_flops(base, lambda: base.features_at(layer, images))
    rows.append((f"feature pass to {layer}", "images/s", t, fwd, args.batch))
    print_table(rows, peaks=(peak_fp32, peak_default), matmul=(matmul_fp32, matmul_default), bf16=bf16)
    return 0


def print_table(rows, *, peaks: tuple[float, float], matmul: tuple[float, float], bf16: bool) -> None:
    """One line a row; ``peaks`` and ``matmul``: (baseline's fp32, default's) FLOP/s references."""
    header = (f"{'row':<34}{'unit':>9}{'baseline':>10}{'default':>10}{'ratio':>7}"
              f"{'GFLOP/s b':>11}{'GFLOP/s d':>11}{'% peak b':>10}{'% peak d':>10}{'% mm b':>8}{'% mm d':>8}")
    print(header)
    print("-" * len(header))
    for name, unit, t, flops, per in rows:
        rate_b, rate_d = per / t["baseline"], per / t["default"]
        gb, gd = flops / t["baseline"], flops / t["default"]
        print(f"{name:<34}{unit:>9}{rate_b:>10.3f}{rate_d:>10.3f}{t['baseline'] / t['default']:>6.2f}x"
              f"{gb / 1e9:>11.1f}{gd / 1e9:>11.1f}{100 * gb / peaks[0]:>9.1f}%{100 * gd / peaks[1]:>9.1f}%"
              f"{100 * gb / matmul[0]:>7.1f}%{100 * gd / matmul[1]:>7.1f}%")
    precision = "bf16" if bf16 else "fp32"
    print(f"\n% peak b / % mm b: baseline vs the fp32 peak / the measured fp32 matmul; % peak d / % mm d: default "
          f"vs the {precision} peak / the measured {precision} matmul (FLOPs of the convs that ran; training = 3x "
          f"forward less the first conv's input gradient). Load average at end {os.getloadavg()[0]:.1f}.")


if __name__ == "__main__":
    sys.exit(main())
