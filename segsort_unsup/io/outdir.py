"""Output folders: a folder of files (label PNGs, retrieval pages, galleries, PNG/.mat exports,
training run folders) with the guarantees of a store.

* **Manifest.** ``.segsort-output.json`` says what wrote the folder: producer (package version),
  ``kind``, ``identity`` (settings + input provenance) and its hash, and every file (relative path
  and size) and subfolder the tool wrote. While a run writes, each file is first announced and,
  once renamed into place whole, recorded with its size in ``.segsort-output.journal`` (one JSON
  line each, appended); closing the folder folds the journal into the manifest.
* **Lock.** An exclusive lock (the store's :class:`~segsort_unsup.io.store.StoreLock`, file
  ``.lock``) is held from opening to closing: a second writer is refused with one line.
* **Overwrite.** ``overwrite=True`` (or ``"changed"`` when the identity differs) removes only the
  files the manifest lists, the subfolders it created (when empty afterwards) and the subfolders it
  owns whole (:meth:`OutputFolder.own_tree`); a user's other files stay. A non-empty folder without
  a manifest is refused, ``overwrite`` or not: the tool never deletes what it did not write.
* **Resume.** A file listed with its size and present with that size is complete; anything else
  (announced only, missing, another size, unlisted) is redone. A killed writer leaves a folder
  that the next run resumes (its temporary files are deleted).
* **Names from data.** Keys and section names become paths only through
  :func:`safe_relative_name`, which refuses (one line naming the name) anything that could leave
  the folder or hide in it: absolute paths, empty, ``.``/``..`` or dot-leading parts, backslashes,
  NUL and control characters, parts over 255 bytes. ``/`` separates subfolders (image keys mirror
  the input folder's tree). Names are refused, never rewritten, so a file is always named by its key.

Use::

    with OutputFolder(out, kind="labels", identity=identity, overwrite=overwrite) as folder:
        target = folder.file_for(key, ".png")
        if not folder.is_complete(target):
            folder.write_bytes(target, png_bytes)       # announce, atomic write, record
        folder.write_text(folder.path_for("index.html"), page)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from .. import __version__
from ..config import changed_keys, config_hash
from ..errors import InputError, SegsortError, StoreError, _PathError
from .atomic import DiskFullError, atomic_path, atomic_write_text, fsync_dir, is_disk_full

MANIFEST_NAME = ".segsort-output.json"
JOURNAL_NAME = ".segsort-output.journal"
LOCK_NAME = ".lock"  # the store lock's file name (io.store.LOCK_NAME)
FORMAT = "segsort-output"
FORMAT_VERSION = 1
_RESERVED = (MANIFEST_NAME, JOURNAL_NAME, LOCK_NAME)
_TEMP_RE = re.compile(r"^\..+\.\d+\.tmp$")  # io.atomic.temp_path names
_MAX_PART_BYTES = 255
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class OutputFolderError(_PathError):
    """An output folder is locked, not ours, of another kind or settings, or cannot be written."""


class UnsafeNameError(InputError):
    """A key or section name that cannot be used as a file name inside an output folder."""

    def __init__(self, name: str, what: str, reason: str):
        self.name, self.what, self.reason = name, what, reason
        super().__init__(f"{what} {name!r} cannot be used as a file name in an output folder: {reason}; "
                         "rename it")

    def __reduce__(self):
        return (type(self), (self.name, self.what, self.reason))


def safe_relative_name(name: str, *, what: str = "key", subfolders: bool = True) -> str:
    """``name`` checked to be a relative path that stays inside its folder; returned unchanged.

    ``/`` separates subfolders when ``subfolders`` (image keys of nested input folders), else it
    is refused (section names). Refused with :class:`UnsafeNameError` (one line naming ``name``):
    empty names or parts, absolute paths, ``.``/``..`` and other parts starting with ``.`` (they
    would climb out, or hide among the manifest, lock and temporary files), backslashes, NUL and
    control characters, and parts longer than 255 bytes.
    """
    if not isinstance(name, str) or not name:
        raise UnsafeNameError(str(name), what, "it is empty")
    if _CONTROL_RE.search(name):
        raise UnsafeNameError(name, what, "it holds a control character")
    if "\\" in name:
        raise UnsafeNameError(name, what, "it holds a backslash")
    if name.startswith("/"):
        raise UnsafeNameError(name, what, "it is an absolute path")
    parts = name.split("/")
    if len(parts) > 1 and not subfolders:
        raise UnsafeNameError(name, what, "it holds a '/'")
    for part in parts:
        if not part:
            raise UnsafeNameError(name, what, "it has an empty path part")
        if part in (".", ".."):
            raise UnsafeNameError(name, what, f"it holds a {part!r} part")
        if part.startswith("."):
            raise UnsafeNameError(name, what, f"its part {part!r} starts with '.'")
        try:
            size = len(part.encode("utf-8"))
        except UnicodeEncodeError:
            raise UnsafeNameError(name, what, "it is not valid UTF-8") from None
        if size > _MAX_PART_BYTES:
            raise UnsafeNameError(name, what, f"a part is {size} bytes long (at most {_MAX_PART_BYTES})")
    return name


def read_output_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of an output folder (``None`` when it has none); :class:`OutputFolderError` if unreadable."""
    manifest = Path(path) / MANIFEST_NAME
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputFolderError(manifest, f"unreadable manifest ({exc}); delete the folder to start over") from None
    if (not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("kind"), str)
            or not isinstance(data.get("files"), dict)):
        raise OutputFolderError(manifest, "not a segsort-unsup output manifest; delete the folder to start over")
    if data.get("format_version") != FORMAT_VERSION:
        raise OutputFolderError(manifest, f"output format {data.get('format_version')} is not supported by "
                                          f"segsort-unsup {__version__}; write to a new folder")
    return data


