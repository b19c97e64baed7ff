"""GPU smoke run: every CUDA path once, on real photos, in a few minutes; a table and an exit code.

Prepares everything itself from the shared data (``--shared``, default ``$SEGSORT_SHARED``):
CamVid train photos -> ``contours`` (PiDiNet) -> ``ucm`` (a segments store), then checks, each
through the installed ``segsort-unsup`` console script where a user would call it:

1. ``train --mode full``: 100 steps, batch 8, crop 320, precision ``auto`` (bf16 autocast where
   the GPU has it, fp16 elsewhere); img/s and the loss falling (mean of the last three logged
   losses below the first three);
2. the trained model's embeddings of 4 photos on the CPU (fp32) and on the device (fp32, then the
   run's precision): per-pixel cosine (fp32 must be >= 0.999: TF32 convolutions are allowed);
3. ``embed`` of 20 CamVid val photos on the device: img/s, 20 items, finite prototypes;
4. ``torchrun --nproc-per-node 1`` of the same ``train`` command: its logged losses equal the
   plain run's (rel. 1e-3 at the first log, 2e-2 after: cuDNN may sum in another order); and one
   DDP step on an nccl process group (this script under torchrun) whose loss and gradients equal
   the same step without DDP;
5. kill and resume: the ``train`` command SIGKILLed after its step-50 checkpoint, re-run, ends
   with exactly the weights of the uninterrupted run (when not, a third uninterrupted run tells
   apart a resume bug from non-deterministic CUDA kernels).

Exits 1 on any failed check. Without CUDA it prints one line and exits 0 (safe in CI), unless
``--device cpu``; ``--tiny`` shrinks everything (4 photos at 160 x 120, 8 steps, batch 2, crop 64)
so that a test can run the logic on a CPU::

    python benchmarks/gpu_smoke.py                         # on a GPU machine, <= 5 min
    python benchmarks/gpu_smoke.py --device cpu --tiny     # the logic, on a CPU, ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Sizes:
    photos: int = 16
    side: tuple[int, int] | None = None  # (width, height) to resize to; None: as stored
    steps: int = 100
    batch: int = 8
    crop: int = 320
    embed_images: int = 20
    contour_model: str = "pidinet"
    workers: int = 4


TINY = Sizes(photos=4, side=(160, 120), steps=8, batch=2, crop=64, embed_images=4, contour_model="pidinet-tiny",
             workers=0)
CONTOUR_WEIGHTS = {"pidinet": "table5_pidinet.pth", "pidinet-tiny": "table5_pidinet-tiny.pth"}


@dataclass
class Report:
    rows: list[tuple[str, str, bool]] = field(default_factory=list)

    def add(self, name: str, value: str, ok: bool = True) -> bool:
        self.rows.append((name, value, ok))
        print(f"  {'ok  ' if ok else 'FAIL'}  {name}: {value}", flush=True)
        return ok

    def table(self) -> str:
        width = max(len(n) for n, _, _ in self.rows)
        lines = [f"{'check':<{width}}  result  value", "-" * (width + 40)]
        lines += [f"{n:<{width}}  {'ok' if ok else 'FAIL':<6}  {v}" for n, v, ok in self.rows]
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        return all(ok for _, _, ok in self.rows)


def cli() -> str:
    """The installed console script next to this interpreter."""
    exe = Path(sys.executable).parent / "segsort-unsup"
    return str(exe) if exe.exists() else shutil.which("segsort-unsup") or "segsort-unsup"


def call(args: list, *, log: Path, env: dict | None = None) -> float:
    """Run a command to completion (output to ``log``); its wall time. Raises on a non-zero exit."""
    start = time.perf_counter()
    with open(log, "ab") as out:
        rc = subprocess.run([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        raise RuntimeError(f"{' '.join(map(str, args[:3]))} ... exited {rc}; see {log}")
    return time.perf_counter() - start


# -- preparation ----------------------------------------------------------------------------------
def prepare(shared: Path, work: Path, sizes: Sizes, device: str) -> dict[str, Path]:
    """Photos, a segments store and a 20-photo embed list under ``work``."""
    import cv2

    camvid = shared / "data" / "camvid"
    photos = work / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for src in sorted((camvid / "train").glob("*.png"))[: sizes.photos]:
        img = cv2.imread(str(src), cv2.IMREAD_COLOR)
        if sizes.side:
            img = cv2.resize(img, sizes.side, interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(photos / src.name), img)
    val = sorted((camvid / "val").glob("*.png"))[: sizes.embed_images]
    if sizes.side:
        small = work / "val"
        small.mkdir(exist_ok=True)
        for src in val:
            img = cv2.resize(cv2.imread(str(src)), sizes.side, interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(small / src.name), img)
        val = sorted(small.glob("*.png"))
    listing = work / "embed_list.txt"
    listing.write_text("".join(f"{p}\n" for p in val))
    log = work / "prepare.log"
    weights = shared / "weights" / "pidinet" / CONTOUR_WEIGHTS[sizes.contour_model]
    call([cli(), "-q", "contours", photos, "-o", work / "contours", "--model", sizes.contour_model,
          "--weights", weights, "--device", device], log=log)
    call([cli(), "-q", "ucm", work / "contours", "-o", work / "segments", "--threshold", "0.3"], log=log)
    return {"photos": photos, "segments": work / "segments", "embed_list": listing,
            "hed": shared / "weights" / "hed-bsds500" / "hed_bsds500.weights.h5"}


def train_args(paths: dict[str, Path], out: Path, sizes: Sizes, device: str) -> list:
    return [cli(), "-q", "train", paths["segments"], "-o", out, "--mode", "full", "--images", paths["photos"],
            "--backbone-weights", paths["hed"], "--steps", sizes.steps, "--batch-size", sizes.batch,
            "--crop", sizes.crop, "--device", device, "--precision", "auto", "--workers", sizes.workers,
            "--checkpoint-every", sizes.steps // 2, "--log-every", max(1, sizes.steps // 10), "--seed", "0"]


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def weights_of(run: Path) -> dict:
    import torch

    return torch.load(run / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = weights_of(a), weights_of(b)
    if wa.keys() != wb.keys():
        return float("inf")
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)


# -- checks ---------------------------------------------------------------------------------------
def check_training(report: Report, paths, work: Path, sizes: Sizes, device: str, tiny: bool) -> Path:
    run = work / "train_a"
    wall = call(train_args(paths, run, sizes, device), log=work / "train_a.log")
    rows = logged(run)
    losses = [r["loss"] for r in rows]
    speeds = [r["img_per_s"] for r in rows[1:]] or [r["img_per_s"] for r in rows]
    precision = _model_provenance(run).get("precision", "?")
    report.add("train full: precision", precision, precision in ("bf16", "fp16", "fp32"))
    report.add("train full: img/s (median of logs)", f"{np.median(speeds):.1f} ({sizes.steps} steps in {wall:.1f} s "
               f"incl. start-up)")
    finite = bool(np.all(np.isfinite(losses)))
    falling = finite and np.mean(losses[-3:]) < np.mean(losses[:3])
    report.add("train full: loss falling", f"{losses[0]:.4f} -> {losses[-1]:.4f} ({len(losses)} logs)",
               finite and (falling or tiny))  # a tiny run is too short to promise a fall
    return run


def _model_provenance(run: Path) -> dict:
    import torch

    return torch.load(run / "model.pt", map_location="cpu", weights_only=True).get("provenance", {})


def check_embeddings(report: Report, run: Path, paths, device: str) -> None:
    from segsort_unsup.embed.stage import embed_image
    from segsort_unsup.embed.model import load_model
    from segsort_unsup.io.images import read_image

    model_cpu, provenance = load_model(run / "model.pt")
    model_dev = load_model(run / "model.pt")[0].to(device)
    photos = sorted(paths["photos"].glob("*.png"))[:4]
    worst = {"fp32": 1.0, provenance.get("precision", "fp32"): 1.0}
    diff = 0.0
    for p in photos:
        rgb = read_image(p)
        ref = embed_image(model_cpu, rgb, precision="fp32", device="cpu")
        for precision in worst:
            got = embed_image(model_dev, rgb, precision=precision, device=device).cpu()
            worst[precision] = min(worst[precision], float((got * ref).sum(0).min()))
            if precision == "fp32":
                diff = max(diff, float((got - ref).abs().max()))
    report.add("embeddings CPU vs device (fp32): max |diff|, min cosine", f"{diff:.2e}, {worst['fp32']:.6f}",
               worst["fp32"] >= 0.999)
    for precision, cos in worst.items():
        if precision != "fp32":
            report.add(f"embeddings CPU fp32 vs device {precision}: min cosine", f"{cos:.4f}", cos >= 0.9)


def check_embed(report: Report, run: Path, paths, work: Path, sizes: Sizes, device: str) -> None:
    from segsort_unsup.io.store import StoreReader

    out = work / "prototypes"
    wall = call([cli(), "-q", "embed", run, paths["embed_list"], "-o", out, "--device", device],
                log=work / "embed.log")
    reader = StoreReader(out, kind="prototypes")
    keys = reader.keys()
    finite = all(np.isfinite(reader[k].arrays["prototypes"]).all() for k in keys)
    report.add(f"embed {sizes.embed_images} CamVid val photos: img/s (incl. start-up)",
               f"{len(keys) / wall:.2f} ({wall:.1f} s)", len(keys) == sizes.embed_images and finite)


def check_torchrun(report: Report, run_a: Path, paths, work: Path, sizes: Sizes, device: str) -> None:
    run = work / "train_ddp"
    args = train_args(paths, run, sizes, device)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    call(torchrun + args, log=work / "train_ddp.log")
    a, b = logged(run_a), logged(run)
    steps_match = [r["step"] for r in a] == [r["step"] for r in b]
    rel = [abs(x["loss"] - y["loss"]) / max(abs(x["loss"]), 1e-12) for x, y in zip(a, b)]
    ok = steps_match and bool(rel) and rel[0] <= 1e-3 and max(rel) <= 2e-2
    report.add("torchrun 1 process: losses vs plain run (max rel. diff)",
               f"first {rel[0]:.1e}, max {max(rel):.1e}" if rel else "no logs", ok)
    out = work / "ddp_probe.json"
    call(torchrun + [__file__, "--ddp-probe", run_a / "model.pt", "--probe-out", out, "--device", device],
         log=work / "ddp_probe.log")
    probe = json.loads(out.read_text())
    report.add(f"DDP step on a {probe['backend']} group: loss, grad rel. diff vs no DDP",
               f"{probe['loss_diff']:.1e}, {probe['grad_rel_diff']:.1e}",
               probe["loss_diff"] <= 1e-5 and probe["grad_rel_diff"] <= 1e-4)


def check_resume(report: Report, run_a: Path, paths, work: Path, sizes: Sizes, device: str, tiny: bool) -> None:
    run = work / "train_killed"
    args = [str(a) for a in train_args(paths, run, sizes, device)]
    target = run / "checkpoints" / f"step-{sizes.steps // 2:07d}.pt"
    with open(work / "train_killed.log", "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None and not target.exists():
            time.sleep(0.01)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    call(args, log=work / "train_killed.log")
    diff = max_weight_difference(run_a, run)
    report.add("kill at the mid checkpoint + resume: max |weight diff| vs uninterrupted",
               f"{diff:.3g}" + ("" if killed else " (the run ended before the kill)"),
               diff == 0.0 and (killed or tiny))
    if diff != 0.0:
        control = work / "train_control"
        call(train_args(paths, control, sizes, device), log=work / "train_control.log")
        again = max_weight_difference(run_a, control)
        report.add("  two uninterrupted runs: max |weight diff| (non-zero: CUDA kernels not deterministic)",
                   f"{again:.3g}", again == 0.0)


# -- the DDP probe (runs under torchrun) ----------------------------------------------------------
def ddp_probe(model_file: Path, out: Path, device: str) -> None:
    """One training step of ``model_file``'s network with and without DDP on the same batch."""
    import torch
    import torch.distributed as dist

    from segsort_unsup.embed.losses import segments_to_grid, unsupervised_segsort_loss
    from segsort_unsup.embed.model import load_model
    from segsort_unsup.embed.sorting import grid_labels

    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(2, 3, 128, 128, generator=g) * 255).to(dev)
        seg = grid_labels(128, 128, grid=(4, 4)).expand(2, 128, 128).to(dev)

        def step(wrap: bool):
            model = load_model(model_file)[0].to(dev).train()
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda"
                                                            else None) if wrap else model
            emb = net(x).float()
            loss = unsupervised_segsort_loss(emb, segments_to_grid(seg, emb.shape[-2:]))
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            return float(loss), grads

        with torch.backends.cudnn.flags(deterministic=True, benchmark=False):
            loss_plain, grad_plain = step(False)
            loss_ddp, grad_ddp = step(True)
        rel = float((grad_ddp - grad_plain).norm() / grad_plain.norm().clamp_min(1e-30))
        if dist.get_rank() == 0:
            out.write_text(json.dumps({"backend": backend, "loss_diff": abs(loss_ddp - loss_plain),
                                       "grad_rel_diff": rel}))
    finally:
        dist.destroy_process_group()


