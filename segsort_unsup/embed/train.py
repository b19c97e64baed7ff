"""The ``train`` stage: a SegSort embedding trained on the segments of a segments store.

``segsort-unsup train SEGMENTS -o RUN_DIR`` writes::

    RUN_DIR/config.toml        the resolved settings
    RUN_DIR/metrics.jsonl      step, loss, lr, img/s (every --log-every steps)
    RUN_DIR/checkpoints/       step-0000100.pt ... (the last --keep; atomic; weights_only)
    RUN_DIR/features/          cached mode: the features store (frozen-trunk features per image, scale, flip)
    RUN_DIR/model.pt           the final model (:func:`~segsort_unsup.embed.model.save_model`)

Modes
    ``full``: the network trains end to end on augmented photo crops (random scale, crop, flip;
    default on CUDA). ``cached``: the trunk is frozen; its stride-8 features are computed once per
    image, scale and flip into a ``features`` store (resumable, like every store), and only the
    head trains, on random crops of those maps (default on CPU; one to two orders of magnitude
    cheaper per step).

Loss
    Unsupervised (the released recipe): :func:`unsupervised_segsort_loss` over the batch's
    segments (the ucm cut), kappa 10. With ``labels_dir``: :func:`supervised_segsort_loss` with a
    :class:`PrototypeMemory` of 2 batches, the like-for-like supervised counterpart.
    SGD (momentum 0.9, weight decay 5e-4 on weights, fused), poly lr (power 0.9), head at 10x.

Resuming
    Re-running the same command continues from the newest checkpoint: model, optimiser, step
    (the lr schedule and the data stream are functions of the step, see :mod:`.data`), the
    python/numpy/torch RNG states and the prototype memory; a killed run ends with the same
    weights as an uninterrupted one. Checkpoints are loaded with ``weights_only=True``; one made
    with other settings is refused, naming the differing keys (``overwrite`` starts over).

Distributed
    Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank takes its slice of every global batch
    (``batch_size`` is global). The ranks' embeddings are gathered so that every rank computes the
    loss of the whole global batch (the cross-image prototypes of the one-process run); each rank
    back-propagates through its own slice and DDP sums the gradients. A two-process run thus
    follows the one-process run with the same global batch, up to float rounding. Only rank 0
    writes files.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import StageConfig, changed_keys, config_hash, run_only, setting
from ..errors import InputError, WeightsError
from ..io.atomic import atomic_path, atomic_write_text, sha256_file
from ..io.store import StoreReader
from ..log import get_logger, progress
from ..parallel import Executor
from ..stages import Stage, StageRun, StageSummary

log = get_logger("train")

MODES = ("auto", "full", "cached")
CHECKPOINT_FORMAT = "segsort-unsup-train-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class TrainConfig(StageConfig):
    """Settings of the train stage (see the module doc). ``batch_size`` is the global batch."""

    stage = "train"

    mode: str = setting("auto", help="full, cached, or auto (full on CUDA, cached on CPU)")
    backbone: str = "vgg16-hed"
    backbone_weights: str | None = None
    feature_layer: str = "conv4_3"
    freeze_blocks: int = 0
    embedding_dim: int = 32
    head: str = "conv3"
    hidden: int = 256
    kappa: float = 10.0
    lr: float = 2e-3
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_power: float = 0.9
    steps: int = 1000
    batch_size: int = 8
    crop: int = 320
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    feature_scales: tuple[float, ...] = (0.75, 1.0, 1.25)
    cut: float | None = None
    labels_dir: str | None = None
    ignore_label: int = 255
    memory_banks: int = 2
    precision: str = "auto"
    seed: int = 0
    images: str | None = run_only(None, help="folder holding the photos when they moved")
    device: str = run_only("auto")
    workers: int = run_only(2, help="data-loading processes (full mode)")
    threads: int | None = run_only(None, help="torch CPU threads (default: all cores)")
    checkpoint_every: int = run_only(100)
    keep: int = run_only(3)
    log_every: int = run_only(10)
    features_dir: str | None = run_only(None, help="features store (cached mode; default RUN_DIR/features)")

    def validate(self) -> None:
        if self.mode not in MODES:
            raise self.bad_value("mode", f"choose one of {', '.join(MODES)}")
        from .backbones import check_feature_layer

        try:
            check_feature_layer(self.backbone, self.feature_layer)
        except InputError as exc:
            raise self.bad_value("feature_layer", str(exc)) from None
        if self.steps < 0:
            raise self.bad_value("steps", "must be >= 0 (0: the untrained initialisation)")
        for key in ("batch_size", "embedding_dim", "hidden", "checkpoint_every", "keep", "log_every",
                    "memory_banks"):
            if getattr(self, key) < 1:
                raise self.bad_value(key, "must be >= 1")
        if self.crop < 8:
            raise self.bad_value("crop", "must be >= 8 pixels (one embedding cell)")
        if not 0 < self.scale_min <= self.scale_max:
            raise self.bad_value("scale_min", "need 0 < scale_min <= scale_max")
        if not self.feature_scales or any(s <= 0 for s in self.feature_scales):
            raise self.bad_value("feature_scales", "give one or more positive scales")
        for key in ("lr", "kappa", "head_lr_mult"):
            if not getattr(self, key) > 0:
                raise self.bad_value(key, "must be > 0")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise self.bad_value("precision", "choose auto, fp32, bf16 or fp16")
        if self.workers < 0:
            raise self.bad_value("workers", "must be >= 0")


# -- helpers ---------------------------------------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def config_toml(config: TrainConfig, provenance: dict[str, Any]) -> str:
    """``config.toml`` of a run: the resolved settings (a pipeline ``[train]`` section) + provenance."""
    lines = ["# written by segsort-unsup train: the resolved settings of this run", "[train]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in config.to_dict().items() if v is not None]
    lines += ["", "[provenance]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in provenance.items() if v is not None]
    return "\n".join(lines) + "\n"


def poly_lr(base: float, step: int, steps: int, power: float) -> float:
    """The poly schedule: ``base * (1 - step / steps) ** power``."""
    return base * (1.0 - min(step, steps) / steps) ** power


def _rng_state() -> dict[str, Any]:
    import torch

    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
             "python": {"version": int(py_state[0]), "state": list(py_state[1]),
                        "gauss": py_state[2] if py_state[2] is None else float(py_state[2])}}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """Checkpoints of a run folder, oldest first."""
    folder = run_dir / "checkpoints"
    return sorted(folder.glob("step-*.pt")) if folder.is_dir() else []


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's payload (``weights_only=True``: never unpickled); one-line errors naming it."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, refused pickle...
        raise WeightsError(path, f"not a readable training checkpoint ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); delete it to resume "
                                 "from an older one, or pass --overwrite") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(path, "not a segsort-unsup training checkpoint; delete it or pass --overwrite")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise WeightsError(path, f"checkpoint version {payload.get('version')} is not supported "
                                 f"(this version reads {CHECKPOINT_VERSION})")
    return payload


class _GatherBatch:
    """All ranks' tensors concatenated along dim 0; the gradient flows back to the own slice."""

    @staticmethod
    def apply(tensor, rank: int, world: int):
        import torch
        import torch.distributed as dist

        class _Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                parts = [torch.empty_like(x) for _ in range(world)]
                dist.all_gather(parts, x.contiguous())
                ctx.n = x.shape[0]
                return torch.cat(parts)

            @staticmethod
            def backward(ctx, grad):
                # every rank computes the same global loss: its own slice of the gradient is exact
                return grad[rank * ctx.n:(rank + 1) * ctx.n]

        return _Fn.apply(tensor)


