"""The ``train`` stage: a SegSort embedding trained on the segments of a segments store.

``segsort-unsup train SEGMENTS -o RUN_DIR`` writes::

    RUN_DIR/config.toml        the resolved settings
    RUN_DIR/metrics.jsonl      step, loss, lr, img/s (every --log-every steps)
    RUN_DIR/checkpoints/       step-0000100.pt ... (the last --keep; atomic; weights_only)
    RUN_DIR/features/          cached mode: the features store (:mod:`.features`; or --features-dir)
    RUN_DIR/model.pt           the final model (:func:`~segsort_unsup.embed.model.save_model`)

Modes
    ``full``: the network trains end to end on augmented photo crops (random scale, crop, flip;
    default on CUDA). ``cached``: the trunk is frozen; its stride-8 features are computed once per
    image, scale and flip into a ``features`` store (the :mod:`.features` stage, run here when its
    store is missing or incomplete), and only the head trains, on random crops of those maps (default on CPU; one to two orders of magnitude
    cheaper per step).

Loss
    Unsupervised (the released recipe): :func:`unsupervised_segsort_loss` over the batch's
    segments (the ucm cut), kappa 10. With ``labels_dir``: :func:`supervised_segsort_loss` with a
    :class:`PrototypeMemory` of 2 batches, the like-for-like supervised counterpart; its pixel
    sorting starts, as released, from the whole image's 5x5 grid and (y/H, x/W), carried through
    each crop (:func:`.data.supervised_targets`).
    SGD (momentum 0.9, weight decay 5e-4 on weights, fused), poly lr (power 0.9), head at 10x.

Resuming
    Re-running the same command continues from the newest checkpoint: model, optimiser, step
    (the lr schedule and the data stream are functions of the step, see :mod:`.data`), the
    python/numpy/torch RNG states and the prototype memory; a killed run ends with the same
    weights as an uninterrupted one. Checkpoints are loaded with ``weights_only=True``; one made
    with other settings or from other segments is refused, naming the differing keys
    (``overwrite`` starts over). Ctrl-C / SIGTERM are honoured between steps (a checkpoint there,
    then KeyboardInterrupt); the run folder is locked for the whole run.

Distributed
    Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank takes its slice of every global batch
    (``batch_size`` is global). The ranks' embeddings are gathered so that every rank computes the
    loss of the whole global batch (the cross-image prototypes of the one-process run); each rank
    back-propagates through its own slice and DDP sums the gradients. A two-process run thus
    follows the one-process run with the same global batch, up to float rounding. Only rank 0
    writes files.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from ..config import PRECISIONS, SEED_MAX, StageConfig, changed_keys, config_hash, run_only, setting
from ..errors import InputError, SegsortError, StoreError, WeightsError
from ..io.atomic import atomic_write_bytes, atomic_write_text, remove_stale_temps, sha256_file
from ..io.store import StoreLock, StoreReader
from ..io.sources import store_content
from ..log import get_logger, progress
from ..parallel import Executor, check_stop, request_stop
from ..stages import Stage, StageRun, StageSummary
from .features import backbone_names

log = get_logger("train")

MODES = ("auto", "full", "cached")
LOSS_WEIGHTINGS = ("pixel", "segment")  # embed.losses.WEIGHTINGS, named here without importing torch
CHECKPOINT_FORMAT = "segsort-unsup-train-checkpoint"
CHECKPOINT_VERSION = 1
# Under torchrun rank 0 runs the whole feature pass while the others wait in a barrier: the process
# group's timeout is set explicitly, well above the defaults (10 min gloo, 30 min nccl).
DIST_TIMEOUT = timedelta(hours=4)
TEST_SIGTERM_ENV = "SEGSORT_TEST_SIGTERM_AFTER_STEP"
LONG_RUN_SECONDS = 120.0  # a run estimated longer than this says so once, with how to shorten it
PACE_STEPS = 3  # steps timed (after the first, which warms up) for that estimate


class TrainingDiverged(SegsortError):
    """The loss (or the weights) became non-finite: training stops, the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig(StageConfig):
    """Settings of the train stage (see the module doc). ``batch_size`` is the global batch."""

    stage = "train"

    mode: str = setting("auto", help="full: the whole network on photo crops; cached: the trunk frozen, its "
                        "features cached once, only the head (or the last --train-blocks blocks) trains "
                        "(CPU-practical); auto: full on CUDA, cached on CPU.", choices=MODES)
    backbone: str = setting("vgg16-hed", help="Trunk from the backbone registry (README: Backbones).",
                            choices=backbone_names)
    backbone_weights: str | None = setting(None, help="Local weights for the backbone (e.g. a torchvision "
                                                      "vgg16/resnet50 or dino checkpoint).")
    feature_layer: str = setting("conv4_3", help="Trunk layer feeding the head (conv4_3 or conv5_3 for the VGG16 "
                                                 "trunks; other backbones: see the backbone registry).")
    freeze_blocks: int = setting(0, help="Trunk blocks kept frozen in full mode.", low=0)
    train_blocks: int | None = setting(None, help="Cached mode: the last N trunk blocks train with the head, on "
                                                  "maps cached at the input of the first (1 at conv4_3: conv4 from "
                                                  "pool3's maps). Default: the head only.", low=0)
    embedding_dim: int = setting(32, help="Embedding channels.", low=1)
    head: str = setting("conv3", help="Embedding head: three convolutions or one.", choices=("conv3", "conv1"))
    hidden: int = setting(256, help="Hidden channels of the conv3 head.", low=1)
    kappa: float = setting(10.0, help="Concentration of the von Mises-Fisher loss (1 / temperature).", low=0)
    loss_weighting: str = setting("pixel", help="Unsupervised loss: averaged over pixels (as released) or over "
                                                "segments (each segment's mean: small ones weigh as much as large "
                                                "ones).", choices=LOSS_WEIGHTINGS, off="pixel")
    lr: float = setting(2e-3, help="Trunk learning rate (the head trains at --head-lr-mult times it).", low=0)
    head_lr_mult: float = setting(10.0, help="The head's learning rate, as a multiple of --lr.", low=0)
    momentum: float = setting(0.9, help="SGD momentum.", low=0)
    weight_decay: float = setting(5e-4, help="SGD weight decay.", low=0)
    lr_power: float = setting(0.9, help="Poly schedule: lr x (1 - step / steps) ** power.", low=0)
    steps: int = setting(1000, help="Optimiser steps; 0 writes the untrained initialisation (trunk + seeded "
                                    "random head) as a baseline.", low=0)
    batch_size: int = setting(8, help="Global batch (split over torchrun processes).", low=1)
    crop: int = setting(320, help="Crop side in pixels.", low=8)
    scale_min: float = setting(0.5, help="Smallest random rescale of a photo before cropping (full mode).")
    scale_max: float = setting(2.0, help="Largest random rescale of a photo before cropping (full mode).")
    flip: bool = setting(True, help="Random horizontal flips (--no-flip: none).")
    feature_scales: tuple[float, ...] = setting((0.75, 1.0, 1.25), help="Cached mode: image scales whose "
                                                "features are cached.", low=0.05)
    cut: float | None = setting(None, help="Stored ucm level to use as the grouping (default: the store's "
                                           "threshold; others must be among its --levels).")
    labels_dir: str | tuple[str, ...] | None = setting(
        None, help="Class-label PNG folder (or list file): train the supervised counterpart instead; repeat for "
                   "labels split over folders.", flags=("--supervised", "--labels-dir"), multiple=True, metavar="DIR")
    ignore_label: int = setting(255, help="Label of unlabelled pixels.")
    memory_banks: int = setting(2, help="Supervised mode: past batches whose prototypes (and classes) the "
                                        "loss also compares with.", low=1)
    precision: str = setting("auto", help="auto: bf16 on CPUs with AVX512-BF16/AMX and on CUDA GPUs that have it, "
                                          "fp16 (with loss scaling) on older GPUs, else fp32.", choices=PRECISIONS)
    seed: int = setting(0, help="Seed of every random choice (same seed, same result).", low=0, high=SEED_MAX)
    images: str | None = run_only(None, help="Folder of the photos when they moved (looked up as <DIR>/<key>.<ext> "
                                             "or by basename).")
    device: str = run_only("auto", help="auto, cpu, cuda or cuda:N.")
    workers: int = run_only(2, help="Data-loading processes (full mode).", low=0)
    threads: int | None = run_only(None, help="Torch CPU threads (default: all cores).", low=1)
    checkpoint_every: int = run_only(100, help="Steps between checkpoints.", low=1)
    keep: int = run_only(3, help="Checkpoints kept.", low=1)
    log_every: int = run_only(10, help="Steps between lines of metrics.jsonl.", low=1)
    features_dir: str | None = run_only(None, help="Cached mode: features store (default RUN_DIR/features; "
                                                   "reusable by runs with the same trunk).")

    def validate(self) -> None:
        if self.mode not in MODES:
            raise self.bad_value("mode", f"choose one of {', '.join(MODES)}")
        if self.labels_dir == ():
            raise self.bad_value("labels_dir", "give one or more label folders, or leave it out (unsupervised)")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise self.bad_value("loss_weighting", f"choose one of {', '.join(LOSS_WEIGHTINGS)}")
        if self.loss_weighting != "pixel" and self.labels_dir:
            raise self.bad_value("loss_weighting", "weights the unsupervised loss only; leave it out with labels_dir")
        from ..embed.backbones import check_feature_layer

        try:
            check_feature_layer(self.backbone, self.feature_layer)
        except InputError as exc:
            raise self.bad_value("feature_layer", str(exc)) from None
        if self.steps < 0:
            raise self.bad_value("steps", "must be >= 0 (0: the untrained initialisation)")
        if self.train_blocks is not None and (self.train_blocks < 0 or self.mode == "full"):
            raise self.bad_value("train_blocks", "must be >= 0, with mode cached (mode full trains every "
                                                 "block not frozen by freeze_blocks)")
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
        for key, value in self.to_dict().items():  # inf / nan learning rates would train NaN weights
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                raise self.bad_value(key, f"{value} is not a finite number")
        for key in ("lr", "kappa", "head_lr_mult"):
            if not getattr(self, key) > 0:
                raise self.bad_value(key, "must be > 0")
        if self.precision not in PRECISIONS:
            raise self.bad_value("precision", f"choose one of {', '.join(PRECISIONS)}")
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
    if "cuda" in state and torch.cuda.is_available():  # a machine with fewer GPUs restores what it has
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


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
def segments_identity(segments: Path) -> tuple[str, dict[str, Any], str]:
    """The segments store's identity hash, its config and the digest of its items (errors name the folder)."""
    with StoreReader(segments, kind="segments") as reader:
        if not len(reader):
            raise InputError(f"{segments}: the segments store holds no items; run `segsort-unsup ucm` first")
        return reader.config_hash, reader.config, store_content(reader)


