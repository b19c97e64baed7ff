"""Sharded HDF5 stores: atomic, resumable, checksummed, self-describing.

A store is a folder::

    out/contours/
      store.json          kind, format version, identity (config + provenance) and its hash, producer
      index.jsonl         one line per complete shard: its name, keys, size and sha256 (appended)
      part-00000.h5       complete shards: one HDF5 group per item
      part-r1a2b-t00003.h5  a shard written by a distributed task (unique name per task)
      .part-00002.h5.<pid>.tmp  a shard being written (never read; removed on the next run)
      failures.tsv        items that failed in the last run, with the reason (header + one row each)
      quarantine/         shards found damaged, set aside with the reason (their items are redone)

A shard is written to a temporary name and renamed into place only once it is closed and
fsynced; its line is then appended to ``index.jsonl``. A killed run leaves complete shards
(at most one without its index line: it is verified and adopted on the next run) plus temporary
files that the next run deletes. A lock (taken before anything is deleted) keeps two runs out
of one store, ``--overwrite`` included.

Every byte is checked when read back: datasets carry HDF5's fletcher32 checksum, metadata is
written with the checksummed (``libver="latest"``) HDF5 format, and the index holds each
shard's sha256, which a resuming writer verifies; a damaged shard is moved to ``quarantine/``
with its reason and its items are redone. Readers skip damaged items or shards and report them.

Each store kind declares its datasets once (:class:`StoreSchema`, registered in
:data:`SCHEMAS`); writers and readers check names, dtypes and dimensions against it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import h5py
import numpy as np

from .. import __version__
from ..config import changed_keys, config_hash
from ..errors import StoreError
from .atomic import (
    DiskFullError,
    atomic_write_text,
    commit_temp,
    fsync_dir,
    is_disk_full,
    remove_stale_temps,
    sha256_file,
    temp_path,
)

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: segsort-unsup 0.1 (no index, no checksums): still read
MANIFEST_NAME = "store.json"
INDEX_NAME = "index.jsonl"
FAILURES_NAME = "failures.tsv"
LOCK_NAME = ".lock"
QUARANTINE_DIR = "quarantine"
FLUSH_BYTES = 256 * 2**20  # queued item bytes that close a shard (huge images are written at once)
_SHARD_RE = re.compile(r"^part-[A-Za-z0-9_-]+\.h5$")
_GZIP_MIN = 4096  # values; smaller datasets are stored uncompressed (still chunked and checksummed)


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSpec:
    """One dataset every item of a store kind holds (or may hold, if ``optional``)."""

    name: str
    dtype: str  # numpy dtype name: float16, float32, int32, int64, uint8...
    ndim: int
    optional: bool = False
    also: tuple[str, ...] = ()  # other dtypes accepted (e.g. a quantised form)


@dataclass(frozen=True)
class StoreSchema:
    """What a store kind holds: its datasets, declared once."""

    kind: str
    datasets: tuple[DatasetSpec, ...]

    def spec(self, name: str) -> DatasetSpec | None:
        return next((d for d in self.datasets if d.name == name), None)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.datasets if not d.optional)

    def check(self, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Raise ``ValueError`` naming the item and dataset when ``arrays`` break the schema."""
        missing = [n for n in self.required if n not in arrays]
        if missing:
            raise ValueError(f"{self.kind} item {key!r} lacks datasets {missing}")
        for name, arr in arrays.items():
            spec = self.spec(name)
            if spec is None:
                raise ValueError(f"{self.kind} item {key!r}: dataset {name!r} is not in the {self.kind} schema")
            if np.dtype(arr.dtype) not in {np.dtype(d) for d in (spec.dtype, *spec.also)} or arr.ndim != spec.ndim:
                raise ValueError(f"{self.kind} item {key!r}: dataset {name!r} is {arr.dtype} with {arr.ndim} dims; "
                                 f"the schema says {spec.dtype} with {spec.ndim}")


SCHEMAS: dict[str, StoreSchema] = {}


def register_schema(schema: StoreSchema) -> StoreSchema:
    """Declare a store kind (each kind once)."""
    SCHEMAS[schema.kind] = schema
    return schema


