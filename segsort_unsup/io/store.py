"""Sharded HDF5 stores: atomic, resumable, self-describing.

A store is a folder::

    out/contours/
      store.json          kind, format version, config + its hash, producer (written first, atomically)
      part-00000.h5       complete shards: one HDF5 group per item
      part-00001.h5
      .part-00002.h5.tmp  a shard being written (never read; removed on the next run)
      failures.tsv        items that failed, with the reason (appended)

A shard is written to a temporary name and renamed into place only once it is closed,
so a killed run leaves complete shards plus at most one stale temporary file: re-running
the stage skips every item found in a complete shard and redoes the rest. A lock file keeps
two runs from writing the same store at once.

Inside a shard, each item is the group ``/<quoted key>`` holding the item's datasets
(chunked, gzip-compressed) and attrs; the group's ``key`` attr holds the unquoted key.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import h5py
import numpy as np

from .. import __version__
from ..errors import StoreError

FORMAT_VERSION = 1
MANIFEST_NAME = "store.json"
FAILURES_NAME = "failures.tsv"
LOCK_NAME = ".lock"
_SHARD_RE = re.compile(r"^part-(\d{5,})\.h5$")


@dataclass
class Item:
    """One stored item: its key, named arrays and scalar/string attrs."""

    key: str
    arrays: dict[str, np.ndarray]
    attrs: dict[str, Any] = field(default_factory=dict)


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable short hash of a JSON-able configuration mapping."""
    blob = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shards(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if _SHARD_RE.match(p.name)), key=lambda p: p.name)


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


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The store's manifest, or a :class:`StoreError` saying why it is not a store."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise StoreError(root, "no such store (expected a folder written by segsort-unsup)")
    if not path.is_file():
        raise StoreError(root, f"not a segsort-unsup store ({MANIFEST_NAME} missing)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(path, f"unreadable store manifest ({exc}); re-run the stage with --overwrite") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StoreError(root, f"store format {manifest.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    return manifest


class StoreWriter:
    """Append items to a store in atomically renamed shards; resumable.

    Parameters
    ----------
    root : folder of the store (created if missing).
    kind : what the store holds (``"contours"``, ``"segments"``...), checked on resume.
    config : the producing stage's configuration; its hash must match on resume.
    meta : extra provenance recorded in the manifest (weights sha256, source store...).
    shard_size : items per shard; a killed run loses at most this many finished items.
    flush_seconds : also close a shard when it has been open this long.
    overwrite : delete an existing store at ``root`` first.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        kind: str,
        config: Mapping[str, Any],
        meta: Mapping[str, Any] | None = None,
        shard_size: int = 64,
        flush_seconds: float = 120.0,
        overwrite: bool = False,
    ):
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.root = Path(root)
        self.kind = kind
        self.shard_size = shard_size
        self.flush_seconds = flush_seconds
        self._pending: list[Item] = []
        self._pending_since = 0.0
        self._lock_fh = None
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(self.root, "exists and is not a folder; choose another output path")
        if overwrite and self.root.exists() and any(self.root.iterdir()):
            if not (self.root / MANIFEST_NAME).exists():
                raise StoreError(self.root, "refusing to overwrite a folder that is not a segsort-unsup store")
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock()
        self.config = dict(config)
        self.config_hash = config_hash(self.config)
        manifest_path = self.root / MANIFEST_NAME
        if manifest_path.exists():
            old = read_manifest(self.root)
            if old.get("kind") != kind:
                self._unlock()
                raise StoreError(self.root, f"holds a {old.get('kind')!r} store, not {kind!r}; choose another output path")
            if old.get("config_hash") != self.config_hash:
                self._unlock()
                changed = sorted(k for k in set(old.get("config", {})) | set(self.config)
                                 if old.get("config", {}).get(k) != self.config.get(k))
                raise StoreError(
                    self.root,
                    f"was written with another configuration (differs in: {', '.join(changed) or 'hash'}); "
                    "pass --overwrite to replace it, or choose another output path",
                )
            self.manifest = old
        else:
            self.manifest = {
                "format_version": FORMAT_VERSION,
                "kind": kind,
                "config": self.config,
                "config_hash": self.config_hash,
                "meta": dict(meta or {}),
                "producer": f"segsort-unsup {__version__}",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            _atomic_write_text(manifest_path, json.dumps(self.manifest, indent=2, sort_keys=True, default=str))
        for stale in self.root.glob(".part-*.h5.tmp"):
            stale.unlink()
        self.completed: set[str] = set()
        self._next_shard = 0
        for shard in _shards(self.root):
            self._next_shard = max(self._next_shard, int(_SHARD_RE.match(shard.name).group(1)) + 1)
            try:
                with h5py.File(shard, "r") as fh:
                    self.completed.update(_decode_attr(fh[name].attrs.get("key", unquote(name))) for name in fh)
            except OSError as exc:
                # Cannot happen through this writer (shards are renamed only when complete), but a
                # disk error or a foreign tool might leave one: keep it aside and redo its items.
                bad = shard.with_name(shard.name + ".corrupt")
                shard.rename(bad)
                from ..log import get_logger

                get_logger("store").warning("%s: unreadable shard moved to %s (%s); its items will be redone", shard, bad.name, exc)

    # -- locking -----------------------------------------------------------------------------
    def _lock(self) -> None:
        self._lock_fh = open(self.root / LOCK_NAME, "w")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_fh.close()
            self._lock_fh = None
            raise StoreError(self.root, "another segsort-unsup run is writing this store; wait for it or choose another output") from None

    def _unlock(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    # -- writing -----------------------------------------------------------------------------
    def add(self, item: Item) -> None:
        """Queue a finished item; it becomes durable when its shard is flushed."""
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(item)
        if len(self._pending) >= self.shard_size or time.monotonic() - self._pending_since >= self.flush_seconds:
            self.flush()

    def record_failure(self, key: str, reason: str) -> None:
        """Append a failed item to ``failures.tsv`` (it stays incomplete and is retried next run)."""
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\t{key}\t{' '.join(reason.split())}\n"
        with open(self.root / FAILURES_NAME, "a", encoding="utf-8") as fh:
            fh.write(line)

    def flush(self) -> None:
        """Write queued items to a new shard: temp file, fsync, rename."""
        if not self._pending:
            return
        final = self.root / f"part-{self._next_shard:05d}.h5"
        tmp = self.root / f".{final.name}.tmp"
        try:
            with h5py.File(tmp, "w") as fh:
                for item in self._pending:
                    group = fh.create_group(quote(item.key, safe=""))
                    group.attrs["key"] = item.key
                    for name, value in item.attrs.items():
                        group.attrs[name] = _attr_value(value)
                    for name, arr in item.arrays.items():
                        arr = np.ascontiguousarray(arr)
                        if arr.ndim >= 2 and arr.size >= 4096:
                            group.create_dataset(name, data=arr, chunks=True, compression="gzip",
                                                 compression_opts=1, shuffle=True)
                        else:
                            group.create_dataset(name, data=arr)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.completed.update(item.key for item in self._pending)
        self._pending.clear()
        self._next_shard += 1

    def close(self) -> None:
        """Flush what is queued and release the lock."""
        try:
            self.flush()
        finally:
            self._unlock()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Items in the queue are complete results: keep them even when the run is interrupted.
        self.close()


class StoreReader:
    """Read a store: ``keys()``, ``item in store``, ``store[key]`` -> :class:`Item`.

    Checks the manifest's kind and verifies that each item holds the ``required`` datasets.
    """

    def __init__(self, root: str | os.PathLike, *, kind: str | None = None, required: tuple[str, ...] = ()):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if kind is not None and self.manifest.get("kind") != kind:
            raise StoreError(self.root, f"is a {self.manifest.get('kind')!r} store; expected a {kind!r} store")
        self.kind = self.manifest["kind"]
        self.required = required
        self._index: dict[str, tuple[Path, str]] = {}
        for shard in _shards(self.root):
            try:
                with h5py.File(shard, "r") as fh:
                    for name in fh:
                        key = _decode_attr(fh[name].attrs.get("key", unquote(name)))
                        self._index[key] = (shard, name)  # later shards win (re-done items)
            except OSError as exc:
                raise StoreError(shard, f"corrupt shard ({exc}); delete it and re-run the stage to redo its items") from None
        self._open: dict[Path, h5py.File] = {}

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config", {})

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.get("meta", {})

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
            if len(self._open) >= 8:
                self._open.pop(next(iter(self._open))).close()
            try:
                fh = self._open[shard] = h5py.File(shard, "r")
            except OSError as exc:
                raise StoreError(shard, f"corrupt shard ({exc}); delete it and re-run the stage") from None
        return fh

    def __getitem__(self, key: str) -> Item:
        return self.read(key)

    def read(self, key: str, names: tuple[str, ...] | None = None) -> Item:
        """Load one item (all datasets, or only ``names``)."""
        if key not in self._index:
            raise KeyError(key)
        shard, name = self._index[key]
        try:
            group = self._file(shard)[name]
            missing = [r for r in self.required if r not in group]
            if missing:
                raise StoreError(shard, f"item {key!r} lacks datasets {missing}; the store is from another version or stage")
            wanted = names if names is not None else tuple(group.keys())
            arrays = {n: group[n][()] for n in wanted}
            attrs = {k: _decode_attr(v) for k, v in group.attrs.items()}
        except (OSError, KeyError) as exc:
            raise StoreError(shard, f"cannot read item {key!r} ({exc}); delete the shard and re-run the stage") from None
        return Item(key, arrays, attrs)

    def close(self) -> None:
        for fh in self._open.values():
            fh.close()
        self._open.clear()

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
