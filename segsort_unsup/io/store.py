"""Sharded HDF5 stores: atomic, resumable, checksummed, self-describing.

A store is a folder::

    out/contours/
      store.json          kind, format version, identity (config + provenance) and its hash, producer
      index.jsonl         one line per complete shard: its name, keys, size, sha256 and, per item, what
                          it was computed from (appended); a ``forget`` line withdraws items to redo
      journal.jsonl       write-ahead records: each shard's name, keys, size and sha256, appended
                          before the shard is renamed into place
      part-00000.h5       complete shards: one HDF5 group per item
      part-r1a2b-t00003.h5  a shard written by a distributed task (unique name per task)
      .part-00002.h5.<pid>.tmp  a shard being written (never read; removed on the next run)
      failures.tsv        items that failed in the last run, with the reason (header + one row each)
      quarantine/         shards found damaged or not written by this store, set aside with the reason
      .clearing           only while ``--overwrite`` empties the folder: a run killed then is finished
                          by the next run of the same kind of store

A shard is written to a temporary name, fsynced, recorded in ``journal.jsonl`` (name, size,
sha256) and only then renamed into place; its line is then appended to ``index.jsonl``. A killed
run leaves complete shards (at most one without its index line: its journal record vouches for
it, and it is verified and adopted on the next run) plus temporary files that the next run
deletes. Only shards that this store recorded are trusted: any other ``part-*.h5`` (one copied
in from another store) is set aside in ``quarantine/``. A lock (taken before anything is
deleted) keeps two runs out of one store, ``--overwrite`` included.

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
import math
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
JOURNAL_NAME = "journal.jsonl"
FAILURES_NAME = "failures.tsv"
LOCK_NAME = ".lock"
CLEARING_NAME = ".clearing"  # present while --overwrite empties the folder (store.json goes last)
MAX_MANIFEST_DEPTH = 32
QUARANTINE_DIR = "quarantine"
FLUSH_BYTES = 256 * 2**20  # queued item bytes that close a shard (huge images are written at once)
_SHARD_RE = re.compile(r"^part-[A-Za-z0-9_-]+\.h5$")
_GZIP_MIN = 4096  # values; smaller datasets are stored uncompressed (still chunked and checksummed)
_DEFLATE_MAX_RATIO = 1100  # deflate never expands data more than 1032-fold
_COMPACT_MAX = 64 * 1024  # an HDF5 compact dataset lives in its object header (at most 64 KiB)
_KNOWN_FILTERS = frozenset({h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_FLETCHER32})


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
    """What a store kind holds: its datasets, declared once (``rows``: datasets whose first
    dimension is the same count in every item, e.g. one row per segment)."""

    kind: str
    datasets: tuple[DatasetSpec, ...]
    rows: tuple[str, ...] = ()

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
), rows=("parents", "altitudes")))
PROTOTYPES = register_schema(StoreSchema("prototypes", (
    DatasetSpec("prototypes", "float32", 2),  # K x D, unit norm
    DatasetSpec("segments", "int32", 2),  # segment label map (H, W), ids 0..K-1
    DatasetSpec("area", "int64", 1),  # pixels per segment
    DatasetSpec("bbox", "int32", 2),  # K x 4: y0, x0, y1, x1 (exclusive)
    DatasetSpec("label", "int32", 1, optional=True),  # majority class per segment (labelled sets)
    DatasetSpec("views", "int32", 3, optional=True),  # V x H x W segment maps of every view (multi-view embed)
    DatasetSpec("votes", "float32", 2, optional=True),
), rows=("prototypes", "area", "bbox", "label")))
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
    """A complete shard: file name, the keys it holds, its size and sha256, and (per-item stages)
    each item's input fingerprint (what it was computed from; see :mod:`segsort_unsup.io.sources`)."""

    name: str
    keys: tuple[str, ...]
    size: int
    sha256: str
    inputs: Mapping[str, str] = field(default_factory=dict, compare=False)

    def record(self) -> dict[str, Any]:
        data = {"shard": self.name, "keys": list(self.keys), "size": self.size, "sha256": self.sha256}
        if self.inputs:
            data["inputs"] = dict(self.inputs)
        return data

    def line(self) -> str:
        return json.dumps(self.record())

    @classmethod
    def from_record(cls, d: Mapping[str, Any]) -> ShardInfo:
        inputs = d.get("inputs") or {}
        if not isinstance(inputs, dict):
            raise TypeError("inputs is not a mapping")
        return cls(str(d["shard"]), tuple(str(k) for k in d["keys"]), int(d["size"]), str(d["sha256"]),
                   {str(k): str(v) for k, v in inputs.items()})