CONTOURS = register_schema(StoreSchema("contours", (
    DatasetSpec("edge", "float16", 2),  # probability 0..1
    DatasetSpec("orientation", "float16", 2),  # radians in [0, pi)
)))
SEGMENTS = register_schema(StoreSchema("segments", (
    # BSDS doubled grid (2H+1, 2W+1); uint16-quantised for huge maps (read it with ucm.ucm2_values)
    DatasetSpec("ucm2", "float32", 2, also=("uint16",)),
    DatasetSpec("parents", "int32", 1),  # merge tree
    DatasetSpec("altitudes", "float32", 1),
    DatasetSpec("leaves", "int32", 2),  # pixel -> leaf region
    DatasetSpec("labels", "int32", 2),  # cut at the stage's threshold
    DatasetSpec("labels_levels", "int32", 3, optional=True),
)))
PROTOTYPES = register_schema(StoreSchema("prototypes", (
    DatasetSpec("prototypes", "float32", 2),  # K x D, unit norm
    DatasetSpec("segments", "int32", 2),  # segment label map (H, W), ids 0..K-1
    DatasetSpec("area", "int64", 1),  # pixels per segment
    DatasetSpec("bbox", "int32", 2),  # K x 4: y0, x0, y1, x1 (exclusive)
    DatasetSpec("label", "int32", 1, optional=True),  # majority class per segment (labelled sets)
    DatasetSpec("views", "int32", 3, optional=True),  # V x H x W segment maps of every view (multi-view embed)
    DatasetSpec("votes", "float32", 2, optional=True),
)))
# Frozen-trunk features per (image, scale, flip): the ``features`` stage, read by cached-mode train.
FEATURES = register_schema(StoreSchema("features", (
    DatasetSpec("features", "float16", 3),  # (C, h, w) trunk features at stride 8
    DatasetSpec("segments", "int32", 2),  # (h, w) grouping on the feature grid
)))
# A FINCH clustering of a prototypes store (the ``discover`` stage): item ``rows`` says which
# prototype each row is; items ``level-00``, ``level-01``... (finest first) and, with req_clust,
# ``requested`` hold one partition each.
GROUPS = register_schema(StoreSchema("groups", (
    DatasetSpec("image_keys", "uint8", 1, optional=True),  # rows: UTF-8 JSON list of the prototypes store's keys
    DatasetSpec("image", "int32", 1, optional=True),  # rows: index into image_keys
    DatasetSpec("segment", "int32", 1, optional=True),  # rows: segment id within its image
    DatasetSpec("area", "int64", 1, optional=True),  # rows: segment area
    DatasetSpec("label", "int32", 1, optional=True),  # rows: class (labelled prototypes)
    DatasetSpec("partition", "int32", 1, optional=True),  # level: group of each row, 0..k-1
    DatasetSpec("means", "float32", 2, optional=True),  # level: k x D mean prototype of each group
    DatasetSpec("sizes", "int64", 1, optional=True),  # level: rows per group
    DatasetSpec("parent", "int32", 1, optional=True),  # level: group at the next coarser level (-1: none)
    DatasetSpec("class_counts", "int64", 2, optional=True),  # level: k x C rows per (group, class)
)))


# --------------------------------------------------------------------------------------------
# Items, manifests, shards
# --------------------------------------------------------------------------------------------
@dataclass
class Item:
    """One stored item: its key, named arrays and scalar/string attrs.

    ``stream``: written one dataset at a time in their order, each :class:`DeferredArray` computed
    only then, and each dataset let go once written (its entry becomes None): a huge item's peak is
    what is left of it, not all of it (the ``ucm`` stage's labels of a 150 Mpx map are cut after its
    ucm2 is on disk). A streamed item is spent once its shard is written.
    """

    key: str
    arrays: dict[str, Any]
    attrs: dict[str, Any] = field(default_factory=dict)
    stream: bool = False