def resolve(config: TrainConfig) -> tuple[TrainConfig, Any, str]:
    """``auto`` settings made concrete: (config with mode and precision resolved, device, precision)."""
    from ..runtime import resolve_device, resolve_precision

    device = resolve_device(config.device)
    mode = config.mode if config.mode != "auto" else ("full" if device.type == "cuda" else "cached")
    precision = resolve_precision(config.precision, device)
    return config.replace(mode=mode, precision=precision), device, precision


@dataclass
class _Training:
    """One training run's state: made by :func:`_setup`, used by the step, the checkpoints and the finish."""

    config: TrainConfig
    segments: Path
    out: Path
    device: Any
    precision: str
    rank: int
    world: int
    identity: dict[str, Any]
    provenance: dict[str, Any]
    seg_config: dict[str, Any]
    summary: StageSummary
    start: int = 0  # the step this run starts at (the resumed checkpoint's)
    model: Any = None
    trainable: Any = None  # what a step runs: the model (full) or its head (cached), DDP-wrapped under torchrun
    cache_ratio: int = 1  # cached cells per output cell (cached mode: 2 for pool2 maps)
    optimizer: Any = None
    scaler: Any = None  # fp16's loss scaler (a pass-through otherwise)
    memory: Any = None  # the supervised loss's prototype memory
    n_images: int = 0
    recent_losses: list[float] = field(default_factory=list)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def ident_hash(self) -> str:
        return config_hash(self.identity)


