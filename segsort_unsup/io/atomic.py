"""Files that appear whole or not at all, and their sha256.

Every file a run must not leave half-written (store shards and manifests, exported PNGs,
weights, checkpoints, galleries) goes through :func:`atomic_write`: the bytes are written to
a temporary name in the same folder, flushed and fsynced, then renamed over the target, and
the folder is fsynced so the rename survives a power cut. A killed process leaves the old
file (or none) plus at most a ``.<name>.<pid>.tmp`` that the next run may delete.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ..errors import SegsortError

TMP_SUFFIX = ".tmp"


class DiskFullError(SegsortError):
    """The disk (or quota) ran out while writing ``path``."""

    def __init__(self, path: str | os.PathLike, needed: int | None = None):
        self.path = str(path)
        self.needed = needed
        need = f" (about {needed / 2**20:.1f} MiB needed)" if needed else ""
        super().__init__(f"{self.path}: no space left on the device{need}; free some space or choose another "
                         "output folder, then re-run (finished work is kept)")

    def __reduce__(self):
        return (type(self), (self.path, self.needed))


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name used while ``path`` is being written (same folder, hidden, per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, also when h5py wraps them in a generic error message."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return "no space left" in text or "disk quota exceeded" in text


def commit_temp(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync ``tmp``, rename it over ``path`` and fsync the folder."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path`` through (by any library); renamed into place on success.

    On any error (or interruption) the temporary file is removed and the target is untouched.
    Running out of space raises :class:`DiskFullError` naming the target.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        commit_temp(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise DiskFullError(path) from None
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open ``path`` for writing so that it appears whole or not at all (see the module doc)."""
    if mode not in ("w", "wb"):
        raise ValueError("atomic_write opens files for writing only ('w' or 'wb')")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding if "b" not in mode else None) as fh:
            yield fh
            fh.flush()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def remove_stale_temps(folder: str | os.PathLike, pattern: str = f".*{TMP_SUFFIX}") -> int:
    """Delete temporary files left by killed runs in ``folder``; returns how many."""
    removed = 0
    for stale in Path(folder).glob(pattern):
        with contextlib.suppress(OSError):
            stale.unlink()
            removed += 1
    return removed


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
