"""Atomic, resumable, checksummed downloads (for ``segsort-unsup weights fetch``).

``download_url`` streams into ``.<name>.part`` next to the destination, hashing as it goes. An
interrupted download leaves the ``.part`` file behind, and the next attempt (automatic retries, or a
later call) asks the server for the rest with an HTTP ``Range`` request; a server that ignores
``Range`` gets a clean restart. The finished file is checked (size, sha256) and only then moved into
place with :func:`~segsort_unsup.io.atomic.commit_temp` (fsync, rename, fsync of the folder), so a
broken or tampered download never replaces a good file.
Uses only the standard library (urllib); proxies from the environment apply as usual.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import WeightsError
from ..io.atomic import commit_temp
from ..log import get_logger
from ..log import progress as progress_bar

__all__ = ["download_url"]

_LOG = get_logger("contours.download")
_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$")
_FETCH_ELSEWHERE = "download it elsewhere and pass --from PATH"


class _Interrupted(Exception):
    """The connection dropped mid-body; the partial file is kept for a resume."""


class _Partial:
    """The ``.part`` file and a sha256 of its bytes so far, kept in step while streaming."""

    def __init__(self, path: Path):
        self.path = path
        self.digest = hashlib.sha256()
        self.hashed = 0  # bytes of the file covered by ``digest``

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def restart(self) -> None:
        self.path.unlink(missing_ok=True)
        self.digest, self.hashed = hashlib.sha256(), 0

    def catch_up(self) -> None:
        """Hash bytes already on disk (a partial file left by an earlier run) before appending."""
        if self.hashed > self.size():  # the file shrank under us: start the hash again
            self.digest, self.hashed = hashlib.sha256(), 0
        with open(self.path, "rb") as fh:
            fh.seek(self.hashed)
            for block in iter(lambda: fh.read(_CHUNK), b""):
                self.digest.update(block)
                self.hashed += len(block)


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": "segsort-unsup", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _partial_complete(err: urllib.error.HTTPError, offset: int) -> bool:
    """A 416 answer to ``Range: bytes=<offset>-`` meaning the partial file already holds every byte."""
    m = _UNSATISFIED_RANGE.match(err.headers.get("Content-Range", "") if err.headers else "")
    return bool(m) and int(m.group(1)) == offset


def _fetch_once(url: str, dest: Path, part: _Partial, *, timeout: float, show: bool) -> None:
    """One attempt: append to (or restart) ``part`` until the server's body ends, hashing as it streams.

    Raises ``_Interrupted`` when the connection drops (the partial file is kept), ``WeightsError``
    for an HTTP error or an unreachable host.
    """
    offset = part.size()
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            if _partial_complete(err, offset):
                return
            _LOG.info("server refused to resume %s (HTTP 416); starting again", url)
            part.restart()
            return _fetch_once(url, dest, part, timeout=timeout, show=show)
        raise WeightsError(
            dest, f"{url} answered HTTP {err.code} {err.reason}; check the URL, or {_FETCH_ELSEWHERE}"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise WeightsError(dest, f"cannot reach {_host(url)}: {reason}; {_FETCH_ELSEWHERE}") from None

    with resp:
        status = getattr(resp, "status", 200)
        mode = "wb"
        start = 0
        if offset and status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == offset:
                mode, start = "ab", offset
            else:
                _LOG.info("server sent an unexpected range for %s; starting again", url)
                resp.close()
                part.restart()
                return _fetch_once(url, dest, part, timeout=timeout, show=show)
        elif offset:
            _LOG.info("server does not resume downloads (HTTP %s to a Range request); starting again", status)
        if mode == "wb":
            part.digest, part.hashed = hashlib.sha256(), 0
        else:
            part.catch_up()
        length = resp.headers.get("Content-Length")
        body = int(length) if length and length.isdigit() else None
        total = start + body if body is not None else None
        received = 0
        bar = progress_bar(total=total, desc=dest.name, unit="B", disable=None if show else True)
        bar.unit_scale, bar.unit_divisor = True, 1024
        try:
            if start:
                bar.update(start)
            with open(part.path, mode) as fh:
                while True:
                    try:
                        block = resp.read(_CHUNK)
                    except (http.client.IncompleteRead, OSError) as err:  # dropped, reset, timed out
                        raise _Interrupted(f"{type(err).__name__}: {err}") from None
                    if not block:
                        break
                    fh.write(block)
                    part.digest.update(block)
                    part.hashed += len(block)
                    received += len(block)
                    bar.update(len(block))
        finally:
            bar.close()
        if body is not None and received < body:
            raise _Interrupted(f"connection closed after {start + received} of {total} bytes")


def download_url(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    expected_size: int | None = None,
    progress: bool = True,
    retries: int = 3,
    timeout: float = 60.0,
) -> str:
    """Download ``url`` to ``dest`` atomically; return the file's sha256 (hex).

    Streams into ``<dest folder>/.<dest name>.part``, resuming a partial file left by an earlier
    attempt with an HTTP ``Range`` request when the server allows it (a full restart otherwise), and
    retries a dropped connection ``retries`` times the same way. When ``sha256`` (hex) or
    ``expected_size`` is given, a mismatch deletes the partial file and raises; only a complete, verified
    file is moved over ``dest`` (:func:`~segsort_unsup.io.atomic.commit_temp`), so an existing good file
    is never lost.

    Raises
    ------
    WeightsError
        Unreachable host, HTTP error, interrupted download (after the retries; the partial file is
        kept so the next call resumes), or size/sha256 mismatch. Each message says what to do.
    """
    dest = Path(dest)
    want = sha256.strip().lower() if sha256 else None
    if want is not None and not re.fullmatch(r"[0-9a-f]{64}", want):
        raise WeightsError(dest, f"{sha256!r} is not a sha256 (64 hex digits); check the --sha256 value")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _Partial(dest.parent / f".{dest.name}.part")
    if part.size():
        _LOG.info("resuming %s from %d bytes", dest.name, part.size())

    for attempt in range(retries + 1):
        try:
            _fetch_once(url, dest, part, timeout=timeout, show=progress)
            break
        except _Interrupted as why:
            if attempt == retries:
                raise WeightsError(
                    dest,
                    f"download of {url} interrupted ({why}); {part.size()} bytes kept in {part.path.name}: "
                    f"run the command again to resume, or {_FETCH_ELSEWHERE}",
                ) from None
            _LOG.warning("download of %s interrupted (%s); resuming (%d/%d)", url, why, attempt + 1, retries)

    size = part.size()
    if expected_size is not None and size != expected_size:
        part.restart()
        raise WeightsError(
            dest,
            f"{url} gave {size} bytes, expected {expected_size}; the partial file was deleted: try again, "
            f"or {_FETCH_ELSEWHERE}",
        )
    if not part.path.exists():  # an empty body never opened the file
        part.path.touch()
    part.catch_up()  # no-op after a streamed download; covers a partial that a 416 showed complete
    got = part.digest.hexdigest()
    if want is not None and got != want:
        part.restart()
        raise WeightsError(
            dest,
            f"sha256 mismatch for {url}: expected {want}, got {got}; the download is corrupt or the file changed "
            f"upstream (deleted it). Try again; if it persists, check the source, or {_FETCH_ELSEWHERE}",
        )
    commit_temp(part.path, dest)
    return got