def run(config: TrainConfig, inputs: str | os.PathLike, output: str | os.PathLike, *,
        executor: Executor | None = None, overwrite: bool | str = False) -> StageSummary:
    """Train on the segments store ``inputs`` into the run folder ``output`` (resumes; see module doc)."""
    import torch

    from ..runtime import deterministic_cuda, dist_info

    rank, world, local_rank = dist_info()
    if config.threads:
        torch.set_num_threads(config.threads)
    config, device, precision = resolve(config)
    if config.batch_size % world:
        raise InputError(f"batch_size {config.batch_size} must be a multiple of the number of processes ({world})")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    deterministic_cuda(device)
    out = Path(output)
    with _process_group(world, device), _run_folder_lock(out, main=rank == 0):
        t = _setup(config, Path(inputs), out, device=device, precision=precision, rank=rank, world=world)
        state = _resume_point(t, overwrite)
        if _already_complete(t):
            return t.summary
        _write_run_files(t)
        _build_model(t)
        batches = _batches(t)
        _build_optimizer(t)
        _restore(t, state)
        step = _train_loop(t, batches)
        _finish(t, step)
    return t.summary


# -- setup -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _process_group(world: int, device) -> Iterator[None]:
    """Under torchrun: the process group for the run (nccl on CUDA, gloo on CPU), with an explicit timeout."""
    import torch.distributed as dist

    if world == 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=DIST_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _run_folder_lock(out: Path, *, main: bool) -> Iterator[None]:
    """Hold the run folder's lock for the whole run (rank 0 writes; other ranks only read)."""
    if not main:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    lock = StoreLock(out)
    try:
        lock.acquire()
    except StoreError:
        raise StoreError(out, "another segsort-unsup train is using this run folder; wait for it to end "
                              "or choose another -o folder") from None
    try:
        for folder in (out, out / "checkpoints"):  # left by a run killed while writing
            if folder.is_dir():
                remove_stale_temps(folder)
        yield
    finally:
        lock.release()


