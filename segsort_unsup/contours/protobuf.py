"""A minimal protobuf wire-format reader for Caffe's ``NetParameter`` (``.caffemodel`` files).

Only what loading weights needs: layer names and their blobs, from the current ``layer`` field
(``LayerParameter``) or the V1 ``layers`` field; no dependency on protobuf or caffe.proto.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import WeightsError

__all__ = ["read_caffemodel"]

# Field numbers from caffe.proto:
#   NetParameter:      layer = 100 (LayerParameter), layers = 2 (V1LayerParameter)
#   LayerParameter:    name = 1, blobs = 7
#   V1LayerParameter:  name = 4, blobs = 6
#   BlobProto:         num = 1, channels = 2, height = 3, width = 4, data = 5 (float),
#                      shape = 7 (BlobShape: dim = 1, int64), double_data = 8
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


class _ProtoError(ValueError):
    pass


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise _ProtoError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise _ProtoError("varint too long")


def _next_field(buf: bytes, pos: int, end: int) -> tuple[int, int, int, int, int]:
    """The field at ``pos``: ``(field, wire_type, a, b, next_pos)``; varint -> a = value,
    length-delimited/fixed -> ``buf[a:b]`` is the payload."""
    key, pos = _read_varint(buf, pos, end)
    field, wire = key >> 3, key & 7
    if field == 0:
        raise _ProtoError("field number 0")
    if wire == _VARINT:
        value, pos = _read_varint(buf, pos, end)
        return field, wire, value, 0, pos
    if wire == _BYTES:
        length, pos = _read_varint(buf, pos, end)
    elif wire in (_FIXED32, _FIXED64):
        length = 4 if wire == _FIXED32 else 8
    else:
        raise _ProtoError(f"unsupported wire type {wire}")
    if pos + length > end:
        raise _ProtoError("field runs past the end of its message")
    return field, wire, pos, pos + length, pos + length


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(field, wire_type, a, b)`` for each field of the message ``buf[start:end]``."""
    pos = start
    while pos < end:
        field, wire, a, b, pos = _next_field(buf, pos, end)
        yield field, wire, a, b


def _packed_varints(buf: bytes, start: int, end: int) -> list[int]:
    values, pos = [], start
    while pos < end:
        value, pos = _read_varint(buf, pos, end)
        values.append(value)
    return values


def _read_blob(buf: bytes, start: int, end: int) -> np.ndarray:
    legacy = {1: 0, 2: 0, 3: 0, 4: 0}
    dims: list[int] | None = None
    chunks: list[np.ndarray] = []
    pos = start
    while pos < end:
        if buf[pos] == 0x2D:  # field 5, wire type fixed32
            # Unpacked floats: a run of (tag 0x2d, 4 bytes); read the whole run at once.
            run = np.frombuffer(buf, dtype=np.uint8, count=(end - pos) // 5 * 5, offset=pos).reshape(-1, 5)
            is_tag = run[:, 0] == 0x2D
            n = len(run) if is_tag.all() else int(np.argmin(is_tag))
            chunks.append(run[:n, 1:].copy().view("<f4").ravel())
            pos += 5 * n
            continue
        field, wire, a, b, pos = _next_field(buf, pos, end)
        if field in legacy and wire == _VARINT:
            legacy[field] = a
        elif field == 7 and wire == _BYTES:
            dims = []
            for f, w, x, y in _fields(buf, a, b):
                if f == 1 and w == _BYTES:
                    dims.extend(_packed_varints(buf, x, y))
                elif f == 1 and w == _VARINT:
                    dims.append(x)
        elif field == 5 and wire == _BYTES:  # packed floats
            if (b - a) % 4:
                raise _ProtoError("packed float data length is not a multiple of 4")
            chunks.append(np.frombuffer(buf, dtype="<f4", count=(b - a) // 4, offset=a))
        elif field == 8 and wire == _BYTES:  # packed doubles
            if (b - a) % 8:
                raise _ProtoError("packed double data length is not a multiple of 8")
            chunks.append(np.frombuffer(buf, dtype="<f8", count=(b - a) // 8, offset=a).astype(np.float32))
        elif field == 8 and wire == _FIXED64:
            chunks.append(np.frombuffer(buf, dtype="<f8", count=1, offset=a).astype(np.float32))
    data = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if dims is None:
        dims = [legacy[k] for k in (1, 2, 3, 4)]
    if dims and int(np.prod(dims)) == data.size:
        return data.reshape(dims)
    if data.size and not any(dims):
        return data
    raise _ProtoError(f"blob shape {dims} does not match its {data.size} values")


def read_caffemodel(path: str | os.PathLike) -> dict[str, list[np.ndarray]]:
    """Layer name -> weight blobs (float32 arrays in Caffe's shape) of a ``.caffemodel`` file.

    Reads both the current ``layer`` field (LayerParameter) and the V1 ``layers`` field; blob data
    may be packed or unpacked floats (or doubles); shapes come from ``BlobShape`` or the legacy
    num/channels/height/width. Layers without blobs are left out.
    """
    path = Path(path)
    buf = path.read_bytes()
    layers: dict[str, list[np.ndarray]] = {}
    try:
        for field, wire, a, b in _fields(buf, 0, len(buf)):
            if wire != _BYTES or field not in (2, 100):
                continue
            name_field, blob_field = (1, 7) if field == 100 else (4, 6)
            name, blobs = None, []
            for f, w, x, y in _fields(buf, a, b):
                if f == name_field and w == _BYTES:
                    name = buf[x:y].decode("utf-8", "replace")
                elif f == blob_field and w == _BYTES:
                    blobs.append(_read_blob(buf, x, y))
            if name is not None and blobs:
                layers[name] = blobs
    except _ProtoError as exc:
        raise WeightsError(path, f"corrupt or truncated caffemodel ({exc})") from None
    if not layers:
        raise WeightsError(path, "no layers with weights found: not a Caffe .caffemodel")
    return layers
