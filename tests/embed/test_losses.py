"""SegSort losses against a NumPy restatement of the released TF formulas
(``network/segsort/train_utils.py``: ``add_unsupervised_segsort_loss``, ``add_segsort_loss``,
``_calculate_vmf_loss``, ``_calculate_log_likelihood``; ``common_utils.py``:
``calculate_prototypes_from_labels``, ``prepare_prototype_labels``), on real embeddings of
BSDS500 images with SLIC superpixels and human segmentations, plus float64 gradchecks.

The references keep the reference's exp / ratio form (no log-sum-exp), its offsets of 256 per
image and its ``tf.unique`` numbering, and run in float64.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from segsort_unsup.embed import losses as L
from segsort_unsup.embed.losses import (
    PAD_SEGMENT,
    PrototypeMemory,
    segments_to_grid,
    supervised_segsort_loss,
    unsupervised_segsort_loss,
)
from segsort_unsup.errors import InputError

from . import IGNORE, np_grid_labels, np_kmeans, np_unique_inverse, real_batch

KAPPA = 10.0


@pytest.fixture(scope="module")
def batch(bsds, hed_h5):
    return real_batch(bsds, hed_h5)


# -- NumPy references ----------------------------------------------------------------------------
def np_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_prototypes(embedding: np.ndarray, labels: np.ndarray, max_label: int) -> np.ndarray:
    """``calculate_prototypes_from_labels``: normalise(one_hot(labels)^T @ embedding)."""
    return np_normalize(np.eye(max_label)[labels].T @ embedding)


def np_unsupervised_loss(emb: np.ndarray, seg: np.ndarray, kappa: float) -> float:
    """``add_unsupervised_segsort_loss`` on NCHW input (the reference is NHWC)."""
    n, d = emb.shape[:2]
    e = np_normalize(emb.astype(np.float64).transpose(0, 2, 3, 1)).reshape(-1, d)
    cluster = seg + (np.arange(n) * 256).reshape(-1, 1, 1)
    _, labels = np_unique_inverse(cluster.ravel())
    prototypes = np_prototypes(e, labels, labels.max() + 1)
    similarities = np.exp(kappa * e @ prototypes.T)
    numerator = similarities[np.arange(len(labels)), labels]
    denominator = similarities.sum(axis=1)
    return float(np.mean(-np.log(numerator / denominator)))


def np_segment_weighted_loss(emb: np.ndarray, seg: np.ndarray, kappa: float) -> float:
    """The unsupervised loss with every segment weighing the same: a loop over the batch's segments,
    each the mean of its pixels' -log(own / all)."""
    n, d = emb.shape[:2]
    e = np_normalize(emb.astype(np.float64).transpose(0, 2, 3, 1)).reshape(-1, d)
    cluster = (seg + (np.arange(n) * 256).reshape(-1, 1, 1)).ravel()
    ids = np.unique(cluster)
    prototypes = np.stack([np_normalize(e[cluster == c].sum(axis=0)) for c in ids])
    per_segment = []
    for j, c in enumerate(ids):
        s = np.exp(kappa * e[cluster == c] @ prototypes.T)
        per_segment.append(np.mean(-np.log(s[:, j] / s.sum(axis=1))))
    return float(np.mean(per_segment))


def np_sort_clusters(emb: np.ndarray, labels: np.ndarray, ignore: int) -> list[np.ndarray]:
    """The per-image k-means of ``add_segsort_loss`` (valid pixels only, grid init, y/H x/W)."""
    n, d, h, w = emb.shape
    out = []
    for b in range(n):
        e = np_normalize(emb[b].astype(np.float64).reshape(d, -1).T)
        yy, xx = np.meshgrid(np.arange(h) / h, np.arange(w) / w, indexing="ij")
        keep = labels[b].ravel() != ignore
        x = np_normalize(np.concatenate([e, np.stack([yy.ravel(), xx.ravel()], 1)], 1))[keep]
        out.append(np_kmeans(x, np_grid_labels(h, w).ravel()[keep], 25, 10))
    return out