def _absolute(paths: str | tuple[str, ...] | None) -> str | list[str]:
    """Label sources as absolute paths for the identity (one folder: a string, as before lists)."""
    if not paths:
        return ""
    return os.path.abspath(paths) if isinstance(paths, str) else [os.path.abspath(p) for p in paths]


def _setup(config: TrainConfig, segments: Path, out: Path, *, device, precision: str, rank: int,
           world: int) -> _Training:
    """The run's identity (settings + what it is computed from) and its summary."""
    seg_hash, seg_config, contents = segments_identity(segments)
    provenance = {"segments_identity": seg_hash, "segments_contents": contents,
                  "labels_dir": _absolute(config.labels_dir),
                  "backbone_weights_sha256": sha256_file(config.backbone_weights) if config.backbone_weights else ""}
    identity = config.identity(**provenance)
    summary = StageSummary("train", total=config.steps, output=str(out), identity_hash=config_hash(identity))
    return _Training(config, segments, out, device, precision, rank, world, identity, provenance, seg_config,
                     summary)


def _resume_point(t: _Training, overwrite: bool | str) -> dict[str, Any] | None:
    """The newest checkpoint's payload (None: start afresh), after ``overwrite`` cleared the folder."""
    from ..runtime import barrier

    if overwrite == "changed":  # pipelines: start over only when the settings or the input changed
        previous = checkpoint_paths(t.out)
        overwrite = bool(previous) and bool(changed_keys(json.loads(load_checkpoint(previous[-1])["identity"]),
                                                         t.identity))
        if overwrite:
            log.info("train: settings or input changed; %s starts over", t.out)
    if overwrite and t.main:
        _clear_run_folder(t.out)
    barrier()
    ckpts = checkpoint_paths(t.out)
    if not ckpts:
        return None
    state = load_checkpoint(ckpts[-1])
    diff = changed_keys(json.loads(state["identity"]), t.identity)
    if diff:
        what = ", ".join(_CHANGES.get(key, key) for key in diff)
        raise InputError(f"{ckpts[-1]}: this run was made from other settings or input ({what}); "
                         "pass --overwrite to start over, or use another -o folder")
    t.start = int(state["step"])
    return state


_CHANGES = {"segments_contents": "segments_contents: items of the segments store added, removed or recomputed",
            "segments_identity": "segments_identity: the segments store's settings"}


def _clear_run_folder(out: Path) -> None:
    """Remove what train writes in a run folder (nothing else: a features store there is kept)."""
    for name in ("checkpoints", "metrics.jsonl", "model.pt", "config.toml"):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _already_complete(t: _Training) -> bool:
    """True when the run folder holds this run's final checkpoint and model (nothing to do)."""
    if t.start < t.config.steps or not (t.out / "model.pt").exists():
        return False
    t.summary.skipped = t.config.steps
    return True


def _write_run_files(t: _Training) -> None:
    """config.toml, and metrics.jsonl cut back to the resume point (rank 0)."""
    if t.main:
        t.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(t.out / "config.toml", config_toml(t.config, {"identity_hash": t.ident_hash,
                                                                         **t.provenance}))
        _trim_metrics(t.out / "metrics.jsonl", t.start)


