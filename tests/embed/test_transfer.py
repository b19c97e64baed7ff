"""kNN label transfer: votes against a brute-force NumPy kNN, PNGs, and the input errors."""

from __future__ import annotations

import numpy as np
import pytest

from segsort_unsup.transfer.stage import (TransferConfig, build_index, class_weights, knn_votes, pixel_labels,
                                          run)
from segsort_unsup.errors import InputError, StoreError
from segsort_unsup.io.outdir import MANIFEST_NAME, OutputFolderError
from segsort_unsup.io.store import Item, StoreWriter


def _brute_votes(query, protos, labels, k, num_classes):
    sim = query.astype(np.float64) @ protos.astype(np.float64).T
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(query), num_classes))
    for i, row in enumerate(order):
        for j in row:
            votes[i, labels[j]] += 1
    return votes


def _clear_rows(query, protos, k, gap=1e-5):
    """Rows whose k-th and (k+1)-th float64 similarities are more than ``gap`` apart: there the k
    nearest do not depend on float32 rounding, which differs between CPUs."""
    sim = -np.sort(-(query.astype(np.float64) @ protos.astype(np.float64).T), axis=1)
    return np.ones(len(query), bool) if k >= sim.shape[1] else sim[:, k - 1] - sim[:, k] > gap


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def real_prototypes(bsds, hed_h5):
    """Real prototypes: pixel-sorted segments of two BSDS500 val images' embeddings (tests/embed
    real_batch), labelled by their ground-truth regions."""
    import torch

    from segsort_unsup.embed.stage import segment_table
    from segsort_unsup.embed.sorting import pixel_sort

    from . import real_batch

    batch = real_batch(bsds, hed_h5)
    emb = torch.from_numpy(batch["emb"])
    gt = batch["gt"]
    valid = torch.from_numpy(gt != 255)
    seg = pixel_sort(emb, valid=valid, grid=(8, 8)).numpy()
    tables = [segment_table(emb[i], seg[i], np.where(gt[i] != 255, gt[i] % 7, -1)) for i in range(2)]
    return tables, seg


def test_knn_votes_equal_brute_force_on_real_prototypes(real_prototypes):
    (lab, qry), _ = real_prototypes
    protos, labels = lab["prototypes"], lab["label"].astype(np.int64)
    for k in (1, 5, 15):
        votes = knn_votes(qry["prototypes"], build_index(protos), labels, k=k, num_classes=7)
        clear = _clear_rows(qry["prototypes"], protos, k)
        assert clear.mean() > 0.95
        np.testing.assert_array_equal(votes[clear], _brute_votes(qry["prototypes"], protos, labels, k, 7)[clear])


def test_class_weights_restate_the_formula():
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 3])  # counts 6, 2, 0, 1: mean over present classes 3
    np.testing.assert_allclose(class_weights(labels, 4, 0.5), [(3 / 6) ** 0.5, (3 / 2) ** 0.5, 0.0, 3 ** 0.5],
                               rtol=1e-6)
    np.testing.assert_allclose(class_weights(labels, 4, 1.0), [0.5, 1.5, 0.0, 3.0], rtol=1e-6)
    np.testing.assert_array_equal(class_weights(labels, 4, 0.0), np.ones(4, np.float32))


def test_balanced_votes_equal_brute_force_times_the_class_weights(real_prototypes):
    (lab, qry), _ = real_prototypes
    protos, labels = lab["prototypes"], lab["label"].astype(np.int64)
    w = class_weights(labels, 7, 0.5)
    votes = knn_votes(qry["prototypes"], build_index(protos), labels, k=15, num_classes=7, weights=w)
    clear = _clear_rows(qry["prototypes"], protos, 15)
    np.testing.assert_allclose(votes[clear], (_brute_votes(qry["prototypes"], protos, labels, 15, 7) * w)[clear],
                               rtol=1e-6)