def np_supervised_loss(emb: np.ndarray, labels: np.ndarray, kappa: float, ignore: int,
                       clusters: list[np.ndarray] | None = None, memory: list | None = None):
    """``add_segsort_loss`` + ``_calculate_vmf_loss`` + ``_calculate_log_likelihood`` (use_nca).

    Returns the loss and this batch's (prototypes, prototype labels) for the memory bank.
    """
    n, d = emb.shape[:2]
    if clusters is None:
        clusters = np_sort_clusters(emb, labels, ignore)
    sem, clu, vecs = [], [], []
    for b in range(n):
        keep = labels[b].ravel() != ignore
        sem.append(labels[b].ravel()[keep])
        clu.append(clusters[b] + b * 256)
        vecs.append(np_normalize(emb[b].astype(np.float64).reshape(d, -1).T)[keep])
    sem, clu, e = np.concatenate(sem), np.concatenate(clu), np.concatenate(vecs)
    # prepare_prototype_labels
    values, instance = np_unique_inverse(sem + clu * 256)
    proto_labels = values % 256
    prototypes = np_prototypes(e, instance, len(proto_labels))
    new_memory = (prototypes, proto_labels)
    if memory:
        prototypes = np.concatenate([prototypes] + [np_normalize(p) for p, _ in memory])
        proto_labels = np.concatenate([proto_labels] + [c for _, c in memory])
    similarities = np.exp(kappa * e @ prototypes.T)
    self_sim = similarities[np.arange(len(e)), instance]
    same = (sem[:, None] == proto_labels[None, :]).astype(np.float64)
    selfout = (similarities * same).sum(axis=1) - self_sim
    numerator = np.where(selfout > 0, selfout, self_sim)
    denominator = (similarities * (1 - same)).sum(axis=1) + numerator
    return float(np.mean(-np.log(numerator / denominator))), new_memory


# -- prototypes ----------------------------------------------------------------------------------
def segment_prototypes(embedding, segments, *, ignore=None):
    """The segment prototypes both losses compute (their shared private steps)."""
    emb, seg = L._check_pair(embedding, segments, "segments")
    protos, index, image, segment = L._prototypes(*L._flatten(emb, seg, ignore))
    n, _, h, w = emb.shape
    return SimpleNamespace(prototypes=protos, index=index.reshape(n, h, w), image=image, segment=segment)


def test_segment_prototypes_match_reference(batch):
    emb, seg = batch["emb"], batch["slic"]
    out = segment_prototypes(torch.from_numpy(emb), torch.from_numpy(seg))
    n, d = emb.shape[:2]
    e = np_normalize(emb.astype(np.float64).transpose(0, 2, 3, 1)).reshape(-1, d)
    keys = (seg + (np.arange(n) * 256).reshape(-1, 1, 1)).ravel()
    values, labels = np_unique_inverse(keys)
    ref = np_prototypes(e, labels, len(values))
    # match rows through (image, segment id): the reference numbers by first appearance
    ours_keys = (out.image * 256 + out.segment).numpy()
    order = {k: i for i, k in enumerate(values)}
    rows = np.array([order[k] for k in ours_keys])
    assert sorted(rows) == list(range(len(values)))  # same segments, each once
    np.testing.assert_allclose(out.prototypes.numpy(), ref[rows], atol=1e-5, rtol=0)
    # each pixel points at its own segment's row
    np.testing.assert_array_equal(rows[out.index.numpy().ravel()], labels)


def test_padding_is_one_segment_per_image(batch):
    seg = torch.from_numpy(batch["slic"]).clone()
    seg[0, -3:] = PAD_SEGMENT  # both images now have padding
    out = segment_prototypes(torch.from_numpy(batch["emb"]), seg)
    pads = out.segment == PAD_SEGMENT
    assert pads.sum() == 2 and set(out.image[pads].tolist()) == {0, 1}


def test_ignored_segment_id_is_left_out(batch):
    seg = torch.from_numpy(batch["slic"])
    out = segment_prototypes(torch.from_numpy(batch["emb"]), seg, ignore=PAD_SEGMENT)
    assert PAD_SEGMENT not in out.segment.tolist()
    assert (out.index[seg == PAD_SEGMENT] == -1).all() and (out.index[seg != PAD_SEGMENT] >= 0).all()


# -- unsupervised loss ---------------------------------------------------------------------------
def test_unsupervised_loss_matches_reference(batch):
    emb, seg = batch["emb"], batch["slic"]
    ours = unsupervised_segsort_loss(torch.from_numpy(emb), torch.from_numpy(seg), kappa=KAPPA)
    # the reference pads cluster labels with 255: one more segment id, as -1 is here
    ref = np_unsupervised_loss(emb, np.where(seg == PAD_SEGMENT, 255, seg), KAPPA)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - ref) < 1e-5
    assert 1.0 < ref < np.log(seg.size)  # informative: well below chance, far from zero