@dataclass(frozen=True)
class DeferredArray:
    """A dataset computed when its shard is written: ``compute(*args)`` gives an array of ``shape``
    and ``dtype`` (module-level ``compute`` so that it pickles to and from worker processes)."""

    compute: Callable[..., np.ndarray]
    args: tuple
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def materialize(self) -> np.ndarray:
        arr = np.asarray(self.compute(*self.args))
        if arr.shape != tuple(self.shape) or arr.dtype != np.dtype(self.dtype):
            raise ValueError(f"deferred dataset gave {arr.dtype} {arr.shape}, not {np.dtype(self.dtype)} {self.shape}")
        return arr

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self.materialize()
        return arr if dtype is None else arr.astype(dtype, copy=False)


@dataclass(frozen=True)
class ShardInfo:
    """A complete shard: file name, the keys it holds, its size and sha256."""

    name: str
    keys: tuple[str, ...]
    size: int
    sha256: str

    def line(self) -> str:
        return json.dumps({"shard": self.name, "keys": list(self.keys), "size": self.size, "sha256": self.sha256})


def is_store(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a readable store manifest."""
    try:
        read_manifest(path)
    except StoreError:
        return False
    return True


def _attr_value(value: Any) -> Any:
    if isinstance(value, (str, bytes, int, float, bool, np.generic, np.ndarray)):
        return value
    if value is None:
        return ""
    return json.dumps(value, sort_keys=True, default=str)


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _shard_files(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if _SHARD_RE.match(p.name)), key=lambda p: p.name)


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The store's manifest, or a :class:`StoreError` saying why it is not a store."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.exists():
        raise StoreError(root, "no such store (expected a folder written by segsort-unsup)")
    if not root.is_dir():
        raise StoreError(root, "is a file, not a store folder")
    if not path.is_file():
        raise StoreError(root, f"not a segsort-unsup store ({MANIFEST_NAME} missing)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(path, f"unreadable store manifest ({exc}); re-run the stage with --overwrite") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("kind"), str):
        raise StoreError(path, "not a store manifest (expected a JSON object with a 'kind'); "
                               "re-run the stage with --overwrite or choose another output")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise StoreError(root, f"store format {manifest.get('format_version')} is not supported by "
                               f"segsort-unsup {__version__} (reads {READABLE_VERSIONS})")
    return manifest


def _read_index(root: Path) -> list[ShardInfo]:
    """Shard lines of ``index.jsonl`` (a torn last line, from a kill mid-append, is ignored)."""
    path = root / INDEX_NAME
    if not path.is_file():
        return []
    infos = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                d = json.loads(line)
                infos.append(ShardInfo(str(d["shard"]), tuple(str(k) for k in d["keys"]), int(d["size"]),
                                       str(d["sha256"])))
            except (ValueError, KeyError, TypeError):
                continue
    return infos


def _scan_shard(path: Path, *, verify: bool) -> tuple[str, ...]:
    """Keys held by a shard file; with ``verify``, every dataset is read (checksums checked)."""
    keys = []
    with h5py.File(path, "r") as fh:
        for name in fh:
            group = fh[name]
            keys.append(str(_decode_attr(group.attrs.get("key", unquote(name)))))
            if verify:
                for ds in group.values():
                    ds[()]
                dict(group.attrs)
    return tuple(keys)


def _dataset_options(arr: np.ndarray) -> dict[str, Any]:
    opts: dict[str, Any] = {"chunks": True, "fletcher32": True}
    if arr.size >= _GZIP_MIN:
        opts.update(compression="gzip", compression_opts=1, shuffle=True)
    return opts


def _check_space(root: Path, needed: int) -> None:
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return
    if free < needed + (1 << 20):
        raise DiskFullError(root, needed)


def write_shard(root: str | os.PathLike, name: str, items: Iterable[Item], *,
                schema: StoreSchema | None = None, epoch: str | None = None) -> ShardInfo:
    """Write ``items`` as the complete shard ``root/name`` (temp file, fsync, rename) and describe it.

    Used by the store writer and, directly, by distributed tasks (which return the
    :class:`ShardInfo` for the client to index). With ``epoch``, the shard is only committed
    while the store's manifest still carries that epoch (an ``--overwrite`` in between makes a
    late task fail instead of writing into the new store).
    """
    root = Path(root)
    items = list(items)
    final = root / name
    tmp = temp_path(final)
    needed = sum(int(a.nbytes) for it in items for a in it.arrays.values())
    _check_space(root, needed)
    try:
        with h5py.File(tmp, "w", libver="latest") as fh:
            for item in items:
                if schema is not None:
                    schema.check(item.key, item.arrays)
                group = fh.create_group(quote(item.key, safe=""))
                group.attrs["key"] = item.key
                for attr, value in item.attrs.items():
                    group.attrs[attr] = _attr_value(value)
                for ds_name in list(item.arrays):
                    value = item.arrays[ds_name]
                    arr = np.ascontiguousarray(value.materialize() if isinstance(value, DeferredArray) else value)
                    if arr.ndim == 0:
                        raise ValueError(f"item {item.key!r}: dataset {ds_name!r} is 0-d; store it as shape (1,)")
                    group.create_dataset(ds_name, data=arr, **_dataset_options(arr))
                    if item.stream:
                        item.arrays[ds_name] = None
                    del value, arr
        if epoch is not None and read_manifest(root).get("epoch") != epoch:
            raise StoreError(root, "the store was replaced (--overwrite) while this task ran; its result is dropped")
        size = tmp.stat().st_size
        digest = sha256_file(tmp)
        commit_temp(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise DiskFullError(root, needed) from None
        raise
    return ShardInfo(name, tuple(it.key for it in items), size, digest)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"t": "\t", "n": "\n", "r": "\r"}.get(m.group(1), m.group(1)), text)


def read_failures(root: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """``failures.tsv`` as ``{key: (time, reason)}`` (an old header-less file reads too)."""
    path = Path(root) / FAILURES_NAME
    out: dict[str, tuple[str, str]] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[:3] == ["time", "key", "reason"]:
            continue
        out[_unescape(parts[1])] = (parts[0], _unescape("\t".join(parts[2:])))
    return out


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------
class StoreLock:
    """An exclusive, non-blocking lock on a store folder (``.lock``, removed when released)."""

    def __init__(self, root: Path):
        self.root = root
        self._fh = None

    def acquire(self) -> None:
        path = self.root / LOCK_NAME
        while True:
            fh = open(path, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                raise StoreError(self.root, "another segsort-unsup run is writing this store; wait for it or "
                                            "choose another output") from None
            # The previous holder may have removed the file between our open and flock: retry then.
            try:
                same = os.fstat(fh.fileno()).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fh = fh
                return
            fh.close()

    def release(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(OSError):
                (self.root / LOCK_NAME).unlink()
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def item_nbytes(item: Item) -> int:
    """Bytes held by an item's arrays (what a queued item keeps in memory)."""
    return sum(int(getattr(a, "nbytes", 0)) for a in item.arrays.values())


