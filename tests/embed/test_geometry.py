"""Region geometry joined to prototypes, and the leave-one-group-out choice of transfer settings:
against NumPy restatements of the formulas, and through the transfer stage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segsort_unsup.errors import InputError
from segsort_unsup.io.store import Item, StoreWriter
from segsort_unsup.transfer.geometry import SCALARS, join_geometry, region_geometry
from segsort_unsup.transfer.held_out import area_weighted_iou, held_out_votes, labelled_rows, pixel_iou
from segsort_unsup.transfer.stage import TransferConfig, run


def _segments() -> np.ndarray:
    """A 36 x 48 map: a thin tall bar (a pole), a wide band (a road), an L-shaped region, the rest."""
    seg = np.full((36, 48), 3, np.int32)
    seg[4:30, 20:23] = 0
    seg[30:36, :] = 1
    seg[2:10, 30:46] = 2
    seg[10:20, 30:34] = 2
    return seg


def _table(seg: np.ndarray) -> dict[str, np.ndarray]:
    """bbox and area as the embed stage computes them (its own code path)."""
    import torch

    from segsort_unsup.embed.stage import device_segment_table, to_host

    k = int(seg.max()) + 1
    emb = torch.nn.functional.normalize(torch.randn(8, *seg.shape, generator=torch.Generator().manual_seed(0)), dim=0)
    out = to_host(device_segment_table(emb, torch.from_numpy(seg)))
    assert len(out["area"]) == k
    return out


def _reference(seg: np.ndarray) -> np.ndarray:
    """The geometry rows restated pixel by pixel: each region's pixel extent, centre and count."""
    h, w = seg.shape
    rows = []
    for region in range(int(seg.max()) + 1):
        ys, xs = np.nonzero(seg == region)
        tall, wide = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        values = [np.log(tall / wide), (ys.min() + ys.max() + 1) / 2 / h,
                  abs((xs.min() + xs.max() + 1) / 2 / w - 0.5) * 2, len(ys) / (tall * wide), np.log(len(ys) / (h * w))]
        row = []
        for value, (low, high) in zip(values, SCALARS.values()):
            angle = (min(max(value, low), high) - low) / (high - low) * np.pi / 2
            row += [np.cos(angle), np.sin(angle)]
        rows.append(np.array(row) / np.sqrt(5))
    return np.array(rows)