def _build_model(t: _Training) -> None:
    """The network, seeded by ``seed`` (cached mode: the whole trunk frozen)."""
    import torch

    from ..embed.model import build_model
    from ..runtime import seed_everything
    from . import data as D

    config = t.config
    seed_everything(config.seed)
    model_cfg = {"backbone": config.backbone, "feature_layer": config.feature_layer,
                 "freeze_blocks": config.freeze_blocks if config.mode == "full" else 0,
                 "embedding_dim": config.embedding_dim,
                 "head": config.head, "hidden": config.hidden}
    model = build_model(model_cfg, backbone_weights=config.backbone_weights).to(t.device)
    if model.stride != D.STRIDE:
        raise InputError(f"backbone {config.backbone!r} gives features at stride {model.stride}; training works "
                         f"on the stride-{D.STRIDE} grid (choose a stride-8 backbone, e.g. dino-vits8)")
    if config.mode == "cached":  # the trunk frozen below its last ``train_blocks`` blocks (default: all of it)
        model.train_blocks(config.train_blocks or 0)
        t.cache_ratio = _cache_ratio(model, config.train_blocks or 0)
    if t.precision != "fp32":
        model = model.to(memory_format=torch.channels_last)
    t.model = model


def _cache_ratio(model, train_blocks: int) -> int:
    """Cached cells per output cell: crops start on the embedding's grid, so the cached layer's
    stride must divide the output stride (pool2 at 4 under 8: 2; pool3 at 8: 1)."""
    layer = model.backbone.layer_at(model.backbone.train_blocks_index(train_blocks))
    if model.stride % layer.stride:
        raise InputError(f"train_blocks={train_blocks} caches {layer.name} at stride {layer.stride}, which does not "
                         f"divide the output stride {model.stride}: train fewer blocks or use --mode full")
    return model.stride // layer.stride


def _batches(t: _Training) -> Iterator[dict[str, Any]]:
    """This rank's batches of steps ``start .. steps - 1`` (cached features or augmented photos)."""
    from . import data as D

    config = t.config
    samples, dropped = D.list_samples(t.segments, images=config.images, labels=config.labels_dir)
    if t.main:
        for key, reason in dropped:
            log.warning("train: %s: %s: skipped", key, reason)
    t.summary.failed.extend(dropped)
    with StoreReader(t.segments, kind="segments") as reader:
        grouping = D.grouping_names(reader, config.cut)  # checked in every mode: a missing level is an error
    if config.steps == 0:  # the untrained initialisation (a baseline): no data needed
        t.n_images = len(samples)
        return iter(())
    if config.mode == "cached":
        return _feature_batches(t, samples)
    return _photo_batches(t, samples, grouping)


def _feature_batches(t: _Training, samples: list) -> Iterator[dict[str, Any]]:
    """Cached mode: the features stage completes its store (rank 0), then crops of its maps."""
    from ..runtime import barrier
    from . import data as D
    from . import features as F

    config = t.config
    store = Path(config.features_dir) if config.features_dir else t.out / "features"
    if t.main:
        settings = F.FeaturesConfig(backbone=config.backbone, backbone_weights=config.backbone_weights,
                                    feature_layer=config.feature_layer, feature_scales=config.feature_scales,
                                    flip=config.flip, cut=config.cut, precision=t.precision, seed=config.seed,
                                    images=config.images,
                                    cache_layer=t.model.cache_layer(config.train_blocks) if config.train_blocks else None)
        t.summary.failed.extend(F.compute(settings, samples, t.segments, store, device=t.device,
                                          precision=t.precision).failed)
    barrier()
    with StoreReader(store, kind="features") as reader:
        stored = set(reader.keys())
    variants: dict[str, list[str]] = {}
    for s in samples:
        for job in F.feature_jobs([s], config.feature_scales, flip=config.flip):
            if job.key in stored:
                variants.setdefault(s.key, []).append(job.key)
    images = sorted(variants)
    if not images:
        raise InputError(f"{t.segments}: no image could be read (see the warnings above); nothing to train on")
    data = D.FeatureBatches(store, images, variants, seed=config.seed, batch=config.batch_size, rank=t.rank,
                            world=t.world, cells=math.ceil(config.crop / D.STRIDE), ignore_label=config.ignore_label,
                            labels={s.key: s.label for s in samples} if config.labels_dir else None,
                            ratio=t.cache_ratio)
    t.n_images = len(images)
    return (data[step] for step in range(t.start, config.steps))


def _photo_batches(t: _Training, samples: list, grouping) -> Iterator[dict[str, Any]]:
    import torch

    from . import data as D

    config = t.config
    samples = _readable(samples, t.summary, main=t.main)
    if not samples:
        raise InputError(f"{t.segments}: no image could be read (see the warnings above); nothing to train on")
    dataset = D.PhotoBatches(samples, seed=config.seed, batch=config.batch_size, rank=t.rank, world=t.world,
                             crop=config.crop, scale_range=(config.scale_min, config.scale_max),
                             flip=config.flip, grouping=grouping, ignore_label=config.ignore_label)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=D.StepSampler(t.start, config.steps), num_workers=config.workers,
        worker_init_fn=D.seed_worker if config.workers else None, persistent_workers=config.workers > 0,
        pin_memory=t.device.type == "cuda")
    t.n_images = len(samples)
    return iter(loader)


