"""Writers of HED weight files in the pytorch-hed and Caffe layouts, for the format and fetch tests.

The pytorch-hed and Caffe files cannot be downloaded here, so the tests write files with the
same layout from the real Keras weights (a tiny protobuf encoder for the caffemodel). Test-side,
independent of the loaders.
"""

from __future__ import annotations

import numpy as np

PYTORCH_HED_BLOCKS = ("VggOne", "VggTwo", "VggThree", "VggFour", "VggFive")
PYTORCH_HED_SCORES = ("ScoreOne", "ScoreTwo", "ScoreThree", "ScoreFour", "ScoreFive")
CONVS_PER_BLOCK = (2, 2, 3, 3, 3)


def pytorch_hed_state(state: dict, prefix: str = "net") -> dict:
    """The HED state in sniklaus/pytorch-hed key names (Sequential indices skip pools/ReLUs)."""
    out = {}
    for b, n in enumerate(CONVS_PER_BLOCK, start=1):
        first = 0 if b == 1 else 1
        for i in range(n):
            for kind in ("weight", "bias"):
                key = f"{prefix}{PYTORCH_HED_BLOCKS[b - 1]}.{first + 2 * i}.{kind}"
                out[key] = state[f"block{b}.convs.{i}.{kind}"].clone()
        for kind in ("weight", "bias"):
            out[f"{prefix}{PYTORCH_HED_SCORES[b - 1]}.{kind}"] = state[f"dsn{b}.{kind}"].clone()
    for kind in ("weight", "bias"):
        out[f"{prefix}Combine.0.{kind}"] = state[f"fuse.{kind}"].clone()
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _int_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _blob(arr: np.ndarray, *, legacy_shape: bool, packed: bool) -> bytes:
    parts = []
    if legacy_shape:  # num/channels/height/width, padded with leading 1s as old Caffe wrote biases
        dims = (1,) * (4 - arr.ndim) + tuple(arr.shape)
        parts += [_int_field(i + 1, d) for i, d in enumerate(dims)]
    else:
        parts.append(_bytes_field(7, _bytes_field(1, b"".join(_varint(d) for d in arr.shape))))
    data = np.ascontiguousarray(arr, dtype="<f4").ravel()
    if packed:
        parts.append(_bytes_field(5, data.tobytes()))
    else:  # one (tag, fixed32) pair per value
        rows = np.empty((data.size, 5), np.uint8)
        rows[:, 0] = 5 << 3 | 5
        rows[:, 1:] = data.view(np.uint8).reshape(-1, 4)
        parts.append(rows.tobytes())
    return b"".join(parts)


def caffemodel_bytes(state: dict, *, v1: bool) -> bytes:
    """A NetParameter with HED's layer names; V1 (`layers`, legacy shapes, unpacked) or current."""
    layers = [("data", []), ("conv1_1", None)]
    names = []
    for b, n in enumerate(CONVS_PER_BLOCK, start=1):
        names += [(f"conv{b}_{i + 1}", f"block{b}.convs.{i}") for i in range(n)]
        names.append((f"score-dsn{b}", f"dsn{b}"))
    names.append(("new-score-weighting", "fuse"))
    layers = [("data", [])]
    for caffe_name, prefix in names:
        layers.append((caffe_name, [state[f"{prefix}.weight"].numpy(), state[f"{prefix}.bias"].numpy()]))
        layers.append((caffe_name.replace("conv", "relu"), []))
    layers.append(("upsample_2", [np.full((1, 1, 4, 4), 0.25, np.float32)]))  # fixed bilinear deconv: ignored
    out = [_bytes_field(1, b"HED")]
    for name, blobs in layers:
        if v1:
            body = _bytes_field(4, name.encode()) + _int_field(5, 4)  # name, type enum CONVOLUTION
            body += b"".join(_bytes_field(6, _blob(a, legacy_shape=True, packed=False)) for a in blobs)
            out.append(_bytes_field(2, body))
        else:
            body = _bytes_field(1, name.encode()) + _bytes_field(2, b"Convolution")
            body += b"".join(_bytes_field(7, _blob(a, legacy_shape=False, packed=True)) for a in blobs)
            out.append(_bytes_field(100, body))
    return b"".join(out)
