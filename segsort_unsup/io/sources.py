"""What a store was computed from: fingerprints of its inputs, per item and as a whole.

Per-item stages (contours, ucm, embed) record with every item a fingerprint of the input it was
computed from (in the store's index). On resume, an item whose input is new is simply to do, and
one whose input changed is withdrawn and recomputed (:class:`~segsort_unsup.stages.StageRun`):

* an image file (and any companion file, e.g. a label PNG): its size, mtime and sha256. A file
  whose size and mtime are unchanged is not read again; one that was touched or copied but holds
  the same bytes is not recomputed.
* an item of an upstream store: the sha256 of the shard holding it (a recomputed upstream item
  lands in a new shard, so its downstream item is recomputed too).

Whole-input stages (discover, train) put :func:`input_fingerprint` of their input into their
identity: a grown or changed input changes the identity, so the stage recomputes (pipelines) or
refuses with a line naming ``source_content`` (single commands without ``--overwrite``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from .atomic import sha256_file

_FILES = "f1"
_SHARD = "s1"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class ItemSources(Protocol):
    """What each item of a per-item stage is computed from (picklable: distributed tasks use it)."""

    def snapshot(self, keys: Iterable[str]) -> None:
        """Note the cheap state (file stats) of the inputs of items about to be computed."""

    def fingerprint(self, key: str) -> str | None:
        """The fingerprint to record with ``key``'s item once computed (``None``: unknown input)."""

    def unchanged(self, key: str, recorded: str | None) -> bool:
        """Whether ``key``'s input still matches the fingerprint recorded with its item."""

    def subset(self, keys: Iterable[str]) -> ItemSources:
        """The same, for ``keys`` only (what a distributed task carries)."""


class FileSources:
    """Items computed from files: ``key -> paths`` (an image, plus e.g. its label PNG)."""

    def __init__(self, files: Mapping[str, Sequence[str | os.PathLike | None]],
                 stats: Mapping[str, str] | None = None):
        self.files = {k: tuple(str(p) for p in paths if p is not None) for k, paths in files.items()}
        self._stats: dict[str, str] = dict(stats or {})

    def _stat(self, key: str) -> str:
        parts = []
        for path in self.files.get(key, ()):
            try:
                st = os.stat(path)
                parts.append(f"{st.st_size}:{st.st_mtime_ns}")
            except OSError:
                parts.append("missing")
        return _digest("|".join(parts))

    def _content(self, key: str) -> str:
        parts = []
        for path in self.files.get(key, ()):
            try:
                parts.append(sha256_file(path))
            except OSError:
                parts.append("missing")
        return _digest("|".join(parts))

    def snapshot(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._stats[key] = self._stat(key)

    def fingerprint(self, key: str) -> str | None:
        if key not in self.files:
            return None
        before = self._stats.get(key) or self._stat(key)
        content = self._content(key)
        if self._stat(key) != before:  # changed while the item was computed: its content is unknown
            content = "-"
        return f"{_FILES}:{before}:{content}"

    def unchanged(self, key: str, recorded: str | None) -> bool:
        if recorded is None or key not in self.files:
            return True  # an item stored before fingerprints were recorded: kept as it is
        parts = recorded.split(":")
        if len(parts) != 3 or parts[0] != _FILES:
            return False
        if parts[1] == self._stat(key):
            return True
        return parts[2] != "-" and parts[2] == self._content(key)

    def subset(self, keys: Iterable[str]) -> FileSources:
        keys = list(keys)
        return FileSources({k: self.files[k] for k in keys if k in self.files},
                           {k: self._stats[k] for k in keys if k in self._stats})


class StoreSources:
    """Items computed from the same-key items of an upstream store."""

    def __init__(self, origins: Mapping[str, str]):
        self.origins = dict(origins)  # key -> sha256 of the upstream shard holding it

    @classmethod
    def of(cls, root: str | os.PathLike) -> StoreSources:
        from .store import StoreReader

        with StoreReader(root) as reader:
            return cls({key: reader.shard_sha256(key) for key in reader.keys()})

    def snapshot(self, keys: Iterable[str]) -> None:
        del keys

    def fingerprint(self, key: str) -> str | None:
        sha = self.origins.get(key)
        return None if sha is None else f"{_SHARD}:{sha[:16]}"

    def unchanged(self, key: str, recorded: str | None) -> bool:
        return recorded is None or key not in self.origins or recorded == self.fingerprint(key)

    def subset(self, keys: Iterable[str]) -> StoreSources:
        return StoreSources({k: self.origins[k] for k in keys if k in self.origins})


def item_sources(source: str | os.PathLike | Sequence[Any]) -> ItemSources:
    """The per-item sources of a stage input: a store folder, or images (a folder, glob, list file,
    image, or a list of :class:`~segsort_unsup.io.images.ImageRef`)."""
    from .images import list_images
    from .store import is_store

    if not isinstance(source, (list, tuple)) and is_store(source):
        return StoreSources.of(source)
    refs = list(source) if isinstance(source, (list, tuple)) else list_images(source)
    return FileSources({ref.key: (os.path.abspath(ref.path),) for ref in refs})


def store_content(reader: Any) -> str:
    """A digest of what a store holds now: its index (shards, sha256s, withdrawn items) and its keys."""
    index = Path(reader.root) / "index.jsonl"
    digest = hashlib.sha256(index.read_bytes() if index.is_file() else b"").hexdigest()[:16]
    keys = hashlib.sha256("\n".join(reader.keys()).encode()).hexdigest()[:16]
    return f"{digest}-{keys}"


def input_fingerprint(source: str | os.PathLike) -> dict[str, str]:
    """The identity of a whole input, for stages that compute one result from all of it.

    A store: ``{"source_identity": its identity hash, "source_content": store_content}``; images
    (folder, glob, list file): ``{"source_identity": the path, "source_content": a digest of every
    image's key, size and sha256}``. Put it in the stage's identity: an input that grew or changed
    then changes the identity.
    """
    from .images import list_images
    from .store import StoreReader, is_store

    if is_store(source):
        with StoreReader(source) as reader:
            return {"source_identity": reader.config_hash, "source_content": store_content(reader)}
    lines = []
    for ref in sorted(list_images(source), key=lambda r: r.key):
        lines.append(f"{ref.key}\t{os.path.getsize(ref.path)}\t{sha256_file(ref.path)}")
    return {"source_identity": os.path.abspath(source), "source_content": _digest("\n".join(lines))}