def test_unsupervised_loss_with_ignore_equals_reference_on_kept_pixels(batch):
    emb, seg = batch["emb"], batch["slic"]
    ours = unsupervised_segsort_loss(torch.from_numpy(emb), torch.from_numpy(seg), kappa=5.0, ignore=PAD_SEGMENT)
    # drop the padded rows of image 1 by cropping both images to the unpadded height
    keep = int((seg[1] != PAD_SEGMENT).all(axis=1).sum())
    assert (seg[1, :keep] != PAD_SEGMENT).all() and (seg[1, keep:] == PAD_SEGMENT).all()
    # the reference has no ignore: score image 0 whole and image 1 cropped, pooled over pixels
    n, d, h, w = emb.shape
    e = np.concatenate([np_normalize(emb[0].reshape(d, -1).T.astype(np.float64)),
                        np_normalize(emb[1, :, :keep].reshape(d, -1).T.astype(np.float64))])
    lab = np.concatenate([seg[0].ravel(), seg[1, :keep].ravel() + 256])
    _, labels = np_unique_inverse(lab)
    p = np_prototypes(e, labels, labels.max() + 1)
    s = np.exp(5.0 * e @ p.T)
    ref = np.mean(-np.log(s[np.arange(len(e)), labels] / s.sum(1)))
    assert abs(ours.item() - ref) < 1e-5


def test_unsupervised_loss_under_bf16_autocast_is_computed_in_float32(batch):
    emb = torch.from_numpy(batch["emb"]).bfloat16()
    seg = torch.from_numpy(batch["slic"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = unsupervised_segsort_loss(emb, seg)
    outside = unsupervised_segsort_loss(emb.float(), seg)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, outside)


def test_segments_to_grid_is_tf1_nearest():
    seg = torch.arange(7 * 10).reshape(1, 7, 10)
    out = segments_to_grid(seg, (3, 4)).numpy()[0]
    ys, xs = np.floor(np.arange(3) * 7 / 3).astype(int), np.floor(np.arange(4) * 10 / 4).astype(int)
    np.testing.assert_array_equal(out, seg.numpy()[0][np.ix_(ys, xs)])


# -- supervised loss -----------------------------------------------------------------------------
def test_supervised_loss_matches_reference(batch):
    emb, gt = batch["emb"], batch["gt"]
    ours = supervised_segsort_loss(torch.from_numpy(emb).double(), torch.from_numpy(gt), kappa=KAPPA,
                                   ignore_label=IGNORE)
    ref, _ = np_supervised_loss(emb, gt, KAPPA, IGNORE)
    assert abs(ours.item() - ref) < 1e-5
    assert 0.1 < ref < 10


def test_supervised_loss_float32_with_given_clusters(batch):
    emb, gt = batch["emb"], batch["gt"]
    clusters = np_sort_clusters(emb, gt, IGNORE)
    full = np.full(gt.shape, -1)
    for b in range(2):
        full[b][gt[b] != IGNORE] = clusters[b]
    ours = supervised_segsort_loss(torch.from_numpy(emb), torch.from_numpy(gt), kappa=KAPPA,
                                   ignore_label=IGNORE, clusters=torch.from_numpy(full))
    ref, _ = np_supervised_loss(emb, gt, KAPPA, IGNORE, clusters=clusters)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - ref) < 1e-5


def test_supervised_loss_memory_bank_of_two_batches(batch):
    emb, gt = batch["emb"], batch["gt"]
    # three different batches: the images, their mirror images, and the images swapped
    batches = [(emb, gt), (emb[..., ::-1].copy(), gt[..., ::-1].copy()), (emb[::-1].copy(), gt[::-1].copy())]
    memory = PrototypeMemory(2)
    ref_memory: list = []
    for e, g in batches + batches[:1]:
        ours = supervised_segsort_loss(torch.from_numpy(e).double(), torch.from_numpy(g), kappa=KAPPA,
                                       ignore_label=IGNORE, memory=memory)
        ref, new = np_supervised_loss(e, g, KAPPA, IGNORE, memory=ref_memory)
        ref_memory = (ref_memory + [new])[-2:]
        assert abs(ours.item() - ref) < 1e-5
        assert len(memory) == sum(len(c) for _, c in ref_memory)
    assert not memory.prototypes.requires_grad


@pytest.mark.parametrize("kappa", [KAPPA, 35.0])
def test_supervised_loss_paths_agree_in_value_and_gradient(batch, kappa):
    """The class-sum path (kappa < 40) and the masked log-sum-exp path (any kappa) give the same
    loss and gradient; at kappa 10 both equal the NumPy reference."""
    from segsort_unsup.embed import losses

    emb, gt = batch["emb"], batch["gt"]
    ref, _ = np_supervised_loss(emb, gt, kappa, IGNORE)
    grads, values = [], []
    for safe in (losses._EXP_SAFE, 0.0):  # 0.0 forces the masked log-sum-exp path
        x = torch.from_numpy(emb).double().requires_grad_(True)
        original, losses._EXP_SAFE = losses._EXP_SAFE, safe
        try:
            loss = supervised_segsort_loss(x, torch.from_numpy(gt), kappa=kappa, ignore_label=IGNORE)
        finally:
            losses._EXP_SAFE = original
        if kappa == KAPPA:
            assert abs(loss.item() - ref) < 1e-5
        loss.backward()
        grads.append(x.grad)
        values.append(loss.item())
    assert abs(values[0] - values[1]) < 1e-10
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-12)


