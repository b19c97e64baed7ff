"""The embed stage on small real inputs: CamVid crops with their labels, an untrained vgg16-hed model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segsort_unsup.embed.stage import EmbedConfig, embed_image, image_prototypes, run, window_starts
from segsort_unsup.errors import InputError
from segsort_unsup.io.store import StoreReader

from . import assert_segments_match

CAMVID_KEYS = ("0001TP_006690", "0001TP_006810")
CROP = (slice(100, 196), slice(160, 296))  # 96 x 136: not a multiple of 8 in width
IGNORE = 11


@pytest.fixture(scope="module")
def camvid_small(shared, tmp_path_factory, hed_h5):
    """Two CamVid train crops with their label PNGs, and an untrained conv4_3 model.pt."""
    import cv2

    from segsort_unsup.embed.model import build_model, save_model
    from segsort_unsup.io.images import read_image

    root = shared / "data" / "camvid"
    if not root.is_dir():
        pytest.skip("CamVid not found")
    tmp = tmp_path_factory.mktemp("camvid")
    (tmp / "img").mkdir()
    (tmp / "lab").mkdir()
    for key in CAMVID_KEYS:
        rgb = read_image(root / "train" / f"{key}.png")[CROP]
        cv2.imwrite(str(tmp / "img" / f"{key}.png"), rgb[..., ::-1])
        lab = cv2.imread(str(root / "trainannot" / f"{key}.png"), cv2.IMREAD_UNCHANGED)[CROP]
        cv2.imwrite(str(tmp / "lab" / f"{key}.png"), lab)
    torch.manual_seed(0)
    model = build_model({"feature_layer": "conv4_3", "embedding_dim": 16, "hidden": 32}, backbone_weights=hed_h5)
    save_model(tmp / "model.pt", model)
    return tmp


def _embedding(folder, key, features="head", **kw):
    from segsort_unsup.embed.model import load_model
    from segsort_unsup.io.images import read_image

    model, _ = load_model(folder / "model.pt")
    return embed_image(model, read_image(folder / "img" / f"{key}.png"), features=features, precision="fp32", **kw)


def _np_table(emb: np.ndarray, seg: np.ndarray, lab: np.ndarray | None):
    """Brute force: per segment, majority class, prototype from its majority-class pixels."""
    k = seg.max() + 1
    protos, classes = [], []
    for s in range(k):
        inside = seg == s
        vec = emb[:, inside]
        if lab is not None:
            values, counts = np.unique(lab[inside], return_counts=True)
            c = values[np.argmax(counts)]
            classes.append(c)
            vec = emb[:, inside & (lab == c)]
        m = vec.sum(axis=1)
        protos.append(m / np.linalg.norm(m))
    return np.array(protos), np.array(classes)


@pytest.mark.parametrize("features", ["head", "trunk"])
def test_store_matches_numpy_reference(camvid_small, tmp_path, features):
    """Segments = the reference k-means restated in NumPy on the same full-resolution embeddings;
    prototypes and majority classes = brute force; ignore-label pixels dropped."""
    from segsort_unsup.io.images import read_label_png

    cfg = EmbedConfig(features=features, precision="fp32", labels=str(camvid_small / "lab"), ignore_label=IGNORE)
    summary = run(cfg, [camvid_small / "model.pt", camvid_small / "img"], tmp_path / "p")
    assert summary.done == 2 and summary.ok
    reader = StoreReader(tmp_path / "p", kind="prototypes")
    for key in CAMVID_KEYS:
        item = reader[key]
        emb = _embedding(camvid_small, key, features).numpy()
        lab = read_label_png(camvid_small / "lab" / f"{key}.png").astype(np.int64)
        valid = lab != IGNORE
        seg = item.arrays["segments"]
        assert_segments_match(seg, emb, valid)
        # the table of the stored segments (a near-tie pixel would move a prototype by ~1/area)
        protos, classes = _np_table(emb.astype(np.float64), seg, np.where(valid, lab, -1))
        np.testing.assert_array_equal(item.arrays["label"], classes)
        np.testing.assert_allclose(item.arrays["prototypes"], protos, atol=1e-5)
        for s in range(len(protos)):
            ys, xs = np.nonzero(seg == s)
            assert item.arrays["area"][s] == len(ys)
            assert tuple(item.arrays["bbox"][s]) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
    stacked, failed = reader.stack("prototypes")
    assert not failed and stacked.array.shape[0] == sum(len(reader[k].arrays["area"]) for k in CAMVID_KEYS)
    # resumable: nothing left to do
    again = run(cfg, [camvid_small / "model.pt", camvid_small / "img"], tmp_path / "p")
    assert again.done == 0 and again.skipped == 2


def test_embedding_is_upsampled_stride8_output(camvid_small):
    """Full-resolution embedding = bilinear x8 (half-pixel centres) of the network output, cropped, renormalised."""
    from segsort_unsup.embed.model import load_model
    from segsort_unsup.io.images import read_image

    model, _ = load_model(camvid_small / "model.pt")
    rgb = read_image(camvid_small / "img" / f"{CAMVID_KEYS[0]}.png")
    emb = embed_image(model, rgb, precision="fp32").numpy()
    with torch.no_grad():
        out = model(torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None])[0].numpy()
    d, h8, w8 = out.shape
    h, w = rgb.shape[:2]
    # brute-force bilinear with half-pixel centres and edge clamping
    ys = np.clip((np.arange(8 * h8) + 0.5) / 8 - 0.5, 0, h8 - 1)
    xs = np.clip((np.arange(8 * w8) + 0.5) / 8 - 0.5, 0, w8 - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h8 - 1), np.minimum(x0 + 1, w8 - 1)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    up = (out[:, y0][:, :, x0] * (1 - fy) * (1 - fx) + out[:, y1][:, :, x0] * fy * (1 - fx)
          + out[:, y0][:, :, x1] * (1 - fy) * fx + out[:, y1][:, :, x1] * fy * fx)[:, :h, :w]
    up /= np.linalg.norm(up, axis=0, keepdims=True)
    np.testing.assert_allclose(emb, up, atol=1e-5)


def test_sliding_windows_sum_each_window(camvid_small):
    """With windows smaller than the image, each pixel's embedding is the normalised sum of the
    upsampled embeddings of the windows covering it."""
    key = CAMVID_KEYS[0]
    win = _embedding(camvid_small, key, window=64, window_stride=40).numpy()
    from segsort_unsup.embed.model import load_model
    from segsort_unsup.io.images import read_image

    model, _ = load_model(camvid_small / "model.pt")
    rgb = read_image(camvid_small / "img" / f"{key}.png")
    total = np.zeros_like(win)
    for y0 in window_starts(rgb.shape[0], 64, 40):
        for x0 in window_starts(rgb.shape[1], 64, 40):
            crop = rgb[y0:y0 + 64, x0:x0 + 64]
            total[:, y0:y0 + 64, x0:x0 + 64] += embed_image(model, crop, precision="fp32").numpy()
    total /= np.linalg.norm(total, axis=0, keepdims=True)
    np.testing.assert_allclose(win, total, atol=1e-5)


def test_window_starts_cover_like_the_reference():
    for length, window, stride in [(100, 100, 50), (481, 480, 320), (1000, 480, 320), (2000, 64, 40)]:
        starts = window_starts(length, window, stride)
        n = int(np.ceil((length - window) / stride)) + 1 if length > window else 1
        assert len(starts) == n and starts[0] == 0 and starts[-1] + min(window, length) == length
        assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


def test_views_flip_give_mirrored_segments(camvid_small):
    """With flip, the second view's map is the sorting of the mirrored image's embedding, mirrored back."""
    from segsort_unsup.embed.model import load_model
    from segsort_unsup.io.images import read_image

    model, _ = load_model(camvid_small / "model.pt")
    rgb = read_image(camvid_small / "img" / f"{CAMVID_KEYS[0]}.png")
    arrays = image_prototypes(model, rgb, EmbedConfig(flip=True, precision="fp32"))
    views = arrays["views"]
    assert views.shape == (2,) + rgb.shape[:2]
    np.testing.assert_array_equal(views[0], arrays["segments"])
    k0 = views[0].max() + 1
    assert views[1].min() == k0 and views[1].max() + 1 == len(arrays["prototypes"])
    mirrored = embed_image(model, np.ascontiguousarray(rgb[:, ::-1]), precision="fp32").numpy()[:, :, ::-1]
    assert_segments_match(views[1] - k0, np.ascontiguousarray(mirrored))


def test_bad_inputs(camvid_small, tmp_path):
    cfg = EmbedConfig(precision="fp32")
    with pytest.raises(InputError, match="no model file"):
        run(cfg, [tmp_path / "missing.pt", camvid_small / "img"], tmp_path / "p")
    from segsort_unsup.errors import WeightsError

    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(WeightsError, match="junk.pt"):
        run(cfg, [tmp_path / "junk.pt", camvid_small / "img"], tmp_path / "p2")
    with pytest.raises(InputError, match="features"):
        EmbedConfig(features="conv9")
    with pytest.raises(InputError, match="window"):
        EmbedConfig(window=100)
    # an image without a label PNG and a broken image: logged and skipped, the rest stored
    import shutil

    imgs = tmp_path / "imgs"
    shutil.copytree(camvid_small / "img", imgs)
    shutil.copy(imgs / f"{CAMVID_KEYS[0]}.png", imgs / "nolabel.png")
    (imgs / "broken.png").write_bytes(b"\x89PNG garbage")
    summary = run(EmbedConfig(precision="fp32", labels=str(camvid_small / "lab"), ignore_label=IGNORE),
                  [camvid_small / "model.pt", imgs], tmp_path / "p3")
    assert summary.done == 2
    reasons = dict(summary.failed)
    assert set(reasons) == {"nolabel", "broken"}
    assert "no label PNG" in reasons["nolabel"]


@pytest.mark.slow
def test_dask_executor_gives_the_same_store(camvid_small, tmp_path):
    pytest.importorskip("distributed")
    from segsort_unsup.parallel import make_executor

    cfg = EmbedConfig(precision="fp32", labels=str(camvid_small / "lab"), ignore_label=IGNORE, threads=1)
    run(cfg, [camvid_small / "model.pt", camvid_small / "img"], tmp_path / "local")
    with make_executor("dask-local", workers=2) as pool:
        summary = run(cfg, [camvid_small / "model.pt", camvid_small / "img"], tmp_path / "dask", executor=pool)
    assert summary.done == 2
    a, b = StoreReader(tmp_path / "local"), StoreReader(tmp_path / "dask")
    assert a.keys() == b.keys()
    for key in a.keys():
        for name, arr in a[key].arrays.items():
            np.testing.assert_array_equal(arr, b[key].arrays[name])


def test_sort_stride_is_pooled_kmeans_then_one_assignment(camvid_small):
    """sort_stride=s: the reference k-means on the s x s average-pooled embedding (NumPy), then
    each full-resolution pixel takes the cluster of largest cosine, ids in first-appearance order."""
    from segsort_unsup.embed.stage import sort_pixels
    from segsort_unsup.io.images import read_label_png

    from . import np_kmeans, np_grid_labels, np_unique_inverse

    key, s = CAMVID_KEYS[0], 4
    emb = _embedding(camvid_small, key).numpy().astype(np.float64)
    valid = read_label_png(camvid_small / "lab" / f"{key}.png") != IGNORE
    got = sort_pixels(torch.from_numpy(emb).float(), valid=torch.from_numpy(valid)[None], stride=s).numpy()
    d, h, w = emb.shape
    ph, pw = -(-h // s), -(-w // s)
    yy, xx = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
    feats = np.concatenate([emb, yy[None], xx[None]])
    pooled = np.zeros((d + 2, ph, pw))
    pvalid = np.zeros((ph, pw), bool)
    for i in range(ph):
        for j in range(pw):
            cell = feats[:, i * s:(i + 1) * s, j * s:(j + 1) * s].reshape(d + 2, -1).mean(axis=1)
            e = cell[:d] / np.linalg.norm(cell[:d])
            pooled[:, i, j] = np.concatenate([e, cell[d:]])
            pvalid[i, j] = valid[i * s:(i + 1) * s, j * s:(j + 1) * s].all()
    x = pooled.reshape(d + 2, -1).T
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    keep = pvalid.ravel()
    small = np_kmeans(x[keep], np_grid_labels(ph, pw).ravel()[keep], 25)
    small = np_unique_inverse(small)[1]
    centres = np.stack([x[keep][small == c].sum(0) for c in range(small.max() + 1)])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    full = feats.reshape(d + 2, -1).T
    full = full / np.linalg.norm(full, axis=1, keepdims=True)
    lab = np.argmax(full @ centres.T, axis=1)
    lab = np.where(valid.ravel(), lab, -1)
    order = [v for v in dict.fromkeys(lab.tolist()) if v >= 0]
    remap = {v: i for i, v in enumerate(order)}
    expected = np.array([remap.get(v, -1) for v in lab.tolist()]).reshape(h, w)
    assert (got == expected).mean() > 0.999  # float32 vs float64 may flip a near-tie


def test_nan_model_fails_each_image_by_name_and_exits_1(camvid_small, tmp_path):
    """A model with NaN weights (a diverged training): embed stores nothing, names every image
    and the reason, and the console script exits 1."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from segsort_unsup.embed.model import load_model, save_model

    model, _ = load_model(camvid_small / "model.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    save_model(tmp_path / "nan.pt", model)
    cli = Path(sys.executable).parent / "segsort-unsup"
    result = subprocess.run([str(cli), "embed", str(tmp_path / "nan.pt"), str(camvid_small / "img"), "-o",
                             str(tmp_path / "p"), "--precision", "fp32", "--device", "cpu"],
                            capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    for key in CAMVID_KEYS:
        assert key in result.stderr + result.stdout
    assert "NaN" in result.stderr + result.stdout
    assert StoreReader(tmp_path / "p", kind="prototypes").keys() == []


def test_dense_map_is_the_atrous_network(shared, hed_h5):
    """``dense``: the shift-and-stitch map at stride 4 equals, away from the borders, the same
    weights run a-trous (pool3 at stride 1, conv4 and the 3x3 head dilated by 2), written out here
    layer by layer; and the dense embedding is that map upsampled x4 with half-pixel centres."""
    import torch.nn.functional as F

    from segsort_unsup.embed.model import build_model
    from segsort_unsup.embed.stage import shift_and_stitch
    from segsort_unsup.io.images import read_image

    torch.manual_seed(0)
    model = build_model({"feature_layer": "conv4_3", "embedding_dim": 16, "hidden": 32}, backbone_weights=hed_h5)
    rgb = read_image(shared / "data" / "camvid" / "train" / f"{CAMVID_KEYS[0]}.png")[40:290, 60:378]  # 250 x 318
    x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        dense = shift_and_stitch(lambda t: F.normalize(model(t), dim=1), x, 8)
        trunk = model.backbone
        y = trunk.features_at("pool2", F.pad(x, (2, 0, 2, 0), mode="replicate"))  # stride 4, cells centred on 4j + 1.5
        y = F.max_pool2d(trunk.block3.run_convs(y), kernel_size=2, stride=1)
        for conv in trunk.block4.convs:
            y = F.relu(F.conv2d(y, conv.weight, conv.bias, padding=2, dilation=2))
        y = F.relu(F.conv2d(y, model.head.hidden.weight, model.head.hidden.bias, padding=2, dilation=2))
        atrous = F.normalize(model.head.out(y), dim=1)
    assert dense.shape[-2:] == (63, 80)  # ceil(250 / 4), ceil(318 / 4)
    m = 16  # cells whose receptive field (about 110 px) stays inside the image
    inner = (slice(None), slice(None), slice(m, -m), slice(m, -m))
    assert atrous.shape[-2:] == (62, 79)  # the stride-1 pool has no cell past the last
    torch.testing.assert_close(dense[:, :, :62, :79][inner], atrous[inner], atol=1e-4, rtol=0)
    # the dense cells sit a quarter stride off the plain stride-8 ones: no subsampling of them gives the plain map
    plain = F.normalize(model(x), dim=1)
    assert not torch.allclose(dense[:, :, m:-m:2, m:-m:2], plain[:, :, m // 2:-m // 2, m // 2:-m // 2], atol=1e-2)
    emb = embed_image(model, rgb, dense=True, precision="fp32")
    up = F.normalize(F.interpolate(dense, scale_factor=4, mode="bilinear", align_corners=False), dim=1)[0, :, :250, :318]
    torch.testing.assert_close(emb, up, atol=1e-5, rtol=0)


def test_embedding_is_upsampled_by_the_model_stride():
    """A stride-16 trunk (a small ViT with 16 px patches) is upsampled x16, also over sliding
    windows and densely (stride 8)."""
    from segsort_unsup.embed.model import SegSortNet
    from segsort_unsup.embed.vit import ViTSpec, ViTTrunk

    torch.manual_seed(0)
    model = SegSortNet(ViTTrunk(ViTSpec(patch=16, dim=48, depth=2, heads=3, pos_grid=4)), embedding_dim=8,
                       hidden=16).eval()
    rgb = np.random.default_rng(0).integers(0, 256, (70, 100, 3)).astype(np.uint8)
    with torch.no_grad():
        out = torch.nn.functional.normalize(model(torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None]), dim=1)
    assert out.shape[-2:] == (5, 7)
    emb = embed_image(model, rgb, precision="fp32")
    up = torch.nn.functional.interpolate(out, scale_factor=16, mode="bilinear", align_corners=False)[0, :, :70, :100]
    torch.testing.assert_close(emb, torch.nn.functional.normalize(up, dim=0), atol=1e-5, rtol=0)
    for kw in ({"window": 64, "window_stride": 32}, {"dense": True}):
        assert embed_image(model, rgb, precision="fp32", **kw).shape == (8, 70, 100)


def test_dense_is_a_setting_old_stores_do_not_change_for(camvid_small):
    """``dense`` off is left out of a store's identity (stores made before it keep theirs); on, it
    is part of it; a photo under half a stride wide still gets its embedding."""
    from segsort_unsup.embed.model import load_model

    assert "dense" not in EmbedConfig().identity() and EmbedConfig(dense=True).identity()["dense"] is True
    assert EmbedConfig().identity_hash() != EmbedConfig(dense=True).identity_hash()
    model, _ = load_model(camvid_small / "model.pt")
    thin = np.random.default_rng(0).integers(0, 256, (40, 3, 3)).astype(np.uint8)
    emb = embed_image(model, thin, dense=True, precision="fp32")
    assert emb.shape == (16, 40, 3) and torch.isfinite(emb).all()


def test_embed_gives_the_calling_process_its_threads_back(camvid_small, tmp_path, monkeypatch):
    """embed runs its model in the calling process at one inference thread. torch and faiss share
    one OpenMP runtime, so the stages after it in a pipeline run (transfer's kNN search, cluster)
    must get the process's threads back, not that one thread."""
    import faiss

    from segsort_unsup.embed import stage as embed_stage
    from segsort_unsup.stages import run_stage

    monkeypatch.setattr(embed_stage, "_MODELS", {})  # a model cached by an earlier test is not loaded again
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_stage(embed_stage.STAGE, EmbedConfig(precision="fp32"),
                  [camvid_small / "model.pt", camvid_small / "img"], tmp_path / "p")
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (2, 2)
    finally:
        torch.set_num_threads(before)