def _gather_plain(tensor, world: int):
    import torch
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


# -- the stage -------------------------------------------------------------------------------------
def segments_identity(segments: Path) -> tuple[str, dict[str, Any]]:
    """The segments store's identity hash and config (errors name the folder)."""
    with StoreReader(segments, kind="segments") as reader:
        if not len(reader):
            raise InputError(f"{segments}: the segments store holds no items; run `segsort-unsup ucm` first")
        return reader.config_hash, reader.config


def resolve(config: TrainConfig) -> tuple[TrainConfig, Any, str]:
    """``auto`` settings made concrete: (config with mode and precision resolved, device, precision)."""
    from ..runtime import resolve_device, resolve_precision

    device = resolve_device(config.device)
    mode = config.mode if config.mode != "auto" else ("full" if device.type == "cuda" else "cached")
    precision = resolve_precision(config.precision, device)
    return config.replace(mode=mode, precision=precision), device, precision


def run(config: TrainConfig, inputs: str | os.PathLike, output: str | os.PathLike, *,
        executor: Executor | None = None, overwrite: bool | str = False) -> StageSummary:
    """Train on the segments store ``inputs`` into the run folder ``output`` (resumes; see module doc)."""
    import torch

    from ..runtime import dist_info

    rank, world, local_rank = dist_info()
    if config.threads:
        torch.set_num_threads(config.threads)
    config, device, precision = resolve(config)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if config.batch_size % world:
        raise InputError(f"batch_size {config.batch_size} must be a multiple of the number of processes ({world})")
    started_dist = False
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started_dist = True
    try:
        return _run(config, Path(inputs), Path(output), device=device, precision=precision, rank=rank,
                    world=world, overwrite=overwrite)
    finally:
        if started_dist:
            torch.distributed.destroy_process_group()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _run(config: TrainConfig, segments: Path, out: Path, *, device, precision: str, rank: int, world: int,
         overwrite: bool | str) -> StageSummary:
    import torch

    from ..embed.losses import PrototypeMemory, segments_to_grid, supervised_segsort_loss, unsupervised_segsort_loss
    from ..embed.model import build_model, save_model
    from ..runtime import autocast
    from . import data as D

    main = rank == 0
    seg_hash, seg_config = segments_identity(segments)
    with StoreReader(segments, kind="segments") as reader:
        grouping = D.grouping_names(reader, config.cut)
    provenance = {"segments_identity": seg_hash,
                  "labels_dir": os.path.abspath(config.labels_dir) if config.labels_dir else "",
                  "backbone_weights_sha256": sha256_file(config.backbone_weights) if config.backbone_weights else ""}
    identity = config.identity(**provenance)
    ident_hash = config_hash(identity)
    summary = StageSummary("train", total=config.steps, output=str(out), identity_hash=ident_hash)

    # -- run folder, resume point ----------------------------------------------------------------
    if overwrite == "changed":  # pipelines: start over only when the settings or the input changed
        previous = checkpoint_paths(out)
        overwrite = bool(previous) and bool(changed_keys(json.loads(load_checkpoint(previous[-1])["identity"]),
                                                         identity))
        if overwrite:
            log.info("train: settings or input changed; %s starts over", out)
    if overwrite and main and out.exists():
        for name in ("checkpoints", "metrics.jsonl", "model.pt", "config.toml"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    _barrier(world)
    state = None
    ckpts = checkpoint_paths(out)
    if ckpts:
        state = load_checkpoint(ckpts[-1])
        old = json.loads(state["identity"])
        diff = changed_keys(old, identity)
        if diff:
            raise InputError(f"{ckpts[-1]}: this run was made with other settings ({', '.join(diff)}); "
                             "pass --overwrite to start over, or use another -o folder")
    start = int(state["step"]) if state else 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.toml", config_toml(config, {"identity_hash": ident_hash, **provenance}))
        _trim_metrics(out / "metrics.jsonl", start)

    # -- data ------------------------------------------------------------------------------------
    samples, dropped = D.list_samples(segments, images=config.images, labels=config.labels_dir)
    if main:
        for key, reason in dropped:
            log.warning("train: %s: %s: skipped", key, reason)
    summary.failed.extend(dropped)

    # -- model -----------------------------------------------------------------------------------
    torch.manual_seed(config.seed)
    model_cfg = {"backbone": config.backbone, "feature_layer": config.feature_layer,
                 "freeze_blocks": config.freeze_blocks, "embedding_dim": config.embedding_dim,
                 "head": config.head, "hidden": config.hidden}
    model = build_model(model_cfg, backbone_weights=config.backbone_weights).to(device)
    if config.mode == "cached":
        model.freeze_backbone()
    fast_layout = precision != "fp32"
    if fast_layout:
        model = model.to(memory_format=torch.channels_last)
    cells = math.ceil(config.crop / D.STRIDE)

    if config.steps == 0:  # the untrained initialisation (a baseline): no data needed
        batches, n_images = iter(()), len(samples)
    elif config.mode == "cached":
        store = Path(config.features_dir) if config.features_dir else out / "features"
        if main:
            _feature_pass(config, model, samples, store, grouping=grouping, device=device, precision=precision,
                          seg_hash=seg_hash, provenance=provenance, summary=summary)
        _barrier(world)
        with StoreReader(store, kind="features") as reader:
            keys = set(reader.keys())
        variants: dict[str, list[str]] = {}
        wanted = {s.key for s in samples}
        for s in samples:
            for job in D.feature_jobs([s], config.feature_scales, flip=config.flip):
                if job.key in keys:
                    variants.setdefault(s.key, []).append(job.key)
        images = sorted(k for k in variants if k in wanted)
        if not images:
            raise InputError(f"{segments}: no image could be read (see the warnings above); nothing to train on")
        data = D.FeatureBatches(store, images, variants, seed=config.seed, batch=config.batch_size, rank=rank,
                                world=world, cells=cells, ignore_label=config.ignore_label,
                                labels={s.key: s.label for s in samples} if config.labels_dir else None)
        batches = (data[step] for step in range(start, config.steps))
        n_images = len(images)
    else:
        samples = _readable(samples, summary, main=main)
        if not samples:
            raise InputError(f"{segments}: no image could be read (see the warnings above); nothing to train on")
        dataset = D.PhotoBatches(samples, seed=config.seed, batch=config.batch_size, rank=rank, world=world,
                                 crop=config.crop, scale_range=(config.scale_min, config.scale_max),
                                 flip=config.flip, grouping=grouping, ignore_label=config.ignore_label)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=D.StepSampler(start, config.steps), num_workers=config.workers,
            worker_init_fn=D.seed_worker if config.workers else None, persistent_workers=config.workers > 0,
            pin_memory=device.type == "cuda")
        batches = iter(loader)
        n_images = len(samples)

    # -- optimiser -------------------------------------------------------------------------------
    groups = model.param_groups(config.lr, weight_decay=config.weight_decay, head_lr_mult=config.head_lr_mult)
    for g in groups:
        g["base_lr"] = g["lr"]
    fused = {"fused": True} if _fused_sgd_ok(device) else {}
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, **fused)
    memory = PrototypeMemory(config.memory_banks) if config.labels_dir else None
    trainable = model if config.mode == "full" else model.head
    ddp = None
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            trainable, device_ids=[device.index] if device.type == "cuda" else None)
    if state is not None:
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        if unexpected or (config.mode == "full" and missing):
            raise WeightsError(ckpts[-1], "checkpoint weights do not fit this model; pass --overwrite")
        optimizer.load_state_dict(state["optimizer"])
        if memory is not None and state.get("memory"):
            memory.load_state_dict(state["memory"])
        _set_rng_state(state["rng"])
        summary.skipped = start
        log.info("train: resuming %s at step %d of %d", out, start, config.steps) if main else None
    else:
        torch.manual_seed(config.seed + 1)
        np.random.seed(config.seed % 2**32)
        random.seed(config.seed)
    model.train()

    def save(step: int) -> None:
        if not main:
            return
        sd = model.state_dict()
        if config.mode == "cached":
            sd = {k: v for k, v in sd.items() if k.startswith("head.")}
        payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
                   "identity": json.dumps(identity, sort_keys=True), "model": {k: v.detach().cpu() for k, v in sd.items()},
                   "optimizer": optimizer.state_dict(), "rng": _rng_state(),
                   "memory": memory.state_dict() if memory is not None else {}}
        folder = out / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / f"step-{step:07d}.pt") as tmp:
            torch.save(payload, tmp)
        for old in checkpoint_paths(out)[:-config.keep]:
            old.unlink(missing_ok=True)

    # -- loop ------------------------------------------------------------------------------------
    step = start
    losses: list[float] = []
    metrics = open(out / "metrics.jsonl", "a", encoding="utf-8") if main else None  # noqa: SIM115
    bar = progress(total=config.steps - start, desc="train", unit="step", disable=None if main else True)
    tick, tick_step = time.perf_counter(), start
    try:
        for batch in batches:
            from ..parallel import check_stop

            check_stop()
            for g in optimizer.param_groups:
                g["lr"] = poly_lr(g["base_lr"], step, config.steps, config.lr_power)
            x = batch["features" if config.mode == "cached" else "image"].to(device, non_blocking=True)
            if fast_layout:
                x = x.contiguous(memory_format=torch.channels_last)
            seg = batch["segments"].to(device)
            with autocast(device, precision):
                if config.mode == "cached":
                    emb = (ddp or model.head)(x)
                else:
                    emb = (ddp or model)(x)
            emb = emb.float()
            grid = emb.shape[-2:]
            if config.mode == "full":
                target = batch["labels"] if config.labels_dir else seg
                target = segments_to_grid(target.to(device), grid)
            else:
                target = batch["labels"].to(device) if config.labels_dir else seg
            if world > 1:
                emb = _GatherBatch.apply(emb, rank, world)
                target = _gather_plain(target, world)
            if config.labels_dir:
                loss = supervised_segsort_loss(emb, target, kappa=config.kappa, ignore_label=config.ignore_label,
                                               memory=memory)
            else:
                loss = unsupervised_segsort_loss(emb, target, kappa=config.kappa)
            optimizer.zero_grad(set_to_none=True)
            (loss * world if world > 1 else loss).backward()  # DDP averages; the global gradient is the sum
            optimizer.step()
            step += 1
            value = float(loss.detach())
            losses.append(value)
            summary.done += 1
            lr_now = optimizer.param_groups[0]["lr"]
            bar.update(1)
            if main and (step % config.log_every == 0 or step == config.steps):
                now = time.perf_counter()
                ips = (step - tick_step) * config.batch_size / max(now - tick, 1e-9)
                tick, tick_step = now, step
                metrics.write(json.dumps({"step": step, "loss": value, "lr": lr_now, "img_per_s": round(ips, 3)})
                              + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr_now:.2e}", img_s=f"{ips:.1f}")
            if step % config.checkpoint_every == 0 and step < config.steps:
                save(step)
    except KeyboardInterrupt:
        if step > start:
            save(step)
            log.warning("train: stopped at step %d; checkpoint saved, re-run the same command to resume", step)
        raise
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if main:
        if step > start or not (out / "model.pt").exists():
            save(step)
        model.eval()
        sha = save_model(out / "model.pt", model, provenance={
            "train_identity_hash": ident_hash, "segments_identity": seg_hash, "mode": config.mode,
            "supervised": bool(config.labels_dir), "steps": config.steps, "seed": config.seed,
            "precision": precision, "images": n_images, "segments_threshold": seg_config.get("threshold"),
            "cut": config.cut if config.cut is not None else seg_config.get("threshold"),
            "train_config": json.dumps(config.result_fields(), sort_keys=True), **provenance})
        tail = losses[-5:] if losses else []
        summary.note = (f"{config.mode} mode, {n_images} images, step {step}/{config.steps}"
                        + (f", loss {np.mean(tail):.4f} (last {len(tail)})" if tail else "")
                        + f", model.pt sha256 {sha[:12]}")
    _barrier(world)
    summary.losses = losses  # type: ignore[attr-defined]  # for tests and benchmarks
    return summary


