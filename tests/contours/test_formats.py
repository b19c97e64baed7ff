"""HED weight formats: Keras .weights.h5, pytorch-hed and caffemodel all give the same network.

The pytorch-hed and Caffe files cannot be downloaded here, so the tests write files with the
same layout from the real Keras weights (see ``hed_files``): all three loaders must then give
the identical network.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segsort_unsup.contours import formats as F
from segsort_unsup.contours.hed import HED
from segsort_unsup.errors import WeightsError

from .hed_files import _blob, _bytes_field, caffemodel_bytes, pytorch_hed_state


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
    loaded = F.load_hed_state_dict(path)
    assert set(loaded) == set(keras_state)
    for key in keras_state:
        assert torch.equal(loaded[key], keras_state[key]), key


@pytest.mark.parametrize("v1", [False, True], ids=["layer-packed-blobshape", "v1-unpacked-legacy"])
def test_caffemodel_loader_matches_keras(tmp_path, keras_state, v1):
    path = tmp_path / "hed_pretrained_bsds.caffemodel"
    path.write_bytes(caffemodel_bytes(keras_state, v1=v1))
    loaded = F.load_hed_state_dict(path)
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
        net.load_state_dict(F.load_hed_state_dict(path))
        with torch.inference_mode():
            outs.append(net(x))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


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
            F.load_hed_state_dict(path)
        assert str(path) in str(info.value), name