def child_path(root: str | os.PathLike, relative: str, *, checked: set[Path] | None = None) -> Path:
    """``root/relative`` for a name checked by :func:`safe_relative_name` whose folder does not lead
    out of ``root`` through a symbolic link either (the file itself is replaced, never followed, by
    atomic writes). ``checked``: folders already found inside ``root`` (a cache)."""
    root = Path(root)
    target = root.joinpath(*safe_relative_name(relative, what="file name").split("/"))
    if checked is not None and target.parent in checked:
        return target
    real_root, real = root.resolve(), target.parent.resolve()
    if real != real_root and real_root not in real.parents:
        raise OutputFolderError(target, f"leads out of the output folder {root} (a symbolic link); "
                                        "remove the link or choose another output folder")
    if checked is not None and target.parent.is_dir():
        checked.add(target.parent)
    return target


def key_path(root: str | os.PathLike, key: str, suffix: str = "", *, folder: str = "",
             checked: set[Path] | None = None) -> Path:
    """``root/<folder>/<key><suffix>``, ``key`` checked by :func:`safe_relative_name` (one line naming
    it when refused). Usable where no :class:`OutputFolder` is at hand (worker processes)."""
    safe_relative_name(key)
    last = f"{key.rsplit('/', 1)[-1]}{suffix}".encode("utf-8")
    if len(last) > _MAX_PART_BYTES:
        raise UnsafeNameError(key, "key", f"with {suffix!r} its file name is {len(last)} bytes long "
                                          f"(at most {_MAX_PART_BYTES})")
    return child_path(root, f"{folder.strip('/')}/{key}{suffix}" if folder else f"{key}{suffix}", checked=checked)