def test_balanced_votes_let_a_rare_class_win_where_plain_votes_do_not(tmp_path):
    from segsort_unsup.io.images import read_label_png

    rng = np.random.default_rng(3)
    near = np.array([1.0] + [0.0] * 7, np.float32)
    common = near + 0.05 * rng.standard_normal((10, 8)).astype(np.float32)
    rare = near + 0.05 * rng.standard_normal((2, 8)).astype(np.float32)
    far = -near + 0.05 * rng.standard_normal((30, 8)).astype(np.float32)  # class 0 far away: counts only
    protos = np.concatenate([common, rare, far])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    labels = [1] * 10 + [2] * 2 + [0] * 30
    seg = np.arange(len(protos), dtype=np.int32).reshape(6, 7)
    _store(tmp_path / "lab", [_item("a", protos, seg, labels)])
    _store(tmp_path / "q", [_item("b", near[None], np.zeros((3, 3), np.int32))])
    plain = run(TransferConfig(k=12), [tmp_path / "lab", tmp_path / "q"], tmp_path / "plain")
    balanced = run(TransferConfig(k=12, balance=2.0), [tmp_path / "lab", tmp_path / "q"], tmp_path / "bal")
    assert plain.ok and balanced.ok
    # plain: 10 votes of class 1 beat 2 of class 2; balanced (counts 30, 10, 2, mean 14, squared):
    # 10 * 1.4 ** 2 < 2 * 7 ** 2
    assert (read_label_png(tmp_path / "plain" / "b.png") == 1).all()
    assert (read_label_png(tmp_path / "bal" / "b.png") == 2).all()
    import json

    record = json.loads((tmp_path / "bal" / "transfer.json").read_text())
    np.testing.assert_allclose(record["class_weights"], [(14 / 30) ** 2, 1.4 ** 2, 49.0], rtol=1e-5)
    assert "balance" not in TransferConfig().identity()  # stores made before the setting keep their identity
    with pytest.raises(InputError, match="balance"):
        TransferConfig(balance=5.0)


def test_ivf_index_finds_the_same_neighbours_with_every_cell_probed():
    rng = np.random.default_rng(0)
    protos, query = _unit(rng, 2000, 32), _unit(rng, 100, 32)
    labels = rng.integers(0, 5, 2000)
    exact = knn_votes(query, build_index(protos), labels, k=15, num_classes=5)
    approx = knn_votes(query, build_index(protos, index="ivf", nlist=8, nprobe=8), labels, k=15, num_classes=5)
    np.testing.assert_array_equal(exact, approx)


@pytest.mark.parametrize("rows, cols", [(256, 8192), (7, 13), (1000, 5)])
def test_exact_search_finds_faiss_flat_neighbours_in_faiss_order(rows, cols):
    """The blocked search against faiss's IndexFlatIP (peer): the same k nearest, best first, with
    blocks that split the queries and the prototypes unevenly (and narrower than k)."""
    import faiss

    from segsort_unsup.transfer.stage import ExactSearch

    rng = np.random.default_rng(5)
    protos, query = _unit(rng, 3001, 24), _unit(rng, 517, 24)
    peer = faiss.IndexFlatIP(24)
    peer.add(protos)
    want_scores, want_ids = peer.search(query, 15)
    search = ExactSearch(protos, rows=rows, cols=cols)
    scores, ids = search.search(query, 15)
    assert search.ntotal == 3001 and ids.shape == (517, 15) and ids.dtype == np.int64
    exact = query.astype(np.float64) @ protos.T.astype(np.float64)
    kth = -np.sort(-exact, axis=1)[:, 14:15]
    # the k nearest by float64 similarity, each once; at the k-th place a near-tie (within float32
    # rounding, which differs between CPUs) may go either way, in faiss as here
    assert (np.take_along_axis(exact, ids, axis=1) >= kth - 1e-5).all()
    assert all(len(set(row)) == 15 for row in ids)
    assert (np.sort(ids, axis=1) == np.sort(want_ids, axis=1)).all(axis=1).mean() > 0.99
    np.testing.assert_allclose(scores, np.take_along_axis(exact, ids, axis=1), atol=1e-5)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()
    every_scores, every = search.search(query[:3], 5000)  # k over N: every prototype once, best first
    assert every.shape == (3, 3001) and all(sorted(row) == list(range(3001)) for row in every)
    assert (np.diff(every_scores, axis=1) <= 0).all()