def test_region_geometry_restates_the_pixels_of_each_region():
    seg = _segments()
    table = _table(seg)
    got = region_geometry(table["bbox"], table["area"], *seg.shape)
    np.testing.assert_allclose(got, _reference(seg), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    sines = got[:, 1::2] * np.sqrt(5)  # the pole is tall, the road wide, the L fills less than its box
    assert sines[0, 0] > 0.95 and sines[1, 0] < 0.3 and sines[2, 3] < sines[0, 3] == pytest.approx(1.0)


def test_mirrored_and_enlarged_views_give_the_same_geometry():
    seg = _segments()
    plain = _table(seg)
    for view in (seg[:, ::-1].copy(), np.kron(seg, np.ones((2, 2), np.int32))):
        other = _table(view)
        np.testing.assert_allclose(region_geometry(other["bbox"], other["area"], *view.shape),
                                   region_geometry(plain["bbox"], plain["area"], *seg.shape), atol=1e-6)


@pytest.mark.parametrize("weight", [0.5, 2.0, 3.0])
def test_joined_cosine_weighs_embedding_and_geometry_one_to_weight_squared(weight):
    rng = np.random.default_rng(1)
    e = rng.standard_normal((4, 6)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    seg = _segments()
    table = _table(seg)
    g = region_geometry(table["bbox"], table["area"], *seg.shape)
    joined = join_geometry(e, g, weight)
    want = (e.astype(np.float64) @ e.T + weight ** 2 * (g.astype(np.float64) @ g.T)) / (1 + weight ** 2)
    np.testing.assert_allclose(joined.astype(np.float64) @ joined.T, want, atol=1e-6)


def _store(path, items, labels=None):
    config = {"stage": "test", "name": str(path), **({"labels": [str(labels)]} if labels else {})}
    with StoreWriter(path, kind="prototypes", config=config) as writer:
        for item in items:
            writer.add(item)


def _item(key, protos, seg, label=None):
    table = _table(seg)
    arrays = {"prototypes": np.asarray(protos, np.float32), "segments": seg, "area": table["area"],
              "bbox": table["bbox"]}
    if label is not None:
        arrays["label"] = np.asarray(label, np.int32)
    return Item(key, arrays, {"height": seg.shape[0], "width": seg.shape[1]})


def test_geometry_lets_a_thin_region_find_its_thin_neighbour(tmp_path):
    """Every region has the same embedding; plain votes cannot tell the pole from the rest, the
    joined geometry can: the query's tall thin bar takes the labelled bar's class, its background
    (the whole frame) the labelled background's."""
    from segsort_unsup.io.images import read_label_png

    seg = _segments()
    same = np.tile(np.eye(1, 8, dtype=np.float32), (4, 1))
    _store(tmp_path / "lab", [_item("a", same, seg, [5, 1, 2, 3])])
    query = np.full_like(seg, 1)
    query[6:32, 10:13] = 0  # a bar elsewhere, of another length
    _store(tmp_path / "q", [_item("b", same[:2], query)])
    plain = run(TransferConfig(k=1), [tmp_path / "lab", tmp_path / "q"], tmp_path / "plain")
    joined = run(TransferConfig(k=1, geometry=2.0), [tmp_path / "lab", tmp_path / "q"], tmp_path / "joined")
    assert plain.ok and joined.ok
    labels = read_label_png(tmp_path / "joined" / "b.png")
    assert (labels[query == 0] == 5).all() and (labels[query == 1] == 3).all()
    assert len(np.unique(read_label_png(tmp_path / "plain" / "b.png"))) == 1  # a tie: one class everywhere
    assert json.loads((tmp_path / "joined" / "transfer.json").read_text())["identity"]["geometry"] == 2.0


def test_retrieve_with_geometry_ranks_by_the_joined_cosine(tmp_path):
    """`retrieve --geometry W` shows the neighbours `transfer --geometry W` votes with: the labelled
    regions ranked by (embedding cosine + W^2 geometry cosine) / (1 + W^2), restated from the pixels."""
    import cv2

    from segsort_unsup.transfer.retrieve import parse_query, run_retrieve

    seg = _segments()
    rng = np.random.default_rng(1)
    protos = (np.eye(1, 8) + 0.15 * rng.normal(size=(4, 8))).astype(np.float32)  # alike, as in one photo
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    query = np.full_like(seg, 1)
    query[6:32, 10:13] = 0
    query_protos = np.tile(protos[3:4], (2, 1))  # nearest to the background in the embedding alone
    items = []
    for key, p, s in (("a", protos, seg), ("b", query_protos, query)):
        cv2.imwrite(str(tmp_path / f"{key}.png"), rng.integers(0, 255, (*s.shape, 3), dtype=np.uint8))
        items.append(_item(key, p, s))
        items[-1].attrs["source"] = str(tmp_path / f"{key}.png")
    _store(tmp_path / "lab", items[:1])
    _store(tmp_path / "q", items[1:])
    weight = 3.0
    cosine = (protos.astype(np.float64) @ query_protos[0]
              + weight ** 2 * _reference(seg) @ _reference(query)[0]) / (1 + weight ** 2)
    for w, want in ((0.0, np.argsort(-protos @ query_protos[0])), (weight, np.argsort(-cosine))):
        run_retrieve(tmp_path / "lab", tmp_path / "q", tmp_path / f"r{w}", queries=[parse_query("b:0")], top=4,
                     geometry=w)
        page = (tmp_path / f"r{w}" / "index.html").read_text()
        nearest = page.split("nearest: ")[1].split("</p>")[0].split("; ")
        assert [int(n.split(":")[1].split(" ")[0]) for n in nearest] == list(want)
        assert ("weight 3" in page) == bool(w)
        assert want[0] == (0 if w else 3)
    assert nearest[0].startswith("a:0 ") and f"({cosine[0]:.3f})" in nearest[0]  # the bar finds the bar
    assert "geometry" not in json.loads((tmp_path / "r0.0" / ".segsort-output.json").read_text())["identity"]


def test_geometry_setting_keeps_old_identities_and_checks_its_range():
    assert TransferConfig(geometry=0.0).identity() == TransferConfig().identity()
    with pytest.raises(InputError, match="geometry"):
        TransferConfig(geometry=11.0)


def _brute_held_out(x, labels, groups, k, weights, gap=1e-5, voters=None):
    """Each row's vote over the other groups' rows (or ``voters``' rows), in float64, and whether the
    row is clear of near-ties (k-th and (k+1)-th similarities, and the two largest votes, more than
    ``gap`` apart), where float32 rounding, which differs between CPUs, cannot change the answer."""
    y, y_labels, y_groups = voters if voters is not None else (x, labels, groups)
    out, clear = np.empty(len(groups), np.int64), np.ones(len(groups), bool)
    sim = x.astype(np.float64) @ y.T.astype(np.float64)
    for i in range(len(groups)):
        other = np.nonzero(y_groups != groups[i])[0]
        order = np.argsort(-sim[i, other], kind="stable")
        nearest = other[order[:k]]
        votes = np.bincount(y_labels[nearest], minlength=len(weights)) * weights
        out[i] = int(np.argmax(votes))
        top = np.sort(votes)[::-1]
        clear[i] = (sim[i, other[order[k - 1]]] - sim[i, other[order[k]]] > gap
                    and (top[0] - top[1] > gap or np.count_nonzero(votes == top[0]) > 1
                         and np.allclose(weights, weights[0])))
    return out, clear


@pytest.mark.parametrize("balance", [0.0, 0.5])
def test_held_out_votes_equal_a_brute_force_vote_over_the_other_groups(balance):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((300, 5)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.choice(4, 300, p=[0.6, 0.25, 0.1, 0.05])
    groups = rng.choice(["s1", "s2", "s3"], 300)
    counts = np.bincount(labels, minlength=4).astype(float)
    weights = (counts.mean() / counts) ** balance
    got = held_out_votes(x, labels, groups, k=7, num_classes=4, balance=balance)
    want, clear = _brute_held_out(x, labels, groups, 7, weights)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(got[clear], want[clear])
    with pytest.raises(ValueError, match="two groups"):
        held_out_votes(x, labels, np.zeros(300), k=7)


@pytest.mark.parametrize("balance", [0.0, 0.5])
def test_held_out_votes_from_another_table_vote_over_its_other_groups(balance):
    """voters: the queries' rows only ask; the other table's rows of the other groups vote, weighed
    by the other table's class counts."""
    rng = np.random.default_rng(8)
    x, y = (rng.standard_normal((n, 5)).astype(np.float32) for n in (200, 450))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    groups, y_groups = rng.choice(["s1", "s2", "s3"], 200), rng.choice(["s1", "s2", "s3"], 450)
    y_labels = rng.choice(4, 450, p=[0.5, 0.3, 0.15, 0.05])
    counts = np.bincount(y_labels, minlength=4).astype(float)
    weights = (counts.mean() / counts) ** balance
    got = held_out_votes(x, np.zeros(200, np.int64), groups, k=7, num_classes=4, balance=balance,
                         voters=(y, y_labels, y_groups))
    want, clear = _brute_held_out(x, None, groups, 7, weights, voters=(y, y_labels, y_groups))
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(got[clear], want[clear])
    with pytest.raises(ValueError, match="two groups"):
        held_out_votes(x, np.zeros(200, np.int64), np.full(200, "s1"), voters=(y, y_labels, np.full(450, "s1")))


def test_area_weighted_iou_restates_the_definition():
    truth = np.array([0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0])
    area = np.array([10, 5, 3, 2, 4])
    # class 0: hit 10, truth 15, predicted 14 -> 10 / 19; class 1: 5 / (5 + 10 - 5); class 2: 0 / 4
    np.testing.assert_allclose(area_weighted_iou(truth, predicted, area, 4).iou[:3], [10 / 19, 0.5, 0.0])
    assert np.isnan(area_weighted_iou(truth, predicted, area, 4).iou[3])


def test_labelled_rows_read_every_region_with_its_image(tmp_path):
    seg = _segments()
    eye = np.eye(4, 8, dtype=np.float32)
    _store(tmp_path / "lab", [_item("s1_a", eye, seg, [0, 11, 2, 3]), _item("s2_b", eye, seg, [1, 1, 11, 0])])
    rows = labelled_rows(tmp_path / "lab", ignore_label=11)
    assert rows.keys.tolist() == ["s1_a"] * 3 + ["s2_b"] * 3
    np.testing.assert_array_equal(rows.labels, [0, 2, 3, 1, 1, 0])
    np.testing.assert_array_equal(rows.area, np.bincount(seg.ravel())[[0, 2, 3, 0, 1, 3]])
    assert rows.geometry.shape == (6, 10) and rows.prototypes.shape == (6, 8)


def test_choose_transfer_script_scores_every_setting_leaving_each_sequence_out(tmp_path, capsys):
    """pipelines/camvid/choose_transfer.py: one table row per (geometry, balance), each the held-out
    score of the library functions above."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "pipelines" / "camvid" / "choose_transfer.py"
    spec = importlib.util.spec_from_file_location("choose_transfer", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seg = _segments()
    rng = np.random.default_rng(2)
    items = []
    for n, key in enumerate(["0001TP_1", "0001TP_2", "0006R0_1", "0016E5_1"]):
        protos = rng.standard_normal((4, 8)).astype(np.float32)
        items.append(_item(key, protos / np.linalg.norm(protos, axis=1, keepdims=True), seg, [0, 1, 2, n % 3]))
        _label_png(tmp_path / "gt" / f"{key}.png", np.array([0, 1, 2, n % 3])[seg])
    _store(tmp_path / "lab", items, labels=tmp_path / "gt")
    assert module.main([str(tmp_path / "lab"), "--geometry", "0,2", "--balance", "0,0.5", "--k", "3"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 4
    rows_read = labelled_rows(tmp_path / "lab", ignore_label=11)
    groups = np.array([key.split("_")[0] for key in rows_read.keys])
    table = join_geometry(rows_read.prototypes, rows_read.geometry, 2.0)
    voted = held_out_votes(table, rows_read.labels, groups, k=3, balance=0.5)
    want = pixel_iou(tmp_path / "lab", rows_read, voted, 3, ignore_label=11)
    regions = area_weighted_iou(rows_read.labels, voted, rows_read.area, 3)
    assert rows[4].startswith(f"| 2 | 0.5 | {100 * want.miou:.1f} |")
    assert rows[4].endswith(f"| {100 * regions.miou:.1f} |")
    # --voters: another store of the same images votes; the first store's regions are painted
    voter_items = []
    for n, item in enumerate(items):
        protos = rng.standard_normal((4, 8)).astype(np.float32)
        voter_items.append(_item(item.key, protos / np.linalg.norm(protos, axis=1, keepdims=True), seg,
                                 [2, 1, 0, (n + 1) % 3]))
    _store(tmp_path / "voters", voter_items, labels=tmp_path / "gt")
    assert module.main([str(tmp_path / "lab"), "--voters", str(tmp_path / "voters"), "--geometry", "0",
                        "--balance", "0.5", "--k", "3"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0 | 0.5 |")]
    other = labelled_rows(tmp_path / "voters", ignore_label=11)
    voted = held_out_votes(rows_read.prototypes, rows_read.labels, groups, k=3, balance=0.5,
                           voters=(other.prototypes, other.labels, groups))
    want = pixel_iou(tmp_path / "lab", rows_read, voted, 3, ignore_label=11)
    assert row and row[0].startswith(f"| 0 | 0.5 | {100 * want.miou:.1f} |")
    mine = held_out_votes(rows_read.prototypes, rows_read.labels, groups, k=3, balance=0.5)
    assert not np.array_equal(voted, mine)  # the voters changed the vote


def _label_png(path, labels):
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), labels.astype(np.uint8))


def test_pixel_iou_paints_each_region_and_scores_every_pixel_against_the_label_png(tmp_path):
    """A pole inside a building region: the region's majority class is building, so a perfect vote
    per region still misses the pole's pixels; pixel_iou counts them, the region score does not."""
    seg = _segments()
    truth = np.array([1, 3, 4, 1])[seg]  # region 0 (the bar) is road-class 1; the rest as labelled
    truth[10:20, 5] = 2  # a thin pole inside region 3 (class 1 by majority)
    truth[0, :4] = 11  # void pixels are left out
    _label_png(tmp_path / "gt" / "s1_a.png", truth)
    _label_png(tmp_path / "gt" / "s2_b.png", np.array([1, 3, 4, 1])[seg])
    eye = np.eye(4, 8, dtype=np.float32)
    _store(tmp_path / "lab", [_item("s1_a", eye, seg, [1, 3, 4, 1]), _item("s2_b", eye, seg, [1, 3, 4, 1])],
           labels=tmp_path / "gt")
    rows = labelled_rows(tmp_path / "lab")
    predicted = rows.labels.copy()
    predicted[(rows.keys == "s2_b") & (rows.ids == 2)] = 0  # one wrong region in the second image
    got = pixel_iou(tmp_path / "lab", rows, predicted, 5, ignore_label=11)
    confusion = np.zeros((5, 5), np.int64)
    for key, gt in (("s1_a", truth), ("s2_b", np.array([1, 3, 4, 1])[seg])):
        painted = predicted[rows.keys == key][seg]
        ok = gt != 11
        np.add.at(confusion, (gt[ok], painted[ok]), 1)
    inter = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - inter
    want = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    np.testing.assert_allclose(got.iou, want)
    assert got.iou[2] == 0.0  # the pole's pixels are missed ...
    assert np.isnan(area_weighted_iou(rows.labels, predicted, rows.area, 5).iou[2])  # ... and no region is a pole