# -- main -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="4 small photos, 8 steps (checks the logic on a CPU)")
    parser.add_argument("--shared", type=Path, default=None, help="shared data folder (default $SEGSORT_SHARED)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--ddp-probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--probe-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ddp_probe:
        ddp_probe(args.ddp_probe, args.probe_out, args.device)
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here; skipped (use --device cpu --tiny to check the logic)")
        return 0
    # absolute: the embed list written under the work folder names photos in it, and a list's
    # relative entries are read relative to the list file
    shared = (args.shared or Path(os.environ.get("SEGSORT_SHARED", REPO.parent / "shared"))).resolve()
    if not (shared / "data" / "camvid" / "train").is_dir():
        print(f"gpu_smoke: no CamVid under {shared}/data; pass --shared", file=sys.stderr)
        return 2
    sizes = TINY if args.tiny else Sizes()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "CPU"
    print(f"gpu_smoke on {name}, torch {torch.__version__}, work folder {work}", flush=True)
    report, start = Report(), time.perf_counter()
    try:
        paths = prepare(shared, work, sizes, args.device)
        report.add("prepare: photos -> contours -> ucm", f"{sizes.photos} photos, {time.perf_counter() - start:.1f} s")
        run_a = check_training(report, paths, work, sizes, args.device, args.tiny)
        check_embeddings(report, run_a, paths, args.device)
        check_embed(report, run_a, paths, work, sizes, args.device)
        check_torchrun(report, run_a, paths, work, sizes, args.device)
        check_resume(report, run_a, paths, work, sizes, args.device, args.tiny)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row and exit 1
        traceback.print_exc()
        report.add("unexpected error", f"{type(exc).__name__}: {exc}", False)
    report.add("total wall time", f"{time.perf_counter() - start:.0f} s")
    print("\n" + report.table())
    if args.workdir is None and report.ok:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