class StoreWriter:
    """Append items to a store in atomically renamed, checksummed shards; resumable.

    Parameters
    ----------
    root : folder of the store (created if missing).
    kind : what the store holds (``"contours"``, ``"segments"``...); checked on resume and on overwrite.
    config : the producing stage's identity (result settings + input provenance); its hash must
        match on resume.
    meta : extra provenance recorded in the manifest (weights file, device...).
    schema : the kind's datasets; default: the registered schema of ``kind``, if any.
    shard_size : items per shard; a killed run loses at most this many finished items.
    flush_seconds : also close a shard when it has been open this long.
    flush_bytes : also close a shard when its queued arrays reach this many bytes, so a huge
        image's outputs are written (and made durable) at once instead of held in memory beside
        the next image's work.
    overwrite : ``False`` (resume; refuse another configuration), ``True`` (start over) or
        ``"changed"`` (start over only when the configuration differs: pipelines).
    verify : check every complete shard's sha256 before trusting it on resume.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        kind: str,
        config: Mapping[str, Any],
        meta: Mapping[str, Any] | None = None,
        schema: StoreSchema | None = None,
        shard_size: int = 64,
        flush_seconds: float = 120.0,
        flush_bytes: int = FLUSH_BYTES,
        overwrite: bool | str = False,
        verify: bool = True,
    ):
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.root = Path(root)
        self.kind = kind
        self.schema = schema if schema is not None else SCHEMAS.get(kind)
        self.shard_size = shard_size
        self.flush_seconds = flush_seconds
        self.flush_bytes = flush_bytes
        self.config = dict(config)
        self.config_hash = config_hash(self.config)
        self.completed: set[str] = set()
        self.quarantined: list[tuple[str, str]] = []  # (shard, reason)
        self.replaced_keys: list[str] = []  # with overwrite="changed": what differed
        self._pending: list[Item] = []
        self._pending_since = 0.0
        self._pending_bytes = 0
        self._failures: dict[str, tuple[str, str]] = {}
        self._failures_dirty = False
        self._next_shard = 0
        self._lock = StoreLock(self.root)
        self._make_folder()
        self._lock.acquire()
        try:
            self.manifest = self._open_manifest(overwrite, meta)
            remove_stale_temps(self.root)
            self._load_shards(verify=verify)
            self._failures = {k: v for k, v in read_failures(self.root).items() if k not in self.completed}
        except BaseException:
            self._lock.release()
            raise

    # -- opening ------------------------------------------------------------------------------
    def _make_folder(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(self.root, "exists and is not a folder; choose another output path")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test.{os.getpid()}"
            probe.touch()
            probe.unlink()
        except PermissionError:
            raise StoreError(self.root, "cannot write here (permission denied); choose another output folder") from None
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError(self.root) from None
            reason = exc.strerror or str(exc)
            if exc.errno == errno.ENOTDIR:
                reason = "a part of this path is a file, not a folder"
            raise StoreError(self.root, f"cannot create the store folder ({reason})") from None

    def _open_manifest(self, overwrite: bool | str, meta: Mapping[str, Any] | None) -> dict[str, Any]:
        manifest_path = self.root / MANIFEST_NAME
        existing = [p for p in self.root.iterdir() if p.name not in (LOCK_NAME,)]
        old: dict[str, Any] | None = None
        if manifest_path.exists():
            try:
                old = read_manifest(self.root)
            except StoreError:
                if not overwrite:
                    raise
                old = None
            if old is not None and old.get("kind") != self.kind:
                raise StoreError(self.root, f"holds a {old.get('kind')!r} store, not {self.kind!r}; "
                                            "choose another output path (--overwrite never replaces another kind)")
        elif existing:
            shards = [p for p in existing if _SHARD_RE.match(p.name)]
            what = (f"holds {len(shards)} shard(s) but no {MANIFEST_NAME}, so what made them is unknown"
                    if shards else "is not empty and is not a segsort-unsup store")
            raise StoreError(self.root, f"{what}; choose another output path, or delete the folder to start over")
        replace = bool(overwrite) and overwrite != "changed"
        if overwrite == "changed" and old is not None and old.get("config_hash") != self.config_hash:
            replace = True
            self.replaced_keys = changed_keys(old.get("config", {}), self.config)
        if old is not None and replace:
            self._clear()
            old = None
        if old is not None:
            if old.get("config_hash") != self.config_hash:
                changed = changed_keys(old.get("config", {}), self.config)
                raise StoreError(
                    self.root,
                    f"was written with another configuration (differs in: {', '.join(changed) or 'hash'}); "
                    "pass --overwrite to replace it, or choose another output path",
                )
            return old
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "config": self.config,
            "config_hash": self.config_hash,
            "meta": dict(meta or {}),
            "schema": [vars(d) for d in self.schema.datasets] if self.schema else None,
            "producer": f"segsort-unsup {__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "epoch": uuid.uuid4().hex[:12],
        }
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True, default=str))
        return manifest

    def _clear(self) -> None:
        """Delete the store's contents (the lock is held, so no other run is writing)."""
        for path in self.root.iterdir():
            if path.name == LOCK_NAME:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        fsync_dir(self.root)

    def _load_shards(self, *, verify: bool) -> None:
        files = {p.name: p for p in _shard_files(self.root)}
        indexed = {info.name: info for info in _read_index(self.root)}
        self._index_lines = []
        for name, path in files.items():
            m = re.match(r"^part-(\d{5,})\.h5$", name)
            if m:
                self._next_shard = max(self._next_shard, int(m.group(1)) + 1)
            info = indexed.get(name)
            try:
                if info is not None:
                    if path.stat().st_size != info.size:
                        raise ValueError(f"size {path.stat().st_size} differs from the indexed {info.size}")
                    if verify and sha256_file(path) != info.sha256:
                        raise ValueError("sha256 differs from the one recorded when it was written")
                    _scan_shard(path, verify=False)
                else:  # complete (renamed) but not indexed: a kill between rename and index, or a distributed task
                    keys = _scan_shard(path, verify=True)
                    info = ShardInfo(name, keys, path.stat().st_size, sha256_file(path))
                    self._append_index(info)
            except Exception as exc:  # noqa: BLE001 - any damage: set the shard aside, redo its items
                self._quarantine(path, f"{type(exc).__name__}: {exc}")
                continue
            self.completed.update(info.keys)

    def _quarantine(self, path: Path, reason: str) -> None:
        from ..log import get_logger

        qdir = self.root / QUARANTINE_DIR
        qdir.mkdir(exist_ok=True)
        target = qdir / path.name
        n = 1
        while target.exists():
            target = qdir / f"{path.name}.{n}"
            n += 1
        path.rename(target)
        with open(qdir / "reasons.tsv", "a", encoding="utf-8") as fh:
            fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\t{target.name}\t{_escape(' '.join(reason.split()))}\n")
        self.quarantined.append((path.name, reason))
        get_logger("store").warning("%s: damaged shard set aside in %s (%s); its items will be redone",
                                    path, QUARANTINE_DIR, reason)

    def _append_index(self, info: ShardInfo) -> None:
        with open(self.root / INDEX_NAME, "a", encoding="utf-8") as fh:
            fh.write(info.line() + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    # -- writing ------------------------------------------------------------------------------
    @property
    def epoch(self) -> str | None:
        return self.manifest.get("epoch")

    def add(self, item: Item) -> None:
        """Queue a finished item; it becomes durable when its shard is flushed (a streamed one at once)."""
        if self.schema is not None:
            self.schema.check(item.key, item.arrays)
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(item)
        self._pending_bytes += item_nbytes(item)
        if self._failures.pop(item.key, None) is not None:
            self._failures_dirty = True
        if (len(self._pending) >= self.shard_size or self._pending_bytes >= self.flush_bytes or item.stream
                or time.monotonic() - self._pending_since >= self.flush_seconds):
            self.flush()

    def register_shard(self, info: ShardInfo) -> None:
        """Index a complete shard written by :func:`write_shard` elsewhere (a distributed task)."""
        self._append_index(info)
        self.completed.update(info.keys)
        for key in info.keys:
            if self._failures.pop(key, None) is not None:
                self._failures_dirty = True

    def record_failure(self, key: str, reason: str) -> None:
        """Note a failed item (``failures.tsv``: it stays incomplete and is retried next run)."""
        self._failures[key] = (time.strftime("%Y-%m-%dT%H:%M:%S"), " ".join(reason.split()))
        self._failures_dirty = True

    def new_shard_name(self) -> str:
        name = f"part-{self._next_shard:05d}.h5"
        self._next_shard += 1
        return name

    def flush(self) -> None:
        """Write queued items to a new shard (temp file, fsync, rename), then index it."""
        if self._pending:
            try:
                info = write_shard(self.root, self.new_shard_name(), self._pending, schema=self.schema)
            except BaseException:
                self._pending.clear()  # not durable: these items are redone by the next run
                self._pending_bytes = 0
                raise
            self._append_index(info)
            self.completed.update(info.keys)
            self._pending.clear()
            self._pending_bytes = 0
        self._write_failures()

    def _write_failures(self) -> None:
        if not self._failures_dirty:
            return
        path = self.root / FAILURES_NAME
        if not self._failures:
            path.unlink(missing_ok=True)
        else:
            rows = ["time\tkey\treason"] + [f"{t}\t{_escape(k)}\t{_escape(r)}" for k, (t, r) in sorted(self._failures.items())]
            atomic_write_text(path, "\n".join(rows) + "\n")
        self._failures_dirty = False

    def close(self) -> None:
        """Flush what is queued and release the lock."""
        try:
            self.flush()
        finally:
            self._lock.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Queued items are complete results: keep them even when the run is interrupted.
        self.close()


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------
@dataclass
class Stacked:
    """One dataset of every item, concatenated along axis 0: rows ``offsets[i]:offsets[i+1]`` are ``keys[i]``'s."""

    array: np.ndarray
    keys: list[str]
    offsets: np.ndarray

    def rows(self, key: str) -> np.ndarray:
        i = self.keys.index(key)
        return self.array[self.offsets[i]:self.offsets[i + 1]]


class StoreReader:
    """Read a store: ``keys()``, ``key in store``, ``store[key]`` -> :class:`Item`, ``stack(name)``.

    Checks the manifest's kind and the items' datasets against the kind's schema. Damaged shards
    are skipped and listed in :attr:`damaged` (their items are simply absent); a damaged item
    raises :class:`StoreError` naming the shard and the item when read.
    """

    def __init__(self, root: str | os.PathLike, *, kind: str | None = None, required: tuple[str, ...] = (),
                 verify: bool = True):
        self.root = Path(root)
        self.verify = verify
        self._sha256: dict[Path, str] = {}  # indexed shards: the hash to verify on first use
        self._bad: dict[Path, str] = {}
        self.manifest = read_manifest(self.root)
        if kind is not None and self.manifest.get("kind") != kind:
            raise StoreError(self.root, f"is a {self.manifest.get('kind')!r} store; expected a {kind!r} store")
        self.kind = self.manifest["kind"]
        self.schema = SCHEMAS.get(self.kind)
        self.required = tuple(required) or (self.schema.required if self.schema else ())
        self.damaged: list[tuple[str, str]] = []
        self._index: dict[str, tuple[Path, str]] = {}
        files = {p.name: p for p in _shard_files(self.root)}
        indexed = {info.name: info for info in _read_index(self.root)}
        for name, path in files.items():
            info = indexed.get(name)
            try:
                if info is not None and path.stat().st_size == info.size:
                    keys = info.keys
                    self._sha256[path] = info.sha256
                else:
                    keys = _scan_shard(path, verify=False)
            except Exception as exc:  # noqa: BLE001 - a damaged shard must not hide the good ones
                self.damaged.append((str(path), f"{type(exc).__name__}: {exc}"))
                continue
            for key in keys:
                self._index[key] = (path, quote(key, safe=""))  # later shards win (re-done items)
        if self.damaged:
            from ..log import get_logger

            get_logger("store").warning("%s: %d damaged shard(s) skipped (first: %s); re-run the stage that "
                                        "wrote it to redo their items", self.root, len(self.damaged),
                                        self.damaged[0][0])
        self._open: dict[Path, h5py.File] = {}

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config", {})

    @property
    def config_hash(self) -> str:
        return str(self.manifest.get("config_hash", ""))

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.get("meta", {})

    def failures(self) -> dict[str, tuple[str, str]]:
        return read_failures(self.root)

    def keys(self) -> list[str]:
        return sorted(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def _file(self, shard: Path) -> h5py.File:
        fh = self._open.get(shard)
        if fh is None:
            if shard in self._bad:
                raise StoreError(shard, self._bad[shard])
            expected = self._sha256.pop(shard, None)
            if self.verify and expected is not None and sha256_file(shard) != expected:
                self._bad[shard] = "its sha256 differs from the one recorded when it was written"
                raise StoreError(shard, self._bad[shard])
            if len(self._open) >= 8:
                self._open.pop(next(iter(self._open))).close()
            fh = self._open[shard] = h5py.File(shard, "r")
        return fh

    def __getitem__(self, key: str) -> Item:
        return self.read(key)

    def read(self, key: str, names: tuple[str, ...] | None = None) -> Item:
        """Load one item (all datasets, or only ``names``); checksums are verified as it is read."""
        if key not in self._index:
            raise KeyError(key)
        shard, name = self._index[key]
        try:
            group = self._file(shard)[name]
            missing = [r for r in (self.required if names is None else names) if r not in group]
            if missing:
                raise StoreError(shard, f"item {key!r} lacks datasets {missing}; the store is from another "
                                        "version or stage")
            wanted = names if names is not None else tuple(group.keys())
            arrays = {n: group[n][()] for n in wanted}
            attrs = {k: _decode_attr(v) for k, v in group.attrs.items()}
        except StoreError as exc:
            if exc.path != str(shard):
                raise
            raise StoreError(shard, f"item {key!r} is damaged ({exc.reason}); re-run the stage that wrote it "
                                    "to redo it") from None
        except Exception as exc:  # noqa: BLE001 - h5py raises OSError, KeyError, RuntimeError... on damage
            self._open.pop(shard, None)
            raise StoreError(shard, f"item {key!r} is damaged or unreadable ({type(exc).__name__}: {exc}); "
                                    "re-run the stage that wrote it to redo it") from None
        if self.schema is not None:
            for n, arr in arrays.items():
                spec = self.schema.spec(n)
                if spec is not None and (arr.ndim != spec.ndim):
                    raise StoreError(shard, f"item {key!r}: dataset {n!r} has {arr.ndim} dims, expected {spec.ndim}")
        return Item(key, arrays, attrs)

    def layout(self, key: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Dataset name -> (dtype, shape) of one item, without reading its data."""
        shard, name = self._index[key]
        group = self._file(shard)[name]
        return {n: (str(ds.dtype), tuple(ds.shape)) for n, ds in group.items()}

    def stack(self, name: str, keys: Iterable[str] | None = None) -> tuple[Stacked, list[tuple[str, str]]]:
        """Dataset ``name`` of every item (or of ``keys``) as one table, and the items that failed to read."""
        arrays, done, failed = [], [], []
        for key in (self.keys() if keys is None else list(keys)):
            try:
                arrays.append(self.read(key, (name,)).arrays[name])
                done.append(key)
            except (StoreError, KeyError) as exc:
                failed.append((key, str(exc)))
        sizes = np.array([len(a) for a in arrays], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if arrays:
            table = np.concatenate(arrays, axis=0)
        else:
            spec = self.schema.spec(name) if self.schema else None
            dtype = np.dtype(spec.dtype) if spec else np.float32
            table = np.zeros((0,), dtype)
        return Stacked(table, done, offsets), failed

    def contents_digest(self) -> str:
        """sha256 over every key and the sha256 of the shard holding it: what a store computed from
        this one is computed from (it changes when items are added, removed or recomputed)."""
        import hashlib

        digest = hashlib.sha256()
        for key in sorted(self._index):
            shard = self._index[key][0]
            if shard not in self._sha256:  # a shard missing from the index: hashed once, here
                from .atomic import sha256_file

                self._sha256[shard] = sha256_file(shard)
            digest.update(f"{key}\0{self._sha256[shard]}\n".encode())
        return digest.hexdigest()

    def close(self) -> None:
        for fh in self._open.values():
            with contextlib.suppress(Exception):
                fh.close()
        self._open.clear()

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Per-process reader cache (worker processes read their input stores through it)
# --------------------------------------------------------------------------------------------
_READERS: dict[tuple[str, str | None], StoreReader] = {}


def cached_reader(root: str | os.PathLike, *, kind: str | None = None) -> StoreReader:
    """A reader kept open for this process (closed by :func:`close_readers`)."""
    key = (str(Path(root).resolve()), kind)
    reader = _READERS.get(key)
    if reader is None:
        reader = _READERS[key] = StoreReader(root, kind=kind)
    return reader


def close_readers() -> None:
    """Close every cached reader (stage teardown, worker exit)."""
    for reader in _READERS.values():
        reader.close()
    _READERS.clear()


import atexit  # noqa: E402 - registered once the function exists

atexit.register(close_readers)
