"""Segment units of the embed stage: pixel sorting from N x N cells, or the regions of a UCM cut."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segsort_unsup.embed.stage import EmbedConfig, embed_image, image_prototypes, run
from segsort_unsup.errors import InputError
from segsort_unsup.io.store import StoreReader

from . import np_grid_labels, np_unique_inverse


@pytest.fixture(scope="module")
def tiny_model():
    from segsort_unsup.embed.model import build_model

    torch.manual_seed(0)
    return build_model({"backbone": "scratch", "feature_layer": "conv4_3", "embedding_dim": 8, "hidden": 8}).eval()


@pytest.mark.parametrize("units, n", [("grid5", 5), ("grid8", 8), ("grid12", 12)])
def test_grid_units_start_from_that_many_cells(tiny_model, units, n):
    """With no k-means iteration, the segments are the reference's initial N x N grid."""
    rgb = (np.random.default_rng(0).random((72, 100, 3)) * 255).astype(np.uint8)
    arrays = image_prototypes(tiny_model, rgb, EmbedConfig(units=units, iterations=0, precision="fp32"))
    expected = np_unique_inverse(np_grid_labels(72, 100, (n, n)).ravel())[1].reshape(72, 100)
    np.testing.assert_array_equal(arrays["segments"], expected)
    assert len(arrays["prototypes"]) == n * n


def test_units_settings_are_checked():
    for bad in ("grid", "grid0", "grid99", "ucm", "ucm:x", "slic:5"):
        with pytest.raises(InputError, match="units"):
            EmbedConfig(units=bad)
    with pytest.raises(InputError, match="segments"):
        EmbedConfig(units="ucm:0.3")
    with pytest.raises(InputError, match="segments"):
        EmbedConfig(segments="somewhere")
    with pytest.raises(InputError, match="not both"):
        EmbedConfig(units="grid8", grid=(4, 4))
    assert EmbedConfig().units_label == "grid5" and EmbedConfig(grid=(4, 6)).units_label == "grid4x6"
    # the default keeps the identity of stores made before units existed
    assert "units" not in EmbedConfig().identity()


@pytest.fixture(scope="module")
def ucm_inputs(bsds, tmp_path_factory, tiny_model):
    """Two half-size BSDS500 photos, their segments store (cuts 0.5 and 0.3) and a model.pt."""
    from segsort_unsup.embed.model import save_model

    from .train_data import make_segments

    root = tmp_path_factory.mktemp("units")
    store, images = make_segments(bsds, root, ids=("100007", "100039"), levels=(0.3,))
    save_model(root / "model.pt", tiny_model)
    return root, store, images


def test_ucm_units_give_one_prototype_per_region(ucm_inputs, tiny_model, tmp_path):
    """ucm:0.3: every region of the stored 0.3 cut is one segment; its area is the region's pixel
    count and its prototype the normalised mean embedding of its pixels (NumPy reference)."""
    from segsort_unsup.io.images import read_image

    root, store, images = ucm_inputs
    cfg = EmbedConfig(units="ucm:0.3", segments=str(store), precision="fp32", device="cpu")
    summary = run(cfg, [root / "model.pt", images], tmp_path / "p")
    assert summary.done == 2 and summary.ok
    reader = StoreReader(tmp_path / "p", kind="prototypes")
    assert reader.meta["units"] == "ucm:0.3"
    segments = StoreReader(store, kind="segments")
    for key in reader.keys():
        item = reader[key]
        regions = np.asarray(segments[key].arrays["labels_levels"])[0]
        emb = embed_image(tiny_model, read_image(images / f"{key}.png"), precision="fp32").numpy().astype(np.float64)
        order, ids = np_unique_inverse(regions.ravel())
        assert len(item.arrays["prototypes"]) == len(order) > 5
        np.testing.assert_array_equal(item.arrays["segments"].ravel(), ids)
        for s, region in enumerate(order):
            inside = regions == region
            assert item.arrays["area"][s] == inside.sum()
            mean = emb[:, inside].sum(axis=1)
            np.testing.assert_allclose(item.arrays["prototypes"][s], mean / np.linalg.norm(mean), atol=1e-5)
    # another cut is other units: other regions; a cut the store lacks is one line naming the levels
    coarse = run(EmbedConfig(units="ucm:0.5", segments=str(store), precision="fp32", device="cpu"),
                 [root / "model.pt", images], tmp_path / "q")
    assert coarse.done == 2
    assert len(StoreReader(tmp_path / "q")[key].arrays["area"]) < len(item.arrays["area"])
    with pytest.raises(InputError, match="available levels"):
        run(EmbedConfig(units="ucm:0.9", segments=str(store), precision="fp32"), [root / "model.pt", images],
            tmp_path / "r")