def test_pixel_labels_sum_votes_over_views():
    rng = np.random.default_rng(1)
    votes = rng.integers(0, 15, (7, 4)).astype(np.float32)
    views = np.stack([rng.integers(0, 3, (6, 5)), rng.integers(3, 7, (6, 5))]).astype(np.int32)
    views[0, 0, 0] = views[1, 0, 0] = -1
    out = pixel_labels(votes, views, fill=11)
    for y in range(6):
        for x in range(5):
            if y == 0 and x == 0:
                assert out[y, x] == 11
                continue
            assert out[y, x] == np.argmax(votes[views[0, y, x]] + votes[views[1, y, x]])


def _store(path, items, kind="prototypes"):
    with StoreWriter(path, kind=kind, config={"stage": "test", "name": str(path)}) as w:
        for item in items:
            w.add(item)


def _item(key, protos, seg, label=None):
    k = len(protos)
    arrays = {"prototypes": protos.astype(np.float32), "segments": seg.astype(np.int32),
              "area": np.bincount(seg[seg >= 0].ravel(), minlength=k).astype(np.int64), "bbox": np.zeros((k, 4), np.int32)}
    if label is not None:
        arrays["label"] = np.asarray(label, np.int32)
    return Item(key, arrays)


def test_transfer_writes_label_pngs_equal_to_brute_force(real_prototypes, tmp_path):
    from segsort_unsup.io.images import read_label_png

    (lab, qry), seg = real_prototypes
    _store(tmp_path / "lab", [_item("a", lab["prototypes"], np.maximum(seg[0], 0), lab["label"])])
    _store(tmp_path / "q", [_item("dir/b", qry["prototypes"], seg[1])])
    summary = run(TransferConfig(k=15), [tmp_path / "lab", tmp_path / "q"], tmp_path / "out")
    assert summary.done == 1 and summary.ok
    got = read_label_png(tmp_path / "out" / "dir" / "b.png")
    votes = _brute_votes(qry["prototypes"], lab["prototypes"], lab["label"], 15, int(lab["label"].max()) + 1)
    expected = np.where(seg[1] >= 0, votes.argmax(axis=1)[np.maximum(seg[1], 0)], 255)
    np.testing.assert_array_equal(got, expected)
    # same settings: resumes (skips); other settings: refused without --overwrite
    assert run(TransferConfig(k=15), [tmp_path / "lab", tmp_path / "q"], tmp_path / "out").skipped == 1
    with pytest.raises(OutputFolderError, match="overwrite"):
        run(TransferConfig(k=3), [tmp_path / "lab", tmp_path / "q"], tmp_path / "out")
    # under `run` ("changed"): the same settings resume, other settings start over with the new k
    assert run(TransferConfig(k=15), [tmp_path / "lab", tmp_path / "q"], tmp_path / "out",
               overwrite="changed").skipped == 1
    (tmp_path / "out" / "user.png").write_bytes(b"a user's picture, not written by transfer")
    again = run(TransferConfig(k=3), [tmp_path / "lab", tmp_path / "q"], tmp_path / "out", overwrite="changed")
    assert again.done == 1 and (tmp_path / "out" / "user.png").read_bytes().startswith(b"a user's")
    votes = _brute_votes(qry["prototypes"], lab["prototypes"], lab["label"], 3, int(lab["label"].max()) + 1)
    expected = np.where(seg[1] >= 0, votes.argmax(axis=1)[np.maximum(seg[1], 0)], 255)
    np.testing.assert_array_equal(read_label_png(tmp_path / "out" / "dir" / "b.png"), expected)


