"""Torch runtime choices shared by the stages that run networks (contours, train, embed).

Device and precision resolution, autocast, seeding, the few distributed-training helpers
needed under ``torchrun``, and handing freed memory back to the system between big steps. Nothing here knows about a particular stage or model, so training
and embedding code can use it without importing the contours stage.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from .config import PRECISIONS
from .errors import InputError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = [
    "PRECISIONS",
    "autocast",
    "barrier",
    "cpu_fusion_available",
    "cpu_fusion_dtype",
    "cpu_has_fast_bf16",
    "dist_info",
    "grad_scaler",
    "is_main_process",
    "release_free_memory",
    "resolve_device",
    "resolve_precision",
    "seed_everything",
]


_LIBC: object | None = None


def release_free_memory() -> None:
    """Return memory freed inside the process to the system (glibc ``malloc_trim``; elsewhere a no-op).

    glibc keeps freed blocks below its mmap threshold (which it raises up to 32 MiB as large
    blocks come and go) for reuse, so after a network's forward passes a few hundred MiB of
    freed activations can stay resident while the next step allocates fresh memory. Cheap
    (milliseconds): call it between big steps, e.g. after each row of tiles of a huge image.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX-BF16 or AVX512-BF16 (where bf16 autocast pays off)."""
    from .sysinfo import cpu_flags

    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


def cpu_fusion_available() -> bool:
    """Whether this torch build has oneDNN's fused convolution + pointwise op (conv + ReLU in one call)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def cpu_fusion_dtype(precision: str) -> torch.dtype | None:
    """Weight dtype of the fused CPU convolutions for a resolved ``precision``: bfloat16 for bf16,
    float32 for fp32, None for fp16 (not fused on CPU)."""
    return {"bf16": torch.bfloat16, "fp32": torch.float32}.get(precision)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``.

    Raises :class:`InputError` for an unknown device string and for CUDA where there is none.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"--device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here (use --device cpu)")
    return dev


def resolve_precision(precision: str, device: torch.device, *, cpu_bf16: bool = True) -> str:
    """Turn ``auto`` into the fastest accurate precision for ``device``; other choices pass through.

    ``auto``: bf16 on CUDA where supported (else fp16); on CPU bf16 where the CPU has fast bf16
    (:func:`cpu_has_fast_bf16`) and ``cpu_bf16`` allows it (a model that gains little from bf16
    and loses accuracy sets it False), else fp32.
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if not cpu_bf16:
        return "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str) -> Iterator[None]:
    """Run the block under ``torch.autocast`` for a resolved ``precision`` (bf16 / fp16).

    ``fp32`` turns autocast off: a no-op, except that it also suspends an enclosing autocast.
    """
    device_type = torch.device(device).type
    if precision not in ("fp32", *_DTYPES):
        raise InputError(f"precision {precision!r}: resolve it first (fp32, bf16 or fp16)")
    with torch.autocast(device_type, dtype=_DTYPES.get(precision, torch.bfloat16), enabled=precision != "fp32"):
        yield


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """The loss scaler a training step needs: on for fp16 (whose gradients underflow without it), a
    pass-through for bf16 and fp32 (``scale`` returns the loss, ``step`` calls the optimiser)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def deterministic_cuda(device: torch.device) -> None:
    """On a GPU, the kernels that give the same bits every run (a resumed run must end with the
    weights of an uninterrupted one); CPU kernels are deterministic already. Call before the first
    cuBLAS call: its workspace setting is read when cuBLAS starts."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


def dist_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` outside it."""
    values = []
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(name, "")
        try:
            values.append(int(text) if text.strip() else default)
        except ValueError:
            raise InputError(f"environment variable {name}={text!r} is not an integer (set by torchrun)") from None
    rank, world_size, local_rank = values
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise InputError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world_size} "
                         f"LOCAL_RANK={local_rank}")
    return rank, world_size, local_rank


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_main_process() -> bool:
    """Whether this process is rank 0 (of the initialised process group, else of torchrun's environment)."""
    if _dist_ready():
        return torch.distributed.get_rank() == 0
    return dist_info()[0] == 0


def barrier() -> None:
    """Wait for every process of the group; a no-op when no process group is initialised."""
    if _dist_ready():
        torch.distributed.barrier()
