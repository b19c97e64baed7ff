"""Pixel sorting against the NumPy restatement of the reference k-means (tests/embed/__init__.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segsort_unsup.embed.sorting import (
    consecutive_labels,
    grid_labels,
    location_features,
    pixel_sort,
    spherical_kmeans,
)
from segsort_unsup.errors import InputError

from . import IGNORE, assert_segments_match, np_grid_labels, np_kmeans, np_pixel_sort, np_unique_inverse, real_batch


@pytest.fixture(scope="module")
def batch(bsds, hed_h5):
    return real_batch(bsds, hed_h5)


@pytest.mark.parametrize("size", [(61, 41), (40, 40), (7, 9), (6, 16), (3, 2), (1, 1)])
def test_grid_labels_match_reference(size):
    np.testing.assert_array_equal(grid_labels(*size).numpy(), np_grid_labels(*size))


def test_grid_labels_other_grids():
    np.testing.assert_array_equal(grid_labels(30, 50, grid=(3, 7)).numpy(), np_grid_labels(30, 50, (3, 7)))


def test_location_features_are_y_over_h_and_x_over_w():
    loc = location_features(4, 5).numpy()
    np.testing.assert_allclose(loc[0], np.repeat(np.arange(4)[:, None] / 4, 5, axis=1))
    np.testing.assert_allclose(loc[1], np.repeat(np.arange(5)[None, :] / 5, 4, axis=0))


def test_pixel_sort_equals_reference_on_real_embeddings(batch):
    emb = torch.from_numpy(batch["emb"]).double()
    valid = batch["gt"] != IGNORE  # the supervised loss drops ignore-label pixels before sorting
    ours = pixel_sort(emb, valid=torch.from_numpy(valid)).numpy()
    for i in range(2):
        ref = assert_segments_match(ours[i], batch["emb"][i], valid[i])
        assert len(np.unique(ref[ref >= 0])) > 10  # a real clustering, not a degenerate one


def test_pixel_sort_without_mask_and_float32(batch):
    ours = pixel_sort(torch.from_numpy(batch["emb"])).numpy()
    for i in range(2):
        ref = np_pixel_sort(batch["emb"][i])
        # float32 vs float64: only near-ties may differ
        assert (ours[i] == ref).mean() > 0.99


def test_batched_equals_one_image_at_a_time(batch):
    emb = torch.from_numpy(batch["emb"]).double()
    both = pixel_sort(emb, iterations=7, grid=(4, 6))
    for i in range(2):
        assert torch.equal(both[i], pixel_sort(emb[i : i + 1], iterations=7, grid=(4, 6))[0])


def test_empty_clusters_stay_empty_like_the_reference():
    # Two tight groups of directions spread over overlapping initial clusters (id 5 is never
    # used): some clusters lose all their points and must stay empty, as with the reference's NaN.
    rng = np.random.default_rng(3)
    a, b = np.eye(4)[0], np.eye(4)[1]
    x = np.concatenate([a + 0.05 * rng.standard_normal((20, 4)), b + 0.05 * rng.standard_normal((20, 4))])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    init = np.tile(np.arange(5), 8)
    init[:20] = np.arange(20) % 3      # group a spread over clusters 0-2
    init[20:] = 2 + np.arange(20) % 3  # group b over clusters 2-4
    init[0] = 6
    ref = np_kmeans(x, init, 7, iterations=10)
    ours = spherical_kmeans(torch.from_numpy(x)[None], torch.from_numpy(init)[None], iterations=10)[0].numpy()
    np.testing.assert_array_equal(ours, ref)
    assert set(np.unique(ref)) < set(np.unique(init))  # a cluster did empty on the way


def test_empty_cluster_is_never_chosen():
    # Three directions at 0, 100 and 200 degrees in one cluster: the one at 200 degrees has a
    # negative cosine with the cluster's prototype. Cluster 1 is empty. The reference's NaN
    # prototype never wins, so nothing moves; a zero prototype (similarity 0) would take it.
    ang = np.deg2rad([0.0, 100.0, 200.0])
    x = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    init = np.zeros(3, np.int64)
    ref = np_kmeans(x, init, 2)
    zero_prototype = np.argmax(x @ np.stack([x.sum(0) / np.linalg.norm(x.sum(0)), np.zeros(2)]).T, axis=1)
    assert ref.tolist() == [0, 0, 0] and zero_prototype.tolist() != [0, 0, 0]
    ours = spherical_kmeans(torch.from_numpy(x)[None], torch.from_numpy(init)[None], num_clusters=2)
    assert ours[0].tolist() == ref.tolist()


def test_ignored_pixels_can_empty_a_grid_cell(batch):
    emb = torch.from_numpy(batch["emb"][:1]).double()
    valid = np.ones(emb.shape[-2:], bool)
    valid[:13, :9] = False  # the whole first grid cell (13 x 9 pixels on a 61 x 41 map)
    ours = pixel_sort(emb, valid=torch.from_numpy(valid)[None])[0].numpy()
    assert_segments_match(ours, batch["emb"][0], valid)
    assert (ours[~valid] == -1).all() and (ours[valid] >= 0).all()


def test_labels_are_consecutive_in_first_appearance_order():
    labels = torch.tensor([[7, 7, -1, 2, 9, 2], [-1, -1, 0, 0, 5, 3]])
    expect = [np.where(row >= 0, 0, -1) for row in labels.numpy()]
    for i, row in enumerate(labels.numpy()):
        keep = row >= 0
        expect[i][keep] = np_unique_inverse(row[keep])[1]
    np.testing.assert_array_equal(consecutive_labels(labels).numpy(), np.stack(expect))


def test_init_and_locations_can_be_given(batch):
    emb = torch.from_numpy(batch["emb"][:1]).double()
    h, w = emb.shape[-2:]
    # the default init and locations, passed explicitly, give the default result
    same = pixel_sort(emb, init=grid_labels(h, w), locations=location_features(h, w, dtype=torch.float64))
    assert torch.equal(same, pixel_sort(emb))
    # zero-weight locations: clustering on the embedding alone
    x = batch["emb"][0].reshape(32, -1).T.astype(np.float64)
    ref = np_kmeans(x, np_grid_labels(h, w).ravel(), 25)
    ours = pixel_sort(emb, location_weight=0.0)[0].numpy().ravel()
    np.testing.assert_array_equal(ours, np_unique_inverse(ref)[1])


def test_init_labels_of_dropped_pixels_are_not_used():
    x = torch.nn.functional.normalize(torch.randn(1, 6, 3, dtype=torch.float64), dim=-1)
    init = torch.tensor([[0, 0, 1, 1, -1, 9]])
    valid = torch.tensor([[True, True, True, True, False, False]])
    out = spherical_kmeans(x, init, valid=valid)
    ref = np_kmeans(x[0, :4].numpy(), init[0, :4].numpy(), 2)
    assert out[0, :4].tolist() == ref.tolist() and out[0, 4:].tolist() == [-1, -1]
    with pytest.raises(InputError, match="valid points must be >= 0"):
        spherical_kmeans(x, init)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(InputError, match=r"\(N, D, H, W\)"):
        pixel_sort(torch.zeros(3, 4, 5))
    with pytest.raises(InputError, match="valid must be"):
        pixel_sort(torch.rand(1, 3, 4, 5), valid=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(InputError, match="grid"):
        pixel_sort(torch.rand(1, 3, 4, 5), grid=(0, 2))
    with pytest.raises(InputError, match="float"):
        pixel_sort(torch.ones(1, 3, 4, 5, dtype=torch.long))


def test_near_tie_allowance_rejects_real_differences(batch):
    """The reference comparison allows only near-ties: the reference itself passes; one pixel
    moved to a segment whose cosine is clearly lower fails."""
    emb = batch["emb"][0]
    ref, sim = np_pixel_sort(emb, return_similarity=True)
    assert_segments_match(ref, emb)
    flat = ref.ravel().copy()
    own = sim[np.arange(len(flat)), flat]
    gaps = own[:, None] - sim
    gaps[np.arange(len(flat)), flat] = np.inf
    p = int(np.argmax(np.nanmin(gaps, axis=1) > 1e-3))  # a pixel with no near-tie
    flat[p] = int(np.nanargmin(gaps[p]))
    with pytest.raises(AssertionError, match="not near-ties"):
        assert_segments_match(flat.reshape(ref.shape), emb)