def _build_optimizer(t: _Training) -> None:
    """SGD over the trainable parameters (head at ``head_lr_mult``), the loss scaler, the prototype memory, DDP."""
    import torch

    from ..runtime import grad_scaler

    from ..embed.losses import PrototypeMemory

    config = t.config
    groups = t.model.param_groups(config.lr, weight_decay=config.weight_decay, head_lr_mult=config.head_lr_mult)
    for g in groups:
        g["base_lr"] = g["lr"]
    fused = {"fused": True} if _fused_sgd_ok(t.device) else {}
    t.optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, **fused)
    t.scaler = grad_scaler(t.device, t.precision)
    t.memory = PrototypeMemory(config.memory_banks) if config.labels_dir else None
    if config.mode == "full":
        t.trainable = t.model
    elif config.train_blocks:  # the upper trunk blocks and the head, from the cached maps
        t.trainable = t.model.from_layer(t.model.cache_layer(config.train_blocks))
    else:
        t.trainable = t.model.head
    if t.world > 1:
        t.trainable = torch.nn.parallel.DistributedDataParallel(
            t.trainable, device_ids=[t.device.index] if t.device.type == "cuda" else None)


def _restore(t: _Training, state: dict[str, Any] | None) -> None:
    """Load a checkpoint's model, optimiser, memory and RNG states, or seed a fresh run."""
    from ..runtime import seed_everything

    if state is None:
        seed_everything(t.config.seed + 1)
        return
    missing, unexpected = t.model.load_state_dict(state["model"], strict=False)
    if unexpected or (t.config.mode == "full" and missing):
        raise WeightsError(checkpoint_paths(t.out)[-1], "checkpoint weights do not fit this model; pass --overwrite")
    t.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    if t.memory is not None and state.get("memory"):
        t.memory.load_state_dict(state["memory"])
    _set_rng_state(state["rng"])
    t.summary.skipped = t.start
    if t.main:
        log.info("train: resuming %s at step %d of %d", t.out, t.start, t.config.steps)


# -- one step --------------------------------------------------------------------------------------
def _train_step(t: _Training, batch: dict[str, Any], step: int) -> float:
    """One optimiser step on ``batch`` at the lr of ``step``; returns the loss."""
    import torch

    from ..runtime import autocast

    config = t.config
    for g in t.optimizer.param_groups:
        g["lr"] = poly_lr(g["base_lr"], step, config.steps, config.lr_power)
    x = batch["features" if config.mode == "cached" else "image"].to(t.device, non_blocking=True)
    if t.precision != "fp32":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(t.device, t.precision):
        emb = t.trainable(x)
    emb = emb.float()
    target = _targets(t, batch, emb.shape[-2:])
    sorting = _sorting_inputs(t, batch, emb.shape[-2:])
    if t.world > 1:
        emb = _GatherBatch.apply(emb, t.rank, t.world)
        target = _gather_plain(target, t.world)
        sorting = {name: _gather_plain(value, t.world) for name, value in sorting.items()}
    loss = _loss(t, emb, target, sorting)
    value = float(loss.detach())
    if not math.isfinite(value):
        _diverged(t, step + 1, f"the loss is {value}")
    t.optimizer.zero_grad(set_to_none=True)
    t.scaler.scale(loss * t.world if t.world > 1 else loss).backward()  # DDP averages; the gradient is the sum
    t.scaler.step(t.optimizer)
    t.scaler.update()
    return value


def _diverged(t: _Training, step: int, what: str) -> None:
    """Stop training on a non-finite loss or weights: one line, the last good checkpoint kept."""
    ckpts = checkpoint_paths(t.out)
    kept = f"the last good checkpoint ({ckpts[-1].name}) is kept" if ckpts else "no checkpoint was saved"
    raise TrainingDiverged(f"{t.out}: training diverged at step {step} ({what}); {kept}; lower --lr "
                           f"(now {t.config.lr:g}) or use --precision fp32, then re-run with --overwrite")


def _targets(t: _Training, batch: dict[str, Any], grid):
    """What the loss groups by: segments (unsupervised) or classes, on the embedding's grid."""
    from ..embed.losses import segments_to_grid

    target = (batch["labels"] if t.config.labels_dir else batch["segments"]).to(t.device)
    return segments_to_grid(target, grid) if t.config.mode == "full" else target