class OutputFolder:
    """A folder of files written under a manifest and a lock (see the module doc).

    Parameters
    ----------
    path : the folder (created if missing).
    kind : what it holds (``"labels"``, ``"retrieval"``, ``"ucm-png"``...); never replaced by another kind.
    identity : settings and input provenance; a folder with another identity is refused unless
        ``overwrite``.
    overwrite : ``False`` (resume; refuse another identity), ``True`` (start over) or ``"changed"``
        (start over only when the identity differs: pipelines).
    meta : further provenance recorded in the manifest (not part of the identity).
    """

    def __init__(self, path: str | os.PathLike, *, kind: str, identity: Mapping[str, Any],
                 overwrite: bool | str = False, meta: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.kind = kind
        self.identity = dict(identity)
        self.identity_hash = config_hash(self.identity)
        self.overwrite = overwrite
        self.meta = dict(meta or {})
        self.resumed = False  # opened a folder of the same identity (its complete files are kept)
        self.replaced_keys: list[str] = []  # identity keys that differed when ``overwrite`` replaced it
        self._files: dict[str, int | None] = {}  # relative path -> size (None: announced, not recorded)
        self._folders: set[str] = set()  # subfolders this tool created
        self._trees: set[str] = set()  # subfolders it owns whole
        self._checked: set[Path] = set()  # folders found inside (no symbolic link leading out)
        self._manifest: dict[str, Any] = {}
        self._journal = None
        self._lock = None

    # -- opening and closing ---------------------------------------------------------------------
    def open(self) -> OutputFolder:
        """Take the lock, check the manifest, clear (``overwrite``) or resume; returns ``self``."""
        from .store import MANIFEST_NAME as STORE_MANIFEST
        from .store import StoreLock

        self._make_folder()
        if (self.path / STORE_MANIFEST).exists():
            raise OutputFolderError(self.path, "is a segsort-unsup store, not a folder of files; choose another "
                                               "folder")
        lock = StoreLock(self.path)
        try:
            lock.acquire()
        except StoreError:
            raise OutputFolderError(self.path, "another segsort-unsup run is writing this folder; wait for it "
                                               "or choose another output folder") from None
        self._lock = lock
        try:
            self._open_manifest()
            self._journal = open(self.path / JOURNAL_NAME, "a", encoding="utf-8")
        except BaseException:
            self._release()
            raise
        return self

    def close(self) -> None:
        """Fold the journal into the manifest and release the lock."""
        if self._lock is None:
            return
        try:
            if self._journal is not None:
                self._journal.close()
                self._journal = None
            self._write_manifest()
            (self.path / JOURNAL_NAME).unlink(missing_ok=True)
        finally:
            self._release()

    def __enter__(self) -> OutputFolder:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()  # what was recorded is complete: kept even when the run is interrupted

    def _release(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _make_folder(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise OutputFolderError(self.path, "exists and is not a folder; choose another output path")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise OutputFolderError(self.path, "cannot write here (permission denied); choose another "
                                               "output folder") from None
        except OSError as exc:
            if is_disk_full(exc):
                raise DiskFullError(self.path) from None
            reason = "a part of this path is a file, not a folder" if exc.errno == errno.ENOTDIR else \
                (exc.strerror or str(exc))
            raise OutputFolderError(self.path, f"cannot create the folder ({reason})") from None

    def _open_manifest(self) -> None:
        old = read_output_manifest(self.path)
        if old is None:
            others = [p.name for p in self.path.iterdir()
                      if p.name not in _RESERVED and not p.name.startswith(f".{MANIFEST_NAME}.")]
            if others:
                raise OutputFolderError(self.path, "is not empty and was not written by segsort-unsup; "
                                                   f"choose an empty folder (this one has no {MANIFEST_NAME})")
        else:
            if old["kind"] != self.kind:
                raise OutputFolderError(self.path, f"holds a {old['kind']!r} output, not {self.kind!r}; choose "
                                                   "another folder (--overwrite never replaces another kind)")
            self._load(old)
            differs = old.get("identity_hash") != self.identity_hash
            if differs and not self.overwrite:
                changed = changed_keys(old.get("identity", {}), self.identity)
                raise OutputFolderError(self.path, f"was written with other settings or inputs (differs in: "
                                                   f"{', '.join(changed) or 'identity'}); pass --overwrite to "
                                                   "replace it, or choose another output folder")
            if self.overwrite is True or differs:
                if differs:
                    self.replaced_keys = changed_keys(old.get("identity", {}), self.identity)
                self._clear()
            else:
                self.resumed = True
                self._manifest = old
                self._remove_stale_temps()
                return
        self._manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind,
            "identity": self.identity, "identity_hash": self.identity_hash,
            "producer": f"segsort-unsup {__version__}", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "epoch": uuid.uuid4().hex[:12], "meta": self.meta,
        }
        self._remove_stale_temps()
        self._write_manifest()

    def _load(self, manifest: Mapping[str, Any]) -> None:
        """The files and folders of a manifest plus its journal, every name checked."""
        self._files = {str(k): (int(v) if isinstance(v, int) else None) for k, v in manifest["files"].items()}
        self._folders = {str(f) for f in manifest.get("folders", [])}
        self._trees = {str(f) for f in manifest.get("trees", [])}
        journal = self.path / JOURNAL_NAME
        if journal.is_file():
            self._replay(journal)
        # Every listed name was checked when it was written; a hand-edited manifest is checked again.
        for rel in [*self._files, *self._folders, *self._trees]:
            try:
                self._inside(rel)
            except UnsafeNameError as exc:
                raise OutputFolderError(self.path / MANIFEST_NAME, f"lists {rel!r}, which this tool never writes "
                                                                   f"({exc.reason}); delete the folder to start "
                                                                   "over") from None

    def _replay(self, journal: Path) -> None:
        """Apply the journal's lines (a torn last line, from a kill mid-append, is ignored)."""
        with open(journal, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                    if "file" in entry:
                        size = entry.get("size")
                        self._files[str(entry["file"])] = int(size) if isinstance(size, int) else None
                    elif "forget" in entry:
                        self._files.pop(str(entry["forget"]), None)
                    elif "folder" in entry:
                        self._folders.add(str(entry["folder"]))
                    elif "tree" in entry:
                        self._trees.add(str(entry["tree"]))
                except (ValueError, TypeError, AttributeError):
                    continue

    def _clear(self) -> None:
        """Delete what the manifest lists (files, owned trees, then created folders if empty)."""
        for rel in sorted(self._files):
            with contextlib.suppress(FileNotFoundError):
                self._inside(rel).unlink()
        for rel in sorted(self._trees):
            tree = self._inside(rel)
            if tree.is_dir() and not tree.is_symlink():
                shutil.rmtree(tree)
        self._remove_stale_temps()
        for rel in sorted(self._folders, key=lambda r: r.count("/"), reverse=True):
            with contextlib.suppress(OSError):  # only empty ones go: a folder holding a user's file stays
                self._inside(rel).rmdir()
        (self.path / JOURNAL_NAME).unlink(missing_ok=True)
        fsync_dir(self.path)
        self._files, self._folders, self._trees = {}, set(), set()

    def _known_folders(self) -> set[str]:
        """Listed subfolders, and those holding listed files (where a killed write left its temporary)."""
        parents = {rel.rsplit("/", 1)[0] for rel in [*self._files, *self._trees] if "/" in rel}
        parents |= {"/".join(p.split("/")[:i]) for p in parents for i in range(1, p.count("/") + 1)}
        return self._folders | parents

    def _remove_stale_temps(self) -> None:
        for folder in [self.path, *(self._inside(f) for f in self._known_folders())]:
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if _TEMP_RE.match(path.name) and path.is_file():
                    with contextlib.suppress(OSError):
                        path.unlink()

    def _write_manifest(self) -> None:
        present = {rel: size for rel, size in self._files.items() if self._inside(rel).exists()}
        manifest = {**self._manifest, "files": dict(sorted(present.items())),
                    "folders": sorted(self._folders), "trees": sorted(self._trees),
                    "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(self.path / MANIFEST_NAME, json.dumps(manifest, indent=1, default=str))

    # -- names -----------------------------------------------------------------------------------
    def _inside(self, rel: str) -> Path:
        """The path of a listed relative name, refusing one that would leave the folder."""
        safe_relative_name(rel, what="file name")
        return self.path.joinpath(*rel.split("/"))

    def _relative(self, target: str | os.PathLike) -> str:
        target = Path(target)
        try:
            rel = target.relative_to(self.path)
        except ValueError:
            raise OutputFolderError(target, f"is not inside the output folder {self.path}") from None
        return safe_relative_name(PurePosixPath(*rel.parts).as_posix(), what="file name")

    def file_for(self, key: str, suffix: str = "", *, folder: str = "") -> Path:
        """The path of ``<folder>/<key><suffix>`` (``key`` checked by :func:`safe_relative_name`)."""
        return key_path(self.path, key, suffix, folder=folder, checked=self._checked)

    def path_for(self, relative: str) -> Path:
        """The path of a fixed relative name (``index.html``, ``montages/a.png``), checked."""
        return child_path(self.path, relative, checked=self._checked)

    # -- state -----------------------------------------------------------------------------------
    @property
    def files(self) -> dict[str, int]:
        """The complete files (relative path -> size) listed so far."""
        return {rel: size for rel, size in self._files.items() if size is not None}

    def is_complete(self, target: str | os.PathLike) -> bool:
        """True when ``target`` is listed with a size and present with that size."""
        size = self._files.get(self._relative(target))
        if size is None:
            return False
        try:
            return Path(target).stat().st_size == size
        except OSError:
            return False

    # -- writing ---------------------------------------------------------------------------------
    def _append(self, entry: dict[str, Any]) -> None:
        if self._journal is None:
            raise RuntimeError("the output folder is not open")
        self._journal.write(json.dumps(entry) + "\n")
        self._journal.flush()

    def folder(self, relative: str) -> Path:
        """Create (and list) the subfolder ``relative``; returns its path."""
        target = self.path_for(relative)
        rel = self._relative(target)
        parts = rel.split("/")
        for depth in range(1, len(parts) + 1):
            sub = "/".join(parts[:depth])
            path = self._inside(sub)
            if not path.is_dir():
                path.mkdir()
                if sub not in self._folders:
                    self._folders.add(sub)
                    self._append({"folder": sub})
        return target

    def own_tree(self, relative: str) -> Path:
        """List the subfolder ``relative`` as owned whole (e.g. a store inside a run folder):
        ``overwrite`` deletes it with everything in it. Created if missing; returns its path."""
        target = self.path_for(relative)
        rel = self._relative(target)
        if "/" in rel:
            self.folder(rel.rsplit("/", 1)[0])
        target.mkdir(exist_ok=True)
        if rel not in self._trees:
            self._trees.add(rel)
            self._append({"tree": rel})
        return target

    def make_parents(self, target: str | os.PathLike) -> Path:
        """Create (and list) the folders of ``target``, e.g. before worker processes write it (a folder
        they create is not listed, so ``overwrite`` would leave it, empty)."""
        rel = self._relative(target)
        if "/" in rel:
            self.folder(rel.rsplit("/", 1)[0])
        return Path(target)

    def announce(self, target: str | os.PathLike) -> Path:
        """List ``target`` as being written (owned, not complete) and create its folders."""
        rel = self._relative(target)
        if "/" in rel:
            self.folder(rel.rsplit("/", 1)[0])
        if rel not in self._files:
            self._files[rel] = None
            self._append({"file": rel, "size": None})
        return Path(target)

    def record(self, target: str | os.PathLike) -> int:
        """List ``target`` (written whole, e.g. by :func:`~segsort_unsup.io.atomic.atomic_write`) as
        complete with its current size; returns the size."""
        rel = self._relative(target)
        if "/" in rel:
            self.folder(rel.rsplit("/", 1)[0])
        size = Path(target).stat().st_size
        self._files[rel] = size
        self._append({"file": rel, "size": size})
        return size

    def forget(self, target: str | os.PathLike, *, delete: bool = True) -> None:
        """Drop ``target`` from the listing (and delete it when ``delete``)."""
        rel = self._relative(target)
        if delete:
            Path(target).unlink(missing_ok=True)
        if self._files.pop(rel, 0) != 0:
            self._append({"forget": rel})

    @contextlib.contextmanager
    def writing(self, target: str | os.PathLike) -> Iterator[Path]:
        """Yield a temporary path to write ``target`` through (any library); on success it is renamed
        into place and recorded. ``target`` is announced first, so an interrupted write is redone."""
        self.announce(target)
        with atomic_path(target) as tmp:
            yield tmp
        self.record(target)

    def write_bytes(self, target: str | os.PathLike, data: bytes) -> None:
        """Write ``data`` to ``target`` atomically and record it."""
        with self.writing(target) as tmp:
            Path(tmp).write_bytes(data)

    def write_text(self, target: str | os.PathLike, text: str) -> None:
        """Write ``text`` (UTF-8) to ``target`` atomically and record it."""
        with self.writing(target) as tmp:
            Path(tmp).write_text(text, encoding="utf-8")


def prepare_exports(folder: OutputFolder, keys: Iterable[str], *, targets: Callable[[str], list[Path]]) -> None:
    """Create (and list) the subfolders that worker processes will write ``keys``' exports into
    (keys that cannot name a file are left to fail where they are processed)."""
    for key in keys:
        try:
            paths = targets(key)
        except SegsortError:
            continue
        for path in paths:
            folder.make_parents(path)


def settle_exports(folder: OutputFolder, keys: Iterable[str], *, targets: Callable[[str], list[Path]],
                   fresh: Container[str], redo: Callable[[str], None]) -> list[tuple[str, str]]:
    """Make the export files of every stored item complete in ``folder``; returns ``(key, reason)``
    of the items whose export failed (one line each).

    Exports of a store-writing stage are written beside each item, possibly by worker processes
    that have no :class:`OutputFolder`; this runs afterwards in the process holding the lock.
    ``targets(key)`` names a key's files. A key whose files are all recorded is left alone; the
    files of a ``fresh`` key (stored by this run, whose workers wrote them atomically under this
    lock) are recorded as found; any other key's (a killed run, a failed export, an export folder
    added later) are announced, written again by ``redo(key)`` from the stored item, and recorded.
    """
    failed: list[tuple[str, str]] = []
    for key in keys:
        try:
            paths = targets(key)
            if all(folder.is_complete(p) for p in paths):
                continue
            if key not in fresh or not all(p.is_file() for p in paths):
                for path in paths:
                    folder.announce(path)
                redo(key)
            for path in paths:
                folder.record(path)
        except Exception as exc:  # noqa: BLE001 - one export never stops the others
            failed.append((key, " ".join(f"export failed: {exc}".split())))
    return failed


__all__ = ["MANIFEST_NAME", "OutputFolder", "OutputFolderError", "UnsafeNameError", "key_path", "read_output_manifest",
           "prepare_exports", "safe_relative_name", "settle_exports"]