def _fused_sgd_ok(device) -> bool:
    import torch

    try:
        p = torch.zeros(1, device=device, requires_grad=True)
        p.grad = torch.zeros(1, device=device)
        torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True).step()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def _trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines after ``step`` (a resumed run rewrites them)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


def _readable(samples, summary: StageSummary, *, main: bool):
    """Samples whose photo decodes (one warning line per dropped image)."""
    from ..errors import SegsortError
    from ..io.images import read_image

    keep = []
    for s in progress(samples, desc="checking images", disable=None if main else True):
        try:
            read_image(s.image)
        except (SegsortError, OSError) as exc:
            if main:
                log.warning("train: %s: %s: skipped", s.key, exc)
            summary.failed.append((s.key, str(exc)))
            continue
        keep.append(s)
    return keep


def _feature_pass(config: TrainConfig, model, samples, store: Path, *, grouping, device, precision: str,
                  seg_hash: str, provenance: dict[str, Any], summary: StageSummary) -> None:
    """Compute the frozen trunk's features of every (image, scale, flip) into the features store."""
    import copy

    import torch

    from ..parallel import check_stop
    from . import data as D

    ident = {"stage": "features", "backbone": config.backbone, "feature_layer": config.feature_layer,
             "feature_scales": list(config.feature_scales), "flip": config.flip, "cut": config.cut,
             "precision": precision, "segments_identity": seg_hash,
             "backbone_weights_sha256": provenance["backbone_weights_sha256"]}
    jobs = D.feature_jobs(samples, config.feature_scales, flip=config.flip)
    trunk = None
    # small shards: each map costs about a second on a CPU, and a killed pass keeps all but the last few
    with StageRun("features", store, kind="features", identity=ident, overwrite="changed", shard_size=4) as run:
        todo = run.todo(jobs)
        if not todo:
            return
        trunk = copy.deepcopy(model).eval()
        if device.type == "cpu":
            trunk.backbone.fuse_for_cpu(torch.bfloat16 if precision == "bf16" else torch.float32)
        bad: set[str] = set()
        for job in progress(todo, desc="features", unit="map"):
            check_stop()
            if job.sample.key in bad:
                continue
            try:
                run.add(D.compute_features(trunk, job, grouping=grouping, device=device, precision=precision))
            except Exception as exc:  # noqa: BLE001 - one bad image never stops the run
                bad.add(job.sample.key)
                run.fail(job.key, exc)
    summary.failed.extend(run.summary.failed)


STAGE = Stage("train", TrainConfig, run, sources=("ucm",), output="train",
              input_paths=("labels_dir", "backbone_weights", "images"), optional=True,
              help="SegSort embedding training (model.pt)")
