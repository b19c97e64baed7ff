"""Label PNGs over several folders or list files: one lookup rule for embed and train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segsort_unsup.errors import InputError
from segsort_unsup.io.labels import LabelFiles


def _png(path: Path, value: int = 1, size: tuple[int, int] = (24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, np.uint8)).save(path)
    return path


@pytest.fixture
def split(tmp_path):
    """Labels split like CamVid's trainannot/ + extraannot/, and where each file was written."""
    written = {"x1": _png(tmp_path / "a" / "x1.png"), "x2": _png(tmp_path / "a" / "x2.png"),
               "sub/x3": _png(tmp_path / "a" / "sub" / "x3.png"), "y1": _png(tmp_path / "b" / "y1.png")}
    return tmp_path / "a", tmp_path / "b", written


def test_each_image_finds_its_label_in_whichever_folder_holds_it(split):
    a, b, written = split
    labels = LabelFiles([str(a), str(b)])
    assert len(labels) == len(written)
    for key, path in written.items():
        assert labels.find(key) == path
    assert labels.find("elsewhere/x1") == written["x1"]      # by the key's last part
    assert labels.find("x3") == written["sub/x3"]            # by name, below a sub-folder
    assert labels.find("renamed", "/photos/y1.jpg") == written["y1"]  # by the photo's file name
    assert LabelFiles(str(a)).find("y1") is None             # one folder: the other's labels are not there


def test_a_label_in_two_folders_is_a_one_line_error_naming_both(split):
    a, b, written = split
    twin = _png(b / "x2.png")
    with pytest.raises(InputError) as err:
        LabelFiles([a, b]).find("x2")
    message = str(err.value)
    assert "\n" not in message and str(written["x2"]) in message and str(twin) in message
    assert LabelFiles([a, b]).find("x1") == written["x1"]  # the others are still found


def test_a_missing_label_names_every_folder_searched(split):
    a, b, _ = split
    labels = LabelFiles([a, b])
    assert labels.find("z9") is None
    with pytest.raises(InputError) as err:
        labels.require("z9")
    assert "\n" not in str(err.value) and "'z9'" in str(err.value)
    assert str(a) in str(err.value) and str(b) in str(err.value)
    with pytest.raises(InputError, match="nowhere: no such label folder or list file"):
        LabelFiles([a, a.parent / "nowhere"])
    (a.parent / "empty").mkdir()
    with pytest.raises(InputError, match="no label PNGs found"):
        LabelFiles(a.parent / "empty")


def test_a_list_file_names_label_files_relative_to_itself(split, tmp_path):
    a, b, written = split
    listing = a / "labels.txt"  # one file below the list's folder (keyed by its path), one outside (its name)
    listing.write_text("# labels of two frames\nsub/x3.png\n\n../b/y1.png\n")
    labels = LabelFiles(listing)
    assert len(labels) == 2
    assert labels.find("sub/x3") == a / "sub" / "x3.png" and labels.find("y1") == a / ".." / "b" / "y1.png"
    assert labels.find("x1") is None


def test_embed_and_train_settings_take_one_folder_or_several(split):
    from segsort_unsup.embed.stage import EmbedConfig, _label_paths
    from segsort_unsup.train.stage import TrainConfig
    from segsort_unsup.io.images import ImageRef

    a, b, written = split
    assert EmbedConfig(labels=str(a)).labels == str(a)  # one folder: as before (same identity)
    assert EmbedConfig(labels=[str(a), str(b)]).labels == (str(a), str(b))
    assert TrainConfig(labels_dir=[str(a), str(b)]).labels_dir == (str(a), str(b))
    for make in (lambda: EmbedConfig(labels=[]), lambda: TrainConfig(labels_dir=[])):
        with pytest.raises(InputError, match="one or more label folders"):
            make()
    refs = [ImageRef("x1", Path("/p/x1.jpg")), ImageRef("y1", Path("/p/y1.jpg")), ImageRef("z9", Path("/p/z9.jpg"))]
    assert _label_paths((str(a), str(b)), refs) == {"x1": written["x1"], "y1": written["y1"]}