def test_a_balanced_transfer_after_a_plain_one_reads_its_counts_and_writes_the_same_pngs(real_prototypes,
                                                                                          tmp_path, monkeypatch):
    from segsort_unsup.io.images import read_label_png
    from segsort_unsup.transfer import stage

    (lab, qry), seg = real_prototypes
    _store(tmp_path / "lab", [_item("a", lab["prototypes"], np.maximum(seg[0], 0), lab["label"])])
    _store(tmp_path / "q", [_item("b", qry["prototypes"], seg[1]), _item("c", qry["prototypes"][::-1], seg[1])])
    stores = [tmp_path / "lab", tmp_path / "q"]
    searched = []
    counts = stage.neighbour_counts
    monkeypatch.setattr(stage, "neighbour_counts", lambda *a, **kw: searched.append(1) or counts(*a, **kw))
    stage.COUNTS_MEMO.clear()
    assert run(TransferConfig(k=15), stores, tmp_path / "plain").done == 2 and len(searched) == 2
    assert run(TransferConfig(k=15, balance=0.5), stores, tmp_path / "bal").done == 2 and len(searched) == 2
    assert run(TransferConfig(k=5, balance=0.5), stores, tmp_path / "k5").done == 2 and len(searched) == 4
    stage.COUNTS_MEMO.clear()  # the reference: the balanced transfer searching for itself
    assert run(TransferConfig(k=15, balance=0.5), stores, tmp_path / "ref").done == 2 and len(searched) == 6
    for key in ("b", "c"):
        np.testing.assert_array_equal(read_label_png(tmp_path / "bal" / f"{key}.png"),
                                      read_label_png(tmp_path / "ref" / f"{key}.png"))
    assert not (read_label_png(tmp_path / "bal" / "b.png") == read_label_png(tmp_path / "plain" / "b.png")).all()
    # another labelled set under the same name is searched again
    _store(tmp_path / "lab2", [_item("a", lab["prototypes"][::-1], np.maximum(seg[0], 0), lab["label"])])
    run(TransferConfig(k=15, balance=0.5), [tmp_path / "lab2", tmp_path / "q"], tmp_path / "other")
    assert len(searched) == 8


def test_the_counts_memo_drops_its_oldest_searches_beyond_its_limit():
    from segsort_unsup.transfer.stage import CountsMemo

    memo = CountsMemo(limit=3 * 10 * 4 * 2)  # three (10, 4) uint16 count arrays
    memo.put("s1", ("a", "sha"), np.ones((10, 4), np.float32))  # replaced below: counted once
    for search in ("s1", "s2", "s3"):
        memo.put(search, ("a", "sha"), np.full((10, 4), 2.0, np.float32))
    np.testing.assert_array_equal(memo.get("s1", ("a", "sha")), np.full((10, 4), 2.0, np.float32))
    memo.put("s4", ("a", "sha"), np.full((10, 4), 3.0, np.float32))
    assert memo.get("s1", ("a", "sha")) is None
    np.testing.assert_array_equal(memo.get("s4", ("a", "sha")), np.full((10, 4), 3.0, np.float32))
    assert memo.get("s2", ("a", "sha")).dtype == np.float32
    memo.put("s5", ("a", "sha"), np.zeros((1000, 4), np.float32))  # larger than the whole memo: not kept
    assert memo.get("s5", ("a", "sha")) is None and memo.get("s4", ("a", "sha")) is not None


def test_transfer_input_errors(tmp_path):
    rng = np.random.default_rng(2)
    seg = np.zeros((4, 4), np.int32)
    seg[2:] = 1
    _store(tmp_path / "lab", [_item("a", _unit(rng, 2, 8), seg, [0, 1])])
    _store(tmp_path / "nolab", [_item("a", _unit(rng, 2, 8), seg)])
    _store(tmp_path / "q", [_item("b", _unit(rng, 2, 8), seg)])
    _store(tmp_path / "q3", [_item("b", _unit(rng, 2, 8), seg, [0, 3])])
    _store(tmp_path / "empty", [])
    with StoreWriter(tmp_path / "contours", kind="contours", config={"stage": "contours"}) as w:
        w.add(Item("a", {"edge": np.zeros((4, 4), np.float16), "orientation": np.zeros((4, 4), np.float16)}))
    (tmp_path / "plain").mkdir()
    cfg = TransferConfig()
    with pytest.raises(StoreError, match="contours"):
        run(cfg, [tmp_path / "contours", tmp_path / "q"], tmp_path / "o1")
    with pytest.raises(InputError, match="not a store"):
        run(cfg, [tmp_path / "lab", tmp_path / "plain"], tmp_path / "o2")
    with pytest.raises(StoreError, match="empty"):
        run(cfg, [tmp_path / "lab", tmp_path / "empty"], tmp_path / "o3")
    with pytest.raises(StoreError, match="no labels"):
        run(cfg, [tmp_path / "nolab", tmp_path / "q"], tmp_path / "o4")
    with pytest.raises(InputError, match="class sets differ"):
        run(cfg, [tmp_path / "lab", tmp_path / "q3"], tmp_path / "o5")
    with pytest.raises(InputError, match="k"):
        TransferConfig(k=0)