def test_transfer_and_retrieve_show_the_units(ucm_inputs, tmp_path):
    """The prototypes stores' units reach transfer's manifest and the retrieval page."""
    import json

    from segsort_unsup.transfer.retrieve import run_retrieve
    from segsort_unsup.transfer.stage import MANIFEST, TransferConfig
    from segsort_unsup.transfer.stage import run as transfer

    root, store, images = ucm_inputs
    labels = tmp_path / "labels"
    labels.mkdir()
    import cv2

    from segsort_unsup.io.images import read_image

    for p in sorted(images.glob("*.png")):
        h, w = read_image(p).shape[:2]
        cv2.imwrite(str(labels / p.name), (np.arange(w)[None, :] * 3 // w).repeat(h, 0).astype(np.uint8))
    run(EmbedConfig(units="ucm:0.3", segments=str(store), labels=str(labels), precision="fp32", device="cpu"),
        [root / "model.pt", images], tmp_path / "lab")
    run(EmbedConfig(units="grid8", precision="fp32", device="cpu"), [root / "model.pt", images], tmp_path / "qry")
    transfer(TransferConfig(k=3), [tmp_path / "lab", tmp_path / "qry"], tmp_path / "out")
    record = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert record["units"] == {"labelled": "ucm:0.3", "query": "grid8"}
    run_retrieve(tmp_path / "lab", tmp_path / "qry", tmp_path / "ret", n=1, min_area=1)
    page = (tmp_path / "ret" / "index.html").read_text()
    assert "(ucm:0.3 units)" in page and "(grid8 units)" in page


def np_split_by_class(segments: np.ndarray, labels: np.ndarray, min_pixels: int) -> np.ndarray:
    """Loop restatement of ``split_by_class``: (segment, class) parts, small ones in the majority's."""
    part = np.full(segments.shape, -1, np.int64)
    for s in np.unique(segments[segments >= 0]):
        inside = segments == s
        counts = np.bincount(labels[inside])
        majority = int(np.argmax(counts))  # the lowest class among equal counts
        for c in np.unique(labels[inside]):
            here = inside & (labels == c)
            part[here] = s * 1000 + (c if c == majority or counts[c] >= min_pixels else majority)
    out = np.full(segments.shape, -1, np.int64)
    flat = part.ravel()
    for new, old in enumerate(dict.fromkeys(flat[flat >= 0].tolist())):  # raster order of first appearance
        out.ravel()[flat == old] = new
    return out


def test_split_by_class_keeps_parts_of_exactly_min_pixels():
    """Segment 0's class-5 part has exactly 2 pixels: its own id at min_pixels = 2, merged at 3;
    the 1-pixel parts of segments 1 and 2 join their majority part (its segment's id order)."""
    from segsort_unsup.embed.stage import split_by_class

    segments = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 1], [-1, 2, 2, 2]])
    labels = torch.tensor([[3, 3, 5, 5], [3, 5, 5, 1], [0, 2, 2, 0]])
    assert split_by_class(segments, labels, 2).tolist() == [[0, 0, 1, 2], [0, 1, 2, 2], [-1, 3, 3, 3]]
    assert split_by_class(segments, labels, 3).tolist() == [[0, 0, 0, 1], [0, 0, 1, 1], [-1, 2, 2, 2]]


@pytest.mark.parametrize("min_pixels", [1, 6, 40, 10_000])
def test_split_by_class_matches_a_loop_restatement(min_pixels):
    from segsort_unsup.embed.stage import split_by_class

    rng = np.random.default_rng(min_pixels)
    segments = np.repeat(np.repeat(rng.integers(0, 9, (6, 8)), 5, axis=0), 5, axis=1)
    segments[rng.random(segments.shape) < 0.05] = -1
    labels = np.repeat(rng.integers(0, 4, (15, 40)), 2, axis=0)
    labels[:, 17:19] = 7  # a thin stripe across many segments
    got = split_by_class(torch.from_numpy(segments), torch.from_numpy(labels), min_pixels).numpy()
    np.testing.assert_array_equal(got, np_split_by_class(segments, labels, min_pixels))
    assert (got.max() + 1 > len(np.unique(segments[segments >= 0]))) == (min_pixels < 10_000)


def test_class_parts_give_a_thin_class_its_own_prototypes(ucm_inputs, tiny_model, tmp_path):
    """class_parts: a labelled thin stripe crossing the ucm regions becomes prototypes of its own
    (the released majority rule gives it none); each prototype is the normalised mean embedding of
    its part's pixels of its class, and its label is that class."""
    import cv2

    from segsort_unsup.io.images import read_image

    root, store, images = ucm_inputs
    labels = tmp_path / "labels"
    labels.mkdir()
    for p in sorted(images.glob("*.png")):
        h, w = read_image(p).shape[:2]
        lab = (np.arange(w)[None, :] * 2 // w).repeat(h, 0).astype(np.uint8)
        lab[:, w // 3:w // 3 + 4] = 5
        cv2.imwrite(str(labels / p.name), lab)
    common = dict(units="ucm:0.3", segments=str(store), labels=str(labels), precision="fp32", device="cpu")
    run(EmbedConfig(**common), [root / "model.pt", images], tmp_path / "released")
    run(EmbedConfig(**common, class_parts=20), [root / "model.pt", images], tmp_path / "parts")
    released, parts = StoreReader(tmp_path / "released"), StoreReader(tmp_path / "parts")
    for key in parts.keys():
        item = parts[key].arrays
        lab = cv2.imread(str(labels / f"{key}.png"), cv2.IMREAD_GRAYSCALE).astype(np.int64)
        assert (released[key].arrays["label"] == 5).sum() < (item["label"] == 5).sum()
        emb = embed_image(tiny_model, read_image(images / f"{key}.png"), precision="fp32").numpy().astype(np.float64)
        for s, cls in enumerate(item["label"]):
            own = (item["segments"] == s) & (lab == cls)
            assert own.any()
            mean = emb[:, own].sum(axis=1)
            np.testing.assert_allclose(item["prototypes"][s], mean / np.linalg.norm(mean), atol=1e-5)
    with pytest.raises(InputError, match="class_parts"):
        EmbedConfig(class_parts=20)