def test_training_samples_take_labels_from_several_folders(tmp_path):
    from segsort_unsup.train import data as D
    from segsort_unsup.ucm.stage import UcmConfig, run

    edges, photos = tmp_path / "edges", tmp_path / "photos"
    keys = ["f1", "f2", "f3"]
    for key in keys:
        edge = np.zeros((16, 24), np.uint8)
        edge[:, 12] = 255
        edges.mkdir(exist_ok=True)
        Image.fromarray(edge).save(edges / f"{key}.png")
        _png(photos / f"{key}.png", 90)
    store = tmp_path / "segments"
    run(UcmConfig(), edges, store)
    where = {"f1": _png(tmp_path / "train" / "f1.png"), "f2": _png(tmp_path / "extra" / "f2.png")}
    samples, dropped = D.list_samples(store, images=photos, labels=(str(tmp_path / "train"), str(tmp_path / "extra")))
    assert {s.key: Path(s.label) for s in samples} == where
    assert [key for key, _ in dropped] == ["f3"]
    assert "train" in dropped[0][1] and "extra" in dropped[0][1]
    _png(tmp_path / "extra" / "f1.png")
    with pytest.raises(InputError, match="'f1' is found twice"):
        D.list_samples(store, images=photos, labels=(str(tmp_path / "train"), str(tmp_path / "extra")))


def test_embed_command_takes_repeated_labels_options(tmp_path, shared, hed_h5):
    """The installed `embed --labels A --labels B`: each segment stores the majority class of its
    pixels in the label PNG found in whichever folder holds it."""
    import os
    import subprocess
    import sys

    import torch

    from segsort_unsup.embed.model import build_model, save_model
    from segsort_unsup.io.images import read_image
    from segsort_unsup.io.store import StoreReader

    camvid = shared / "data" / "camvid"
    if not camvid.is_dir():
        pytest.skip("CamVid not found")
    keys = {"0001TP_006690": tmp_path / "train_labels", "0001TP_006720": tmp_path / "extra_labels"}
    maps = {}
    for i, (key, folder) in enumerate(keys.items()):
        split = "train" if (camvid / "train" / f"{key}.png").is_file() else "extra"
        rgb = read_image(camvid / split / f"{key}.png")[100:164, 160:256]
        (tmp_path / "img").mkdir(exist_ok=True)
        Image.fromarray(rgb).save(tmp_path / "img" / f"{key}.png")
        label = np.full(rgb.shape[:2], 3 + i, np.uint8)  # two classes per image, not the same in both
        label[:, : 40 + 10 * i] = 7
        maps[key] = label
        folder.mkdir()
        Image.fromarray(label).save(folder / f"{key}.png")
    torch.manual_seed(0)
    save_model(tmp_path / "model.pt", build_model({"feature_layer": "conv4_3", "embedding_dim": 8, "hidden": 16},
                                                  backbone_weights=hed_h5))
    command = [str(Path(sys.executable).parent / "segsort-unsup"), "-q", "embed", str(tmp_path / "model.pt"),
               str(tmp_path / "img"), "-o", str(tmp_path / "store"), "--precision", "fp32", "--threads", "1",
               *[arg for folder in keys.values() for arg in ("--labels", str(folder))]]
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    assert done.returncode == 0, done.stderr
    with StoreReader(tmp_path / "store", kind="prototypes") as store:
        assert sorted(store.keys()) == sorted(keys)
        for key, label in maps.items():
            item = store.read(key)
            segments, stored = item.arrays["segments"], item.arrays["label"]
            assert len(stored) == segments.max() + 1
            for k, cls in enumerate(stored):  # the stored class is a most frequent one of the segment's pixels
                counts = np.bincount(label[segments == k], minlength=256)
                assert counts[cls] == counts.max()
