"""The product path (``watershed_rag``, ``ucm2_from_regions``, float16 maps read as their bits,
merging in place) against the per-grid-edge oracle (``grid_oracle.oriented_watershed``,
``grid_oracle.ucm2_from_rag``) on float32 copies of the same maps: every output bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from segsort_unsup.edgemaps import edge_orientation
from segsort_unsup.io.store import StoreWriter, Item
from segsort_unsup.ucm.hierarchy import mean_boundary_hierarchy, ucm2_from_regions
from segsort_unsup.ucm.owt import watershed_rag
from segsort_unsup.ucm.stage import UcmConfig, _Job, process_item

from .grid_oracle import oriented_watershed, ucm2_from_rag


def _grid_path(edge, orient, **kw):
    f32 = None if orient is None else np.asarray(orient, np.float32)
    ows = oriented_watershed(np.asarray(edge, np.float32), f32, **kw)
    parents, altitudes, rag_alt = mean_boundary_hierarchy(ows)
    return ows, parents, altitudes, ucm2_from_rag(ows.edge_rag, rag_alt, ows.shape)


def _assert_same(edge, orient, **kw):
    ows, parents, altitudes, ucm2 = _grid_path(edge, orient, **kw)
    rag = watershed_rag(edge, orient, **kw)
    for name in ("leaves", "sources", "targets", "sums", "lengths"):
        a, b = getattr(ows, name), getattr(rag, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert rag.n_regions == ows.n_regions
    np.testing.assert_array_equal(rag.offsets[rag.sources], np.searchsorted(rag.sources, rag.sources))
    lean_parents, lean_alt, lean_rag_alt = mean_boundary_hierarchy(rag, consume=True)
    np.testing.assert_array_equal(lean_parents, parents)
    np.testing.assert_array_equal(lean_alt, altitudes)
    lean_ucm2 = ucm2_from_regions(rag.leaves, rag.offsets, rag.targets, lean_rag_alt)
    assert lean_ucm2.dtype == ucm2.dtype and np.array_equal(lean_ucm2, ucm2)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_lean_path_matches_grid_path_on_real_maps(gt_maps, sobel_maps, dtype):
    for _, edge, orient in (gt_maps[0], sobel_maps[1]):
        _assert_same(edge.astype(dtype), orient.astype(dtype))
    _, edge, _ = sobel_maps[0]
    _assert_same(edge.astype(dtype), None)  # plain mean boundary strength
    _assert_same(edge.astype(dtype), edge_orientation(edge).astype(dtype), single_edge_angle=None, epsilon=0.3)


def test_lean_path_matches_grid_path_on_plateaus_and_odd_shapes():
    rng = np.random.default_rng(5)
    for shape in ((1, 1), (1, 9), (9, 1), (2, 2), (17, 23), (64, 50)):
        noisy = rng.random(shape).astype(np.float16)
        plateaus = (np.round(rng.random(shape) * 3) / 3).astype(np.float16)  # ties everywhere
        for edge in (noisy, plateaus):
            orient = (rng.random(shape) * np.pi).astype(np.float16)
            _assert_same(edge, orient)
            _assert_same(edge, None)
    # subnormal, negative and zero float16 values decode exactly as astype(float32)
    special = np.array([[0.0, -0.0, 6e-8, 3e-5], [1.0, -2.5, 65504.0, 1e-3]], np.float16)
    _assert_same(special, np.abs(special))


def test_lean_path_refuses_non_finite_float16():
    edge = np.zeros((4, 4), np.float16)
    edge[1, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        watershed_rag(edge)
    with pytest.raises(ValueError, match="NaN or inf"):
        watershed_rag(np.zeros((4, 4), np.float16), np.full((4, 4), np.nan, np.float16))


def test_stage_item_from_a_float16_store_matches_grid_path(tmp_path, sobel_maps):
    _, edge, orient = sobel_maps[0]
    edge16, orient16 = edge.astype(np.float16), orient.astype(np.float16)
    with StoreWriter(tmp_path / "c", kind="contours", config={"test": 1}) as writer:
        writer.add(Item("a", {"edge": edge16, "orientation": orient16}, {"source": "a.jpg"}))
    cfg = UcmConfig(threshold=0.2, levels=(0.1, 0.3))
    item = process_item(_Job("a", "store", str(tmp_path / "c"), cfg))
    ows, parents, altitudes, ucm2 = _grid_path(edge16, orient16)
    np.testing.assert_array_equal(item.arrays["ucm2"], ucm2)
    np.testing.assert_array_equal(item.arrays["parents"], parents)
    np.testing.assert_array_equal(item.arrays["altitudes"], altitudes)
    np.testing.assert_array_equal(item.arrays["leaves"], ows.leaves)
    from segsort_unsup.ucm.hierarchy import cut_labels

    np.testing.assert_array_equal(item.arrays["labels"], cut_labels(parents, altitudes, threshold=0.2)[ows.leaves])
    np.testing.assert_array_equal(item.arrays["labels_levels"][1],
                                  cut_labels(parents, altitudes, threshold=0.3)[ows.leaves])


def test_uint16_ucm2_is_the_quantised_float32_ucm2(tmp_path, sobel_maps, monkeypatch):
    from segsort_unsup.ucm import stage
    from segsort_unsup.ucm.hierarchy import labels_from_ucm2, ucm2_values

    _, edge, orient = sobel_maps[1]
    with StoreWriter(tmp_path / "c", kind="contours", config={"test": 2}) as writer:
        writer.add(Item("a", {"edge": edge.astype(np.float16), "orientation": orient.astype(np.float16)}, {}))
    root = str(tmp_path / "c")
    ref = process_item(_Job("a", "store", root, UcmConfig(ucm2_dtype="float32")))
    auto = process_item(_Job("a", "store", root, UcmConfig()))  # a small map: float32, bit for bit
    assert auto.arrays["ucm2"].dtype == np.float32 and np.array_equal(auto.arrays["ucm2"], ref.arrays["ucm2"])
    monkeypatch.setattr(stage, "UINT16_ABOVE_PIXELS", edge.size - 1)  # as a huge map
    q = process_item(_Job("a", "store", root, UcmConfig()))
    assert q.arrays["ucm2"].dtype == np.uint16
    f = ref.arrays["ucm2"].astype(np.float64)
    scale = q.attrs["ucm2_scale"]
    assert scale == pytest.approx(f.max() / 65535)
    # the painted uint16 map is the float32 map quantised, cell by cell (corners included)
    np.testing.assert_array_equal(q.arrays["ucm2"], np.rint(f / scale).astype(np.uint16))
    assert q.arrays["ucm2"].max() == 65535
    values = ucm2_values(q.arrays["ucm2"], q.attrs)
    assert values.dtype == np.float32 and np.abs(values - f).max() <= scale / 2 + np.spacing(np.float32(f.max()))
    for name in ("parents", "altitudes", "leaves", "labels"):  # exact either way
        np.testing.assert_array_equal(q.arrays[name], ref.arrays[name])
    # a cut of the quantised map between levels of the float map is the float map's cut
    levels = np.unique(f[f > 0])
    t = float(levels[len(levels) // 2])
    gap = float(levels[len(levels) // 2 + 1]) - t
    if gap > scale:
        np.testing.assert_array_equal(labels_from_ucm2(values, t + gap / 2), labels_from_ucm2(f, t + gap / 2))
    # written to and read back from a segments store, then through the evaluation reader
    with StoreWriter(tmp_path / "s", kind="segments", config={"test": 3}) as writer:
        writer.add(q)
    from segsort_unsup.io.store import StoreReader

    with StoreReader(tmp_path / "s", kind="segments") as reader:
        back = reader.read("a")
    np.testing.assert_array_equal(ucm2_values(back.arrays["ucm2"], back.attrs), values)
    with pytest.raises(ValueError, match="ucm2_scale"):
        ucm2_values(back.arrays["ucm2"], {})


def test_ucm2_dtype_is_checked():
    from segsort_unsup.errors import InputError

    with pytest.raises(InputError, match="ucm2_dtype"):
        UcmConfig(ucm2_dtype="float16")
    assert "ucm2_dtype" not in UcmConfig().identity()  # unset: stores made before keep their identity


def test_huge_maps_are_streamed_to_the_store_with_the_same_labels(tmp_path, sobel_maps, monkeypatch):
    """Above the huge-map size the labels (and levels) are cut only when the store writes them,
    after the ucm2; the stored cuts equal a small map's, which are computed at once."""
    from segsort_unsup.io.store import DeferredArray, StoreReader
    from segsort_unsup.ucm import stage

    _, edge, orient = sobel_maps[0]
    with StoreWriter(tmp_path / "c", kind="contours", config={"test": 4}) as writer:
        writer.add(Item("a", {"edge": edge.astype(np.float16), "orientation": orient.astype(np.float16)}, {}))
    config = UcmConfig(levels=(0.1, 0.3), ucm2_dtype="uint16")
    stage.run(config, tmp_path / "c", tmp_path / "whole")
    monkeypatch.setattr(stage, "UINT16_ABOVE_PIXELS", edge.size - 1)  # as a huge map
    item = process_item(_Job("a", "store", str(tmp_path / "c"), config))
    assert item.stream and isinstance(item.arrays["labels"], DeferredArray)
    stage.run(config, tmp_path / "c", tmp_path / "streamed")
    with StoreReader(tmp_path / "whole", kind="segments") as a, StoreReader(tmp_path / "streamed", kind="segments") as b:
        x, y = a.read("a"), b.read("a")
        assert sorted(x.arrays) == sorted(y.arrays)
        for name in x.arrays:
            assert x.arrays[name].dtype == y.arrays[name].dtype and np.array_equal(x.arrays[name], y.arrays[name]), name