def _sorting_inputs(t: _Training, batch: dict[str, Any], grid) -> dict[str, Any]:
    """Supervised: where each crop's pixel sorting starts, from the whole image (as released): its
    5x5 grid's cells and ``(y/H, x/W)`` locations, carried through the crop, on the embedding's grid."""
    from ..embed.losses import segments_to_grid

    if not t.config.labels_dir:
        return {}
    init, yx = batch["init"].to(t.device), batch["yx"].to(t.device)
    if t.config.mode == "full":
        init = segments_to_grid(init, grid)
        yx = segments_to_grid(yx.flatten(0, 1), grid).unflatten(0, (yx.shape[0], 2))
    size = batch["image_size"].to(t.device).float()[:, :, None, None]
    return {"init": init, "locations": yx.float() / size}


def _loss(t: _Training, emb, target, sorting: dict[str, Any]):
    from ..embed.losses import supervised_segsort_loss, unsupervised_segsort_loss

    if t.config.labels_dir:
        return supervised_segsort_loss(emb, target, kappa=t.config.kappa, ignore_label=t.config.ignore_label,
                                       memory=t.memory, **sorting)
    return unsupervised_segsort_loss(emb, target, kappa=t.config.kappa, weighting=t.config.loss_weighting)


# -- the loop --------------------------------------------------------------------------------------
def _train_loop(t: _Training, batches: Iterator[dict[str, Any]]) -> int:
    """Steps ``start .. steps - 1``; a stop request (Ctrl-C, SIGTERM) is honoured between steps."""
    config, step = t.config, t.start
    meter, pace = _Meter(step), _Pace(t)
    with _stop_between_steps(), _MetricsLog(t) as metrics:
        while step < config.steps:
            if _stop_requested():
                _stop_at(t, step)
            loss = _train_step(t, next(batches), step)
            step += 1
            _test_hook(step)
            t.summary.done += 1
            t.recent_losses = [*t.recent_losses[-4:], loss]
            metrics.step(step, loss, meter)
            pace.after(step)
            if step % config.checkpoint_every == 0 and step < config.steps:
                save_checkpoint(t, step)
    return step


def _stop_requested() -> bool:
    try:
        check_stop()
    except KeyboardInterrupt:
        return True
    return False