def test_cli_embed_transfer_evaluate(tmp_path, shared, hed_h5):
    """The three commands chained on two CamVid crops (labelled = query here)."""
    from click.testing import CliRunner

    from segsort_unsup.cli import main

    from .test_infer import CAMVID_KEYS, CROP

    import cv2
    import torch

    from segsort_unsup.embed.model import build_model, save_model
    from segsort_unsup.io.images import read_image

    root = shared / "data" / "camvid"
    if not root.is_dir():
        pytest.skip("CamVid not found")
    for sub in ("img", "lab"):
        (tmp_path / sub).mkdir()
    for key in CAMVID_KEYS:
        cv2.imwrite(str(tmp_path / "img" / f"{key}.png"), read_image(root / "train" / f"{key}.png")[CROP][..., ::-1])
        cv2.imwrite(str(tmp_path / "lab" / f"{key}.png"),
                    cv2.imread(str(root / "trainannot" / f"{key}.png"), cv2.IMREAD_UNCHANGED)[CROP])
    torch.manual_seed(0)
    save_model(tmp_path / "model.pt", build_model({"feature_layer": "conv4_3", "embedding_dim": 8, "hidden": 16},
                                                  backbone_weights=hed_h5))
    runner = CliRunner()
    r = runner.invoke(main, ["-q", "embed", str(tmp_path / "model.pt"), str(tmp_path / "img"), "-o",
                             str(tmp_path / "p"), "--labels", str(tmp_path / "lab"), "--ignore-label", "11",
                             "--features", "trunk"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["-q", "transfer", str(tmp_path / "p"), str(tmp_path / "p"), "-o", str(tmp_path / "pred"),
                             "--k", "1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["-q", "evaluate", "semantic", str(tmp_path / "pred"), "--gt", str(tmp_path / "lab"),
                             "-o", str(tmp_path / "ev"), "--ignore-label", "11", "--num-classes", "11"])
    assert r.exit_code == 0, r.output
    import json

    scores = json.loads((tmp_path / "ev" / "semantic.json").read_text())
    # k = 1 against its own prototypes: every segment takes its own majority class
    assert scores["pixel_accuracy"] > 0.6
    r = runner.invoke(main, ["-q", "transfer", str(tmp_path / "img"), str(tmp_path / "p"), "-o", str(tmp_path / "x")])
    assert r.exit_code != 0 and "not a store" in r.output


def test_retrieve_pictures_and_query_errors(tmp_path):
    import cv2

    from segsort_unsup.transfer.retrieve import cutout, parse_query, read_class_names, run_retrieve

    rng = np.random.default_rng(3)
    paths = []
    for i in range(3):
        img = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / f"im{i}.png"), img)
        paths.append(str(tmp_path / f"im{i}.png"))
    seg = np.zeros((40, 60), np.int32)
    seg[:, 30:] = 1
    with StoreWriter(tmp_path / "s", kind="prototypes", config={"stage": "t"}) as w:
        for i in range(3):
            item = _item(f"im{i}", _unit(rng, 2, 8), seg, [0, 1])
            item.attrs["source"] = paths[i]
            w.add(item)
    (tmp_path / "names.txt").write_text("0 Sky\n1 Road\n")
    written = run_retrieve(tmp_path / "s", tmp_path / "s", tmp_path / "out", queries=[parse_query("im0:1")], top=3,
                           class_names=read_class_names(tmp_path / "names.txt"))
    assert [p.name for p in written] == ["im0-1.png"] and (tmp_path / "out" / "index.html").is_file()
    html = (tmp_path / "out" / "index.html").read_text()
    assert "im0:" not in html.split("nearest:")[1].split("</p>")[0]  # own image never retrieved
    # random sample, seeded: same queries twice
    a = run_retrieve(tmp_path / "s", tmp_path / "s", tmp_path / "r1", n=2, seed=5, min_area=10)
    b = run_retrieve(tmp_path / "s", tmp_path / "s", tmp_path / "r2", n=2, seed=5, min_area=10)
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 2
    tile = cutout(cv2.imread(paths[0])[..., ::-1], seg == 1, height=50)
    assert tile.shape[0] == 50
    # a thin segment keeps a tile wide enough for its caption; a tiny one is shown in its surroundings
    canvas = np.full((200, 300, 3), 128, np.uint8)
    thin = np.zeros((200, 300), bool)
    thin[40:160, 150:152] = True
    assert cutout(canvas, thin, height=50).shape[1] >= 0.8 * 50 - 1
    dot = np.zeros((200, 300), bool)
    dot[100:103, 10:13] = True
    tile = cutout(canvas, dot, height=60, dim=0.0, context=0.0)
    background = 255 * 0.35  # dim 0: context pixels take the backdrop grey
    segment_and_outline = (np.abs(tile.astype(float) - background) > 2).any(axis=2)
    assert tile.shape[1] >= 48 and segment_and_outline.mean() < 0.03  # a 3-pixel dot in a 30-pixel window
    # a strip far wider than 3:1 keeps its shape: shrunk to 3 heights wide, centred on white rows
    strip = np.zeros((100, 600), bool)
    strip[45:55, :] = True
    tile = cutout(np.full((100, 600, 3), 128, np.uint8), strip, height=50)
    crop_rows = 10 + 2 * (int(10 * 0.3) + 4)  # the strip and its context above and below
    shown = np.flatnonzero((tile != 255).any(axis=(1, 2)))
    assert tile.shape == (50, 150, 3) and len(shown) == round(crop_rows * 150 / 600)
    assert shown.min() == (50 - len(shown)) // 2
    with pytest.raises(InputError, match="KEY:SEGMENT"):
        parse_query("nocolon")
    with pytest.raises(InputError, match="segments 0..1"):
        run_retrieve(tmp_path / "s", tmp_path / "s", tmp_path / "o", queries=[parse_query("im0:7")])
    with pytest.raises(InputError, match="no image"):
        run_retrieve(tmp_path / "s", tmp_path / "s", tmp_path / "o", queries=[parse_query("zz:0")])