@dataclass(frozen=True)
class _Forget:
    """An index line withdrawing items (their input changed: they are redone, never served stale)."""

    keys: tuple[str, ...]


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
    if (root / CLEARING_NAME).exists():
        raise StoreError(root, "an --overwrite of this store was interrupted while it emptied the folder; "
                               "re-run the stage that writes it to finish (its items are recomputed)")
    if not path.is_file():
        raise StoreError(root, f"not a segsort-unsup store ({MANIFEST_NAME} missing)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise StoreError(path, f"unreadable store manifest ({reason}); re-run the stage with --overwrite") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("kind"), str):
        raise StoreError(path, "not a store manifest (expected a JSON object with a 'kind'); "
                               "re-run the stage with --overwrite or choose another output")
    _check_manifest_fields(path, manifest)
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise StoreError(root, f"store format {manifest.get('format_version')} is not supported by "
                               f"segsort-unsup {__version__} (reads {READABLE_VERSIONS})")
    return manifest


def _json_depth(value: Any) -> int:
    """Nesting depth of a JSON value (iterative: a hostile file cannot exhaust the stack)."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            depth = max(depth, level)
            if depth > MAX_MANIFEST_DEPTH:
                return depth
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return depth


def _check_manifest_fields(path: Path, manifest: dict[str, Any]) -> None:
    """The manifest's fields have the types this package writes (one line naming the field, else)."""
    if _json_depth(manifest) > MAX_MANIFEST_DEPTH:
        raise StoreError(path, f"store manifest nested deeper than {MAX_MANIFEST_DEPTH} levels; not written by "
                               "segsort-unsup: re-run the stage with --overwrite or choose another output")
    for name, types in (("config", dict), ("meta", dict), ("config_hash", str), ("epoch", (str, type(None)))):
        if name in manifest and not isinstance(manifest[name], types):
            raise StoreError(path, f"store manifest field {name!r} is a {type(manifest[name]).__name__}, not "
                                   f"what segsort-unsup writes; re-run the stage with --overwrite or choose "
                                   "another output")


def _read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The JSON objects of a ``.jsonl`` file (a torn last line, from a kill mid-append, is skipped)."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                d = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(d, dict):
                yield d


def _read_index_entries(root: Path) -> list[ShardInfo | _Forget]:
    """``index.jsonl`` in order: shard lines and ``forget`` lines."""
    entries: list[ShardInfo | _Forget] = []
    for d in _read_records(root / INDEX_NAME):
        try:
            entries.append(_Forget(tuple(str(k) for k in d["forget"])) if "forget" in d else ShardInfo.from_record(d))
        except (ValueError, KeyError, TypeError):
            continue
    return entries


def _read_journal(root: Path) -> dict[str, tuple[ShardInfo, str | None]]:
    """Write-ahead records by shard name: (what the shard must be, the store epoch it was written for)."""
    records: dict[str, tuple[ShardInfo, str | None]] = {}
    for d in _read_records(root / JOURNAL_NAME):
        try:
            records[str(d["shard"])] = (ShardInfo.from_record(d), None if d.get("epoch") is None else str(d["epoch"]))
        except (ValueError, KeyError, TypeError):
            continue
    return records


def _append_line(path: Path, line: str) -> None:
    """Append one line durably, in one write (concurrent appenders never interleave within a line)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


class _Untrusted(ValueError):
    """A shard file no record of this store vouches for (copied in from elsewhere, or replaced)."""


def _vouch(path: Path, indexed: ShardInfo | None, journal: tuple[ShardInfo, str | None] | None, *,
           legacy: bool, epoch: str | None, verify: bool) -> tuple[ShardInfo, bool]:
    """The record that vouches for a shard file and whether it must still be indexed; raises
    :class:`_Untrusted` or another error saying why the shard is not trusted.

    With ``verify`` the whole file is hashed (and an unindexed shard read through); without it
    the caller verifies the sha256 when it first opens the shard.
    """
    size = path.stat().st_size
    if indexed is not None:
        if size != indexed.size:
            raise _Untrusted(f"size {size} differs from the indexed {indexed.size} (replaced or truncated)")
        if verify:
            if sha256_file(path) != indexed.sha256:
                raise ValueError("sha256 differs from the one recorded when it was written")
            _scan_shard(path, verify=False)
        return indexed, False
    if legacy:  # a 0.1 store: no records at all, the shards are all there is
        keys = _scan_shard(path, verify=verify)
        return ShardInfo(path.name, keys, size, sha256_file(path) if verify else ""), True
    if journal is None:
        raise _Untrusted("this store has no record of writing it (not in index.jsonl or journal.jsonl): "
                         "a shard copied in from elsewhere")
    record, written_for = journal
    if written_for is not None and epoch is not None and written_for != epoch:
        raise _Untrusted("written for an earlier store in this folder (before an --overwrite)")
    if size != record.size or (verify and sha256_file(path) != record.sha256):
        raise _Untrusted("differs from the shard this store recorded before renaming it into place")
    keys = _scan_shard(path, verify=verify)
    if sorted(keys) != sorted(record.keys):
        raise _Untrusted("holds other items than the ones this store recorded for it")
    return record, True


def _replay(entries: Iterable[ShardInfo | _Forget],
            trusted: Mapping[str, ShardInfo]) -> dict[str, tuple[str, str | None]]:
    """Key -> (shard name, input fingerprint) after the index's lines in order: later shards win,
    ``forget`` lines withdraw keys; lines of shards not in ``trusted`` are skipped."""
    where: dict[str, tuple[str, str | None]] = {}
    for entry in entries:
        if isinstance(entry, _Forget):
            for key in entry.keys:
                where.pop(key, None)
        elif trusted.get(entry.name) is entry:
            for key in entry.keys:
                where[key] = (entry.name, entry.inputs.get(key))
    return where


def _scan_shard(path: Path, *, verify: bool) -> tuple[str, ...]:
    """Keys held by a shard file; with ``verify``, every dataset is checked and read (checksums checked)."""
    keys = []
    with h5py.File(path, "r") as fh:
        for name in fh:
            group = fh[name]
            keys.append(str(_decode_attr(group.attrs.get("key", unquote(name)))))
            if verify:
                for ds_name, ds in group.items():
                    check_declared_size(ds, f"item {name!r}: dataset {ds_name!r}")
                    ds[()]
                dict(group.attrs)
    return tuple(keys)


def memory_limit() -> int:
    """Bytes of physical memory (no single read may declare more)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - platforms without sysconf
        return 1 << 40


def check_declared_size(ds: h5py.Dataset, what: str) -> int:
    """The bytes a dataset declares, once checked against what its file holds for it.

    Raises ``ValueError`` naming ``what`` before anything is allocated when the file cannot hold
    what the dataset declares: chunks missing (they would read as fill values), more bytes than
    its stored bytes can decompress to, storage outside the file, filters this package never
    writes, or more than this machine's memory.
    """
    nbytes = math.prod(ds.shape or ()) * ds.dtype.itemsize
    if ds.is_virtual or ds.external:
        raise ValueError(f"{what} is stored outside its shard (virtual or external storage)")
    plist = ds.id.get_create_plist()
    filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
    if filters - _KNOWN_FILTERS:
        raise ValueError(f"{what} uses HDF5 filters {sorted(filters - _KNOWN_FILTERS)} that segsort-unsup never writes")
    stored = ds.id.get_storage_size()
    layout = plist.get_layout()
    if layout == h5py.h5d.CHUNKED:
        expected = math.prod(-(-n // c) for n, c in zip(ds.shape, ds.chunks))
        present = ds.id.get_num_chunks() if expected else 0
        if present != expected:
            raise ValueError(f"{what} declares shape {ds.shape} but stores {present} of its {expected} chunks")
        capacity = stored * (_DEFLATE_MAX_RATIO if h5py.h5z.FILTER_DEFLATE in filters else 1)
    else:
        capacity = stored if layout == h5py.h5d.CONTIGUOUS else _COMPACT_MAX
    if nbytes > capacity:
        raise ValueError(f"{what} declares shape {ds.shape} {ds.dtype} ({nbytes} bytes), more than its "
                         f"{stored} stored bytes can hold")
    if nbytes > memory_limit():
        raise ValueError(f"{what} declares {nbytes / 2**30:.1f} GiB, more than this machine's memory")
    return nbytes


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
                schema: StoreSchema | None = None, epoch: str | None = None,
                inputs: Mapping[str, str] | None = None) -> ShardInfo:
    """Write ``items`` as the complete shard ``root/name`` (temp file, fsync, journal record,
    rename) and describe it.

    Used by the store writer and, directly, by distributed tasks (which return the
    :class:`ShardInfo` for the client to index). With ``epoch``, the shard is only committed
    while the store's manifest still carries that epoch (an ``--overwrite`` in between makes a
    late task fail instead of writing into the new store). ``inputs``: each item's input
    fingerprint, recorded with the shard.
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
        keys = tuple(it.key for it in items)
        info = ShardInfo(name, keys, tmp.stat().st_size, sha256_file(tmp),
                         {k: inputs[k] for k in keys if inputs and inputs.get(k) is not None})
        _append_line(root / JOURNAL_NAME, json.dumps({**info.record(), "epoch": epoch}))  # write-ahead
        commit_temp(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise DiskFullError(root, needed) from None
        raise
    return info


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
        self.inputs: dict[str, str] = {}  # key -> input fingerprint recorded with the item
        self.quarantined: list[tuple[str, str]] = []  # (shard, reason)
        self.replaced_keys: list[str] = []  # with overwrite="changed": what differed
        self._pending: list[Item] = []
        self._pending_inputs: dict[str, str] = {}
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
        if (self.root / CLEARING_NAME).exists():
            self._finish_interrupted_clear()
        elif manifest_path.exists():
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
                what = ("was computed from an input that has changed since" if changed and
                        all(k.startswith("source") for k in changed) else "was written with another configuration")
                raise StoreError(self.root, f"{what} (differs in: {', '.join(changed) or 'hash'}); "
                                            "pass --overwrite to replace it, or choose another output path")
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
        if (self.root / CLEARING_NAME).exists():
            (self.root / CLEARING_NAME).unlink()
            fsync_dir(self.root)
        return manifest

    def _finish_interrupted_clear(self) -> None:
        from ..log import get_logger

        try:
            kind = json.loads((self.root / CLEARING_NAME).read_text(encoding="utf-8"))["kind"]
        except (OSError, ValueError, RecursionError, KeyError, TypeError):
            kind = None
        if kind != self.kind:
            raise StoreError(self.root, f"an --overwrite of the {kind!r} store here was interrupted; re-run the "
                                        "stage that writes it to finish, or choose another output path")
        get_logger("store").warning("%s: an --overwrite was interrupted while emptying this folder; finishing it "
                                    "(every item is recomputed)", self.root)
        self._clear()

    def _clear(self) -> None:
        """Delete the store's contents (the lock is held, so no other run is writing).

        A marker goes first and ``store.json`` last: a run killed in between leaves a folder that the
        next run of this stage recognises and finishes emptying (and that no reader takes for a store).
        """
        marker = self.root / CLEARING_NAME
        if not marker.exists():
            atomic_write_text(marker, json.dumps({"kind": self.kind}))
        for path in self.root.iterdir():
            if path.name in (LOCK_NAME, CLEARING_NAME, MANIFEST_NAME):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        (self.root / MANIFEST_NAME).unlink(missing_ok=True)
        fsync_dir(self.root)

    def _load_shards(self, *, verify: bool) -> None:
        """Trust the shards this store recorded (verified), adopt a recorded one left unindexed by a
        kill, set every other one aside, then replay the index: what is complete, from which inputs."""
        entries = _read_index_entries(self.root)
        indexed = {e.name: e for e in entries if isinstance(e, ShardInfo)}
        journal = _read_journal(self.root)
        legacy = self.manifest.get("format_version") == 1 and not indexed and not journal
        trusted: dict[str, ShardInfo] = {}
        for name in [*indexed, *journal]:
            self._bump_next_shard(name)
        for name, path in {p.name: p for p in _shard_files(self.root)}.items():
            self._bump_next_shard(name)
            try:
                info, adopt = _vouch(path, indexed.get(name), journal.get(name), legacy=legacy,
                                     epoch=self.epoch, verify=verify)
            except _Untrusted as exc:
                self._quarantine(path, str(exc), what="a shard this store did not write")
                continue
            except Exception as exc:  # noqa: BLE001 - any damage: set the shard aside, redo its items
                self._quarantine(path, f"{type(exc).__name__}: {exc}")
                continue
            if adopt:  # renamed but not indexed: a kill between rename and index, or a distributed task
                self._append_index(info)
                entries.append(info)
            trusted[name] = info
        where = _replay(entries, trusted)
        self.completed = set(where)
        self.inputs = {key: fp for key, (_, fp) in where.items() if fp is not None}

    def _bump_next_shard(self, name: str) -> None:
        m = re.match(r"^part-(\d{5,})\.h5$", name)
        if m:  # never reuse a recorded name (a quarantined shard's index line stays)
            self._next_shard = max(self._next_shard, int(m.group(1)) + 1)

    def _quarantine(self, path: Path, reason: str, *, what: str = "damaged shard") -> None:
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
        get_logger("store").warning("%s: %s set aside in %s (%s); its items will be redone",
                                    path, what, QUARANTINE_DIR, reason)

    def _append_index(self, info: ShardInfo | _Forget) -> None:
        line = json.dumps({"forget": list(info.keys)}) if isinstance(info, _Forget) else info.line()
        _append_line(self.root / INDEX_NAME, line)

    # -- writing ------------------------------------------------------------------------------
    @property
    def epoch(self) -> str | None:
        return self.manifest.get("epoch")

    def add(self, item: Item, *, input_id: str | None = None) -> None:
        """Queue a finished item; it becomes durable when its shard is flushed (a streamed one at once).

        ``input_id``: the fingerprint of what the item was computed from (recorded in the index; a
        later run compares it to tell a changed input)."""
        if self.schema is not None:
            self.schema.check(item.key, item.arrays)
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(item)
        if input_id is not None:
            self._pending_inputs[item.key] = input_id
        self._pending_bytes += item_nbytes(item)
        if self._failures.pop(item.key, None) is not None:
            self._failures_dirty = True
        if (len(self._pending) >= self.shard_size or self._pending_bytes >= self.flush_bytes or item.stream
                or time.monotonic() - self._pending_since >= self.flush_seconds):
            self.flush()

    def register_shard(self, info: ShardInfo) -> None:
        """Index a complete shard written by :func:`write_shard` elsewhere (a distributed task)."""
        self._append_index(info)
        self._completed_shard(info)
        for key in info.keys:
            if self._failures.pop(key, None) is not None:
                self._failures_dirty = True

    def _completed_shard(self, info: ShardInfo) -> None:
        self.completed.update(info.keys)
        for key in info.keys:
            if key in info.inputs:
                self.inputs[key] = info.inputs[key]
            else:
                self.inputs.pop(key, None)

    def forget(self, keys: Iterable[str]) -> None:
        """Withdraw complete items (their input changed): a ``forget`` line in the index, so they are
        never served again and are redone, even if this run is killed before redoing them."""
        keys = tuple(k for k in keys if k in self.completed)
        if keys:
            self._append_index(_Forget(keys))
            self.completed.difference_update(keys)
            for key in keys:
                self.inputs.pop(key, None)

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
                info = write_shard(self.root, self.new_shard_name(), self._pending, schema=self.schema,
                                   epoch=self.epoch, inputs=self._pending_inputs)
            except BaseException:
                self._pending.clear()  # not durable: these items are redone by the next run
                self._pending_inputs.clear()
                self._pending_bytes = 0
                raise
            self._append_index(info)
            self._completed_shard(info)
            self._pending.clear()
            self._pending_inputs.clear()
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
        self._shard_sha: dict[Path, str] = {}
        entries = _read_index_entries(self.root)
        indexed = {e.name: e for e in entries if isinstance(e, ShardInfo)}
        journal = _read_journal(self.root)
        legacy = self.manifest.get("format_version") == 1 and not indexed and not journal
        trusted: dict[str, ShardInfo] = {}
        files = {p.name: p for p in _shard_files(self.root)}
        for name, path in files.items():
            try:  # an indexed shard is opened (and hashed) when first read; others are opened now
                info, unindexed = _vouch(path, indexed.get(name), journal.get(name), legacy=legacy,
                                         epoch=self.manifest.get("epoch"), verify=False)
            except Exception as exc:  # noqa: BLE001 - a damaged or foreign shard must not hide the good ones
                self.damaged.append((str(path), f"{type(exc).__name__}: {exc}"))
                continue
            trusted[name] = info
            if info.sha256:
                self._sha256[path] = self._shard_sha[path] = info.sha256
            if unindexed:
                entries.append(info)
        for key, (name, _) in _replay(entries, trusted).items():
            self._index[key] = (files[name], quote(key, safe=""))
        if self.damaged:
            from ..log import get_logger

            get_logger("store").warning("%s: %d damaged or unrecorded shard(s) skipped (first: %s: %s); re-run "
                                        "the stage that wrote it to redo their items", self.root,
                                        len(self.damaged), *self.damaged[0])
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

    def shard_sha256(self, key: str) -> str:
        """The sha256 of the shard holding ``key`` (recorded when it was written; hashed for a 0.1 store)."""
        shard = self._index[key][0]
        if shard not in self._shard_sha:
            self._shard_sha[shard] = sha256_file(shard)
        return self._shard_sha[shard]

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
            self._check_rows(key, group, wanted)
            for n in wanted:
                check_declared_size(group[n], f"item {key!r}: dataset {n!r}")
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

    def _check_rows(self, key: str, group: h5py.Group, wanted: Iterable[str]) -> None:
        """Datasets that count the same rows (one per segment...) must agree before any is read."""
        rows = self.schema.rows if self.schema is not None else ()
        if not set(rows) & set(wanted):
            return
        counts = {n: group[n].shape[0] for n in rows if n in group and group[n].ndim > 0}
        if len(set(counts.values())) > 1:
            raise ValueError(f"datasets disagree on the number of rows ({', '.join(f'{n}: {c}' for n, c in counts.items())})")

    def layout(self, key: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Dataset name -> (dtype, shape) of one item, without reading its data."""
        shard, name = self._index[key]
        group = self._file(shard)[name]
        return {n: (str(ds.dtype), tuple(ds.shape)) for n, ds in group.items()}

    def stack(self, name: str, keys: Iterable[str] | None = None) -> tuple[Stacked, list[tuple[str, str]]]:
        """Dataset ``name`` of every item (or of ``keys``) as one table, and the items that failed to read."""
        arrays, done, failed = [], [], []
        keys = self.keys() if keys is None else list(keys)
        self._check_stack_size(name, keys)
        for key in keys:
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

    def _check_stack_size(self, name: str, keys: list[str]) -> None:
        """Refuse a table larger than this machine's memory (summed from the declared shapes) up front."""
        total = 0
        for key in keys:
            with contextlib.suppress(Exception):  # an unreadable item is reported by the read itself
                dtype, shape = self.layout(key)[name]
                total += math.prod(shape) * np.dtype(dtype).itemsize
        if total > memory_limit():
            raise StoreError(self.root, f"dataset {name!r} of {len(keys)} items declares {total / 2**30:.1f} GiB, "
                                        "more than this machine's memory; the store is damaged or not from "
                                        "segsort-unsup")

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