def _stop_at(t: _Training, step: int) -> None:
    """Leave at a step boundary: checkpoint the finished steps, then raise KeyboardInterrupt."""
    if step > t.start:
        save_checkpoint(t, step)
        if t.main:
            log.warning("train: stopped at step %d; checkpoint saved, re-run the same command to resume", step)
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stop_between_steps() -> Iterator[None]:
    """While training, Ctrl-C / SIGTERM only request a stop (honoured at the next step boundary, so a
    checkpoint never mixes steps); a second signal interrupts at once (the last checkpoint stands)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request(signum, frame) -> None:
        if _stop_requested():
            raise KeyboardInterrupt
        request_stop()

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    # The CLI's watchdog (fed by the wakeup fd) would end the process within seconds: a step and its
    # checkpoint may take longer, and Python's handler runs between steps anyway.
    wakeup = signal.set_wakeup_fd(-1)
    try:
        yield
    finally:
        signal.set_wakeup_fd(wakeup, warn_on_full_buffer=False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _test_hook(step: int) -> None:
    """Tests: ``SEGSORT_TEST_SIGTERM_AFTER_STEP=k`` sends this process SIGTERM right after optimiser step k."""
    if os.environ.get(TEST_SIGTERM_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGTERM)


class _Meter:
    """Images per second since the last logged step."""

    def __init__(self, step: int):
        self.tick, self.tick_step = time.perf_counter(), step

    def images_per_second(self, step: int, batch: int) -> float:
        now = time.perf_counter()
        ips = (step - self.tick_step) * batch / max(now - self.tick, 1e-9)
        self.tick, self.tick_step = now, step
        return ips


class _Pace:
    """Before a long run: one line with the time left, measured on the first steps after the warm-up."""

    def __init__(self, t: _Training):
        self.t, self.began = t, None

    def after(self, step: int) -> None:
        t = self.t
        if step == t.start + 1:
            self.began = time.perf_counter()
        if self.began is None or step != t.start + 1 + PACE_STEPS:
            return
        per_step = (time.perf_counter() - self.began) / PACE_STEPS
        left = (t.config.steps - step) * per_step
        if t.main and left > LONG_RUN_SECONDS:
            head = "" if t.config.head == "conv1" else " or --head conv1"
            log.info("train: about %s left for %d steps (%.2f s a step); for a shorter run use fewer --steps, "
                     "a smaller --crop (now %d)%s", _duration(left), t.config.steps - step, per_step, t.config.crop,
                     head)


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{max(minutes, 1)} min"


class _MetricsLog:
    """metrics.jsonl (rank 0) and the progress bar, which counts resumed steps too."""

    def __init__(self, t: _Training):
        self.t = t

    def __enter__(self) -> _MetricsLog:
        t = self.t
        self.file = open(t.out / "metrics.jsonl", "a", encoding="utf-8") if t.main else None  # noqa: SIM115
        self.bar = progress(total=t.config.steps, initial=t.start, desc="train", unit="step",
                            disable=None if t.main else True)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()

    def step(self, step: int, loss: float, meter: _Meter) -> None:
        config = self.t.config
        self.bar.update(1)
        if self.file is None or not (step % config.log_every == 0 or step == config.steps):
            return
        lr = self.t.optimizer.param_groups[0]["lr"]
        ips = meter.images_per_second(step, config.batch_size)
        self.file.write(json.dumps({"step": step, "loss": loss, "lr": lr, "img_per_s": round(ips, 3)}) + "\n")
        self.file.flush()
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")


# -- checkpoints and the end -----------------------------------------------------------------------
def save_checkpoint(t: _Training, step: int) -> None:
    """Write ``checkpoints/step-NNNNNNN.pt`` atomically (rank 0) and drop all but the newest ``keep``."""
    import torch

    if not t.main:
        return
    weights = t.model.state_dict()
    if t.config.mode == "cached":  # the head and the trunk blocks that train; the frozen rest is rebuilt
        trained = {name for name, p in t.model.named_parameters() if p.requires_grad}
        weights = {k: v for k, v in weights.items() if k.startswith("head.") or k in trained}
    if not all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point()):
        _diverged(t, step, "the weights are not finite")
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": step,
               "identity": json.dumps(t.identity, sort_keys=True),
               "model": {k: v.detach().cpu() for k, v in weights.items()},
               "optimizer": t.optimizer.state_dict(), "scaler": t.scaler.state_dict(), "rng": _rng_state(),
               "memory": t.memory.state_dict() if t.memory is not None else {}}
    buffer = io.BytesIO()  # serialised first: a full disk then fails as an OSError, one line
    torch.save(payload, buffer)
    folder = t.out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / f"step-{step:07d}.pt", buffer.getbuffer())
    for old in checkpoint_paths(t.out)[:-t.config.keep]:
        old.unlink(missing_ok=True)


def _finish(t: _Training, step: int) -> None:
    """The final checkpoint and model.pt (rank 0), and the summary's note."""
    from ..embed.model import save_model
    from ..runtime import barrier

    if t.main:
        if step > t.start or not (t.out / "model.pt").exists():
            save_checkpoint(t, step)
        t.model.eval()
        config, seg_config = t.config, t.seg_config
        sha = save_model(t.out / "model.pt", t.model, provenance={
            "train_identity_hash": t.ident_hash, "segments_identity": t.provenance["segments_identity"],
            "mode": config.mode, "supervised": bool(config.labels_dir), "steps": config.steps, "seed": config.seed,
            "precision": t.precision, "images": t.n_images, "segments_threshold": seg_config.get("threshold"),
            "cut": config.cut if config.cut is not None else seg_config.get("threshold"),
            **t.provenance, "backbone_weights_sha256": _trunk_weights_sha256(config),
            # the settings as a table, freeze_blocks as trained (cached mode freezes the trunk below train_blocks)
            "train_config": {**config.result_fields(), "freeze_blocks": t.model.backbone.frozen_blocks()}})
        tail = t.recent_losses
        t.summary.note = (f"{config.mode} mode, {t.n_images} images, step {step}/{config.steps}"
                          + (f", loss {np.mean(tail):.4f} (last {len(tail)})" if tail else "")
                          + f", model.pt sha256 {sha[:12]}")
    barrier()


def _trunk_weights_sha256(config: TrainConfig) -> str:
    """sha256 of the trunk's pretrained weights: the given file, or the cached HED weights it defaults to."""
    if config.backbone_weights:
        return sha256_file(config.backbone_weights)
    if config.backbone == "vgg16-hed":
        from ..contours.weights import resolve_weights

        return resolve_weights("hed-bsds500", None)[1]  # what the trunk was loaded from (sha256-checked)
    return ""


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


STAGE = Stage("train", TrainConfig, run, sources=("ucm",), output="train",
              input_paths=("labels_dir", "backbone_weights", "images"), optional=True,
              arguments=("segments",), executor=False,
              help="SegSort embedding training (model.pt)")