def test_retrieve_shows_a_region_of_several_views_once(tmp_path):
    """A two-view labelled store (ucm units: the same regions in both views, ids K0 apart): the
    nearest prototypes are the two views of one region, yet the picture shows ``top`` distinct
    regions, ranked by their nearest view's cosine, as a brute-force ranking over regions says."""
    import cv2

    from segsort_unsup.transfer.retrieve import parse_query, run_retrieve

    rng = np.random.default_rng(11)
    seg = np.zeros((20, 30), np.int32)
    seg[:, 10:20], seg[:, 20:] = 1, 2
    query_vec = _unit(rng, 1, 8)[0]
    best = {}
    with StoreWriter(tmp_path / "lab", kind="prototypes", config={"stage": "t"}) as w:
        for key in ("a", "b"):
            base = _unit(rng, 3, 8)
            protos = np.concatenate([base, base + 0.05 * _unit(rng, 3, 8)])  # view 2: nearly the same rows
            protos /= np.linalg.norm(protos, axis=1, keepdims=True)
            if key == "a":
                protos[0] = protos[3] = query_vec  # region 0 of a: the nearest, in both views
            item = _item(key, protos, seg, [0, 1, 2] * 2)
            item.arrays["views"] = np.stack([seg, seg + 3])
            cv2.imwrite(str(tmp_path / f"{key}.png"), rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
            item.attrs.update(source=str(tmp_path / f"{key}.png"), views=2)
            w.add(item)
            for region in range(3):
                best[(key, region)] = max(protos[region] @ query_vec, protos[region + 3] @ query_vec)
    with StoreWriter(tmp_path / "q", kind="prototypes", config={"stage": "t"}) as w:
        item = _item("c", query_vec[None], np.zeros((20, 30), np.int32))
        cv2.imwrite(str(tmp_path / "c.png"), np.zeros((20, 30, 3), np.uint8))
        item.attrs["source"] = str(tmp_path / "c.png")
        w.add(item)
    run_retrieve(tmp_path / "lab", tmp_path / "q", tmp_path / "out", queries=[parse_query("c:0")], top=4)
    nearest = (tmp_path / "out" / "index.html").read_text().split("nearest: ")[1].split("</p>")[0].split("; ")
    shown = [(n.split(":")[0], int(n.split(":")[1].split(" ")[0]) % 3) for n in nearest]
    assert shown == sorted(best, key=lambda region: -best[region])[:4]
    assert nearest[0].startswith("a:0 ") and "(1.000, class 0)" in nearest[0]


# -- the output folder: manifest, overwrite, resume, names, lock --------------------------------------
def _toy_stores(tmp_path, query_keys):
    """A labelled store (two classes split left/right) and a query store with ``query_keys``."""
    rng = np.random.default_rng(7)
    seg = np.zeros((6, 8), np.int32)
    seg[:, 4:] = 1
    protos = _unit(rng, 2, 8)
    _store(tmp_path / "lab", [_item("l", protos, seg, [0, 1])])
    _store(tmp_path / "q", [_item(key, protos[::-1], seg) for key in query_keys])
    # reference: each query segment is its labelled twin (k=1): segment 0 carries class 1, segment 1 class 0
    return np.where(seg == 0, 1, 0)


def _labels(path):
    from segsort_unsup.io.images import read_label_png

    return read_label_png(path)


def test_transfer_overwrite_removes_only_its_own_pngs(tmp_path):
    expected = _toy_stores(tmp_path, ["a", "sub/b"])
    out = tmp_path / "out"
    assert run(TransferConfig(k=1), [tmp_path / "lab", tmp_path / "q"], out).done == 2
    (out / "holiday.png").write_bytes(b"a user's photo")
    (out / "sub" / "mine.png").write_bytes(b"another")
    (out / "album").mkdir()
    (out / "album" / "x.png").write_bytes(b"a third")
    summary = run(TransferConfig(k=1), [tmp_path / "lab", tmp_path / "q"], out, overwrite=True)
    assert summary.done == 2 and summary.skipped == 0
    assert (out / "holiday.png").read_bytes() == b"a user's photo"
    assert (out / "sub" / "mine.png").read_bytes() == b"another"
    assert (out / "album" / "x.png").read_bytes() == b"a third"
    np.testing.assert_array_equal(_labels(out / "sub" / "b.png"), expected)
    import json

    listed = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert sorted(listed) == ["a.png", "made_from.json", "sub/b.png", "transfer.json"]


def test_transfer_refuses_a_folder_of_photos_and_leaves_it_alone(tmp_path):
    _toy_stores(tmp_path, ["a"])
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(b"a photo named like a key")
    for overwrite in (False, True):
        with pytest.raises(OutputFolderError, match="not written by segsort-unsup; choose an empty folder"):
            run(TransferConfig(k=1), [tmp_path / "lab", tmp_path / "q"], photos, overwrite=overwrite)
    assert [p.name for p in photos.iterdir()] == ["a.png"]
    assert (photos / "a.png").read_bytes() == b"a photo named like a key"


def test_transfer_redoes_pngs_the_manifest_does_not_record(tmp_path):
    expected = _toy_stores(tmp_path, ["a", "b"])
    out = tmp_path / "out"
    run(TransferConfig(k=1), [tmp_path / "lab", tmp_path / "q"], out)
    (out / "a.png").write_bytes(b"replaced by hand")  # another size: not the recorded file
    (out / "b.png").unlink()
    with StoreWriter(tmp_path / "q", kind="prototypes", config={"stage": "test", "name": str(tmp_path / "q")}) as w:
        rng = np.random.default_rng(7)
        seg = np.zeros((6, 8), np.int32)
        seg[:, 4:] = 1
        w.add(_item("c", _unit(rng, 2, 8)[::-1], seg))  # the same twins as _toy_stores draws
    (out / "c.png").write_bytes(b"named like the new key, unlisted")
    summary = run(TransferConfig(k=1), [tmp_path / "lab", tmp_path / "q"], out)
    assert (summary.done, summary.skipped) == (3, 0)
    for key in "abc":
        np.testing.assert_array_equal(_labels(out / f"{key}.png"), expected)


def test_transfer_keys_that_would_leave_the_folder_fail_alone(tmp_path):
    outside = tmp_path / "abs_escape"
    keys = ["good", str(outside), "../../escaped", "a/../../../up"]
    expected = _toy_stores(tmp_path, keys)
    out = tmp_path / "deep" / "out"
    summary = run(TransferConfig(k=1), [tmp_path / "lab", tmp_path / "q"], out)
    assert summary.done == 1 and len(summary.failed) == 3
    for key, reason in summary.failed:
        assert "\n" not in reason and repr(key) in reason
    np.testing.assert_array_equal(_labels(out / "good.png"), expected)
    written = {p for p in tmp_path.rglob("*.png")}
    assert written == {out / "good.png"}


def _console(*args):
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "segsort-unsup"
    return subprocess.Popen([str(exe), "-q", *map(str, args)], env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_transfer_processes_into_one_folder_the_second_is_refused(tmp_path):
    import signal
    import time

    from segsort_unsup.io.outdir import JOURNAL_NAME

    expected = _toy_stores(tmp_path, [f"img{i:04d}" for i in range(300)])
    out = tmp_path / "out"
    first = _console("transfer", tmp_path / "lab", tmp_path / "q", "-o", out, "--k", "1")
    journal = out / JOURNAL_NAME
    deadline = time.monotonic() + 120
    while not (journal.is_file() and journal.read_text().count("\n") >= 4):  # a few PNGs written: mid-run
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)
    try:
        written = sorted(p.name for p in out.glob("*.png"))
        second = _console("transfer", tmp_path / "lab", tmp_path / "q", "-o", out, "--k", "1")
        third = _console("transfer", tmp_path / "lab", tmp_path / "q", "-o", out, "--k", "3", "--overwrite")
        errors = [second.communicate(timeout=120)[1], third.communicate(timeout=120)[1]]
        assert sorted(p.name for p in out.glob("*.png")) == written  # --overwrite deleted nothing
    finally:
        first.send_signal(signal.SIGCONT)
    for proc, err in zip((second, third), errors):
        assert proc.returncode != 0
        assert "another segsort-unsup run is writing this folder" in err and err.strip().count("\n") == 0
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert "300 done" in err
    for key in ("img0000", "img0299"):
        np.testing.assert_array_equal(_labels(out / f"{key}.png"), expected)


def test_a_killed_transfer_resumes_and_redoes_only_what_was_not_recorded(tmp_path):
    import json
    import re
    import signal
    import time

    from segsort_unsup.io.outdir import JOURNAL_NAME

    keys = [f"img{i:04d}" for i in range(300)]
    expected = _toy_stores(tmp_path, keys)
    out = tmp_path / "out"
    first = _console("transfer", tmp_path / "lab", tmp_path / "q", "-o", out, "--k", "1")
    journal = out / JOURNAL_NAME
    deadline = time.monotonic() + 120
    while not (journal.is_file() and journal.read_text().count("\n") >= 20):
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    recorded = {json.loads(line)["file"] for line in journal.read_text().splitlines()
                if line.endswith("}") and json.loads(line).get("size") is not None}
    again = _console("transfer", tmp_path / "lab", tmp_path / "q", "-o", out, "--k", "1")
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    done, skipped = map(int, re.search(r"(\d+) done, (\d+) already complete", err).groups())
    assert skipped == len(recorded - {"transfer.json", "made_from.json"}) and done + skipped == len(keys)
    listed = json.loads((out / "transfer.json").read_text())
    assert listed["num_classes"] == 2
    for key in keys[::37]:
        np.testing.assert_array_equal(_labels(out / f"{key}.png"), expected)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_transfer_redoes_the_png_of_a_query_item_recomputed_since(tmp_path):
    """A changed photo's prototypes land in a new shard of the query store: its label PNG is redone,
    the others are kept (issue: stale results when the input changes)."""
    _toy_stores(tmp_path, ["a", "b"])
    out = tmp_path / "out"
    first = run(TransferConfig(k=1), [tmp_path / "lab", tmp_path / "q"], out)
    assert first.done == 2
    before = _labels(out / "a.png")
    from segsort_unsup.io.store import StoreReader

    with StoreReader(tmp_path / "q") as reader:
        item = reader.read("a")
    flipped = Item("a", {**item.arrays, "prototypes": item.arrays["prototypes"][::-1].copy()})
    with StoreWriter(tmp_path / "q", kind="prototypes", config={"stage": "test", "name": str(tmp_path / "q")}) as w:
        w.add(flipped)  # the same key recomputed into a new shard
    again = run(TransferConfig(k=1), [tmp_path / "lab", tmp_path / "q"], out)
    assert (again.done, again.skipped) == (1, 1)
    after = _labels(out / "a.png")
    assert not np.array_equal(before, after)  # the twins swapped: every pixel's label flipped
    assert run(TransferConfig(k=1), [tmp_path / "lab", tmp_path / "q"], out).skipped == 2