def test_memory_capacity_keeps_a_random_subset():
    mem = PrototypeMemory(2, capacity=3, generator=torch.Generator().manual_seed(0))
    p = torch.nn.functional.normalize(torch.randn(10, 4), dim=1)
    c = torch.arange(10)
    for _ in range(3):
        mem.push(p, c)
    assert len(mem) == 6
    kept = mem.classes
    assert torch.allclose(mem.prototypes, p[kept])  # rows still paired with their classes
    restored = PrototypeMemory(2)
    restored.load_state_dict(mem.state_dict())
    assert torch.equal(restored.prototypes, mem.prototypes) and torch.equal(restored.classes, mem.classes)


# -- gradients -----------------------------------------------------------------------------------
def test_segment_weighted_loss_matches_a_loop_over_segments(batch):
    emb, seg = batch["emb"], batch["slic"]
    ours = unsupervised_segsort_loss(torch.from_numpy(emb), torch.from_numpy(seg), kappa=KAPPA, weighting="segment")
    ref = np_segment_weighted_loss(emb, np.where(seg == PAD_SEGMENT, 255, seg), KAPPA)
    assert abs(ours.item() - ref) < 1e-5
    plain = np_unsupervised_loss(emb, np.where(seg == PAD_SEGMENT, 255, seg), KAPPA)
    assert abs(ref - plain) > 1e-3  # the segments differ in size: the two weightings differ
    small_emb, small_seg, _ = _small_inputs(2)
    assert torch.autograd.gradcheck(lambda e: unsupervised_segsort_loss(e, small_seg, kappa=3.0, weighting="segment",
                                                                        ignore=0), (small_emb,))
    with pytest.raises(InputError, match="weighting must be one of pixel, segment"):
        unsupervised_segsort_loss(torch.from_numpy(emb), torch.from_numpy(seg), weighting="area")


def _small_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    seg = torch.randint(0, 4, (2, 4, 5), generator=g)
    seg[1, -1] = PAD_SEGMENT
    return emb, seg, g


def test_gradcheck_unsupervised_loss():
    emb, seg, _ = _small_inputs()
    assert torch.autograd.gradcheck(lambda e: unsupervised_segsort_loss(e, seg, kappa=3.0), (emb,))
    assert torch.autograd.gradcheck(lambda e: unsupervised_segsort_loss(e, seg, kappa=3.0, ignore=0), (emb,))


def test_gradcheck_segment_prototypes():
    emb, seg, _ = _small_inputs(1)
    assert torch.autograd.gradcheck(lambda e: segment_prototypes(e, seg).prototypes, (emb,))


def test_gradcheck_supervised_loss_with_memory():
    emb, _, g = _small_inputs(2)
    labels = torch.randint(0, 3, (2, 4, 5), generator=g)
    labels[0, 0] = IGNORE
    clusters = torch.randint(0, 3, (2, 4, 5), generator=g)
    stored = torch.nn.functional.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=1)
    stored_classes = torch.tensor([0, 1, 2, 2, 7])

    def loss(e):
        memory = PrototypeMemory(2)
        memory.push(stored, stored_classes)
        return supervised_segsort_loss(e, labels, kappa=3.0, ignore_label=IGNORE, clusters=clusters, memory=memory)

    assert torch.autograd.gradcheck(loss, (emb,))
    # and with the pixel sorting inside (its labels do not move under gradcheck's tiny steps)
    assert torch.autograd.gradcheck(
        lambda e: supervised_segsort_loss(e, labels, kappa=3.0, ignore_label=IGNORE, grid=(2, 2), iterations=3),
        (emb,))


# -- errors --------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    emb = torch.rand(2, 4, 5, 6)
    with pytest.raises(InputError, match="segments_to_grid"):
        unsupervised_segsort_loss(emb, torch.zeros(2, 40, 48, dtype=torch.long))
    with pytest.raises(InputError, match="integer"):
        unsupervised_segsort_loss(emb, torch.zeros(2, 5, 6))
    with pytest.raises(InputError, match="kappa"):
        unsupervised_segsort_loss(emb, torch.zeros(2, 5, 6, dtype=torch.long), kappa=0)
    with pytest.raises(InputError, match="nothing to learn"):
        unsupervised_segsort_loss(emb, torch.zeros(2, 5, 6, dtype=torch.long), ignore=0)
    with pytest.raises(InputError, match="ignore label"):
        supervised_segsort_loss(emb, torch.full((2, 5, 6), 255))
