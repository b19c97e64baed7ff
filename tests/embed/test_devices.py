"""Device-agnostic by construction: the embed, sorting and loss paths run with every input on a
virtual accelerator (tests/embed/virtual_device.py: ``meta``-device tensors that carry data) and
must neither mix host and device tensors nor pull arrays to the host before the end; their
results equal the same call on the CPU. A CUDA run would raise where these tests raise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from .virtual_device import DeviceMixup, VirtualDevice, host, on_device


@pytest.fixture(scope="module")
def embedding() -> torch.Tensor:
    """A smooth (16, 40, 56) unit embedding with a few regions, so k-means has structure."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 16, 5, 7, generator=g)
    emb = F.interpolate(coarse, size=(40, 56), mode="bilinear", align_corners=False)[0]
    return F.normalize(emb + 0.05 * torch.randn(emb.shape, generator=g), dim=0)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    lab = np.zeros((40, 56), np.int64)
    lab[:, 20:] = 1
    lab[25:, 30:] = 2
    lab[:4] = 255  # ignored
    return lab


def test_virtual_device_catches_what_cuda_refuses():
    """The harness itself: a mix-up raises, .numpy() on the device raises, what CUDA accepts passes."""
    with VirtualDevice():
        x = torch.arange(6.0).to("meta")
        with pytest.raises(DeviceMixup):
            torch.cat([x, torch.ones(2)])
        with pytest.raises(DeviceMixup):
            torch.zeros(2, 6).index_add_(0, torch.tensor([0]), x[None])
        with pytest.raises(RuntimeError):
            x.numpy()
        picked = x[torch.tensor([1, 3])]  # host index tensor: accepted by CUDA
        assert on_device(picked) and on_device(x * torch.tensor(2.0))  # 0-dim host tensor: accepted
        assert int(x.sum()) == 15 and not on_device(x.cpu())


@pytest.mark.parametrize("stride", [1, 4])
def test_sort_pixels_stays_on_the_device(embedding, labels, stride):
    """sort_pixels with the embedding on the device and the valid mask on the host: ids on the
    device, equal to the CPU's."""
    from segsort_unsup.embed.stage import sort_pixels

    valid = torch.from_numpy(labels != 255)[None]
    expected = sort_pixels(embedding, valid=valid, stride=stride)
    with VirtualDevice():
        got = sort_pixels(embedding.to("meta"), valid=valid, stride=stride)
        assert on_device(got)
    torch.testing.assert_close(host(got), expected, rtol=0, atol=0)


def test_segment_table_is_computed_on_the_device(embedding, labels):
    from segsort_unsup.embed.stage import device_segment_table, segment_table, sort_pixels

    valid = torch.from_numpy(labels != 255)[None]
    seg = sort_pixels(embedding, valid=valid)
    expected = segment_table(embedding, seg.numpy(), labels)
    with VirtualDevice():
        table = device_segment_table(embedding.to("meta"), seg.to("meta"), torch.from_numpy(labels).to("meta"))
        assert all(on_device(v) for v in table.values())
        got = segment_table(embedding.to("meta"), seg.numpy(), labels)  # host maps, device embedding
    assert set(got) == set(expected) == {"prototypes", "area", "bbox", "label"}
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
        np.testing.assert_array_equal(host(table[name]).numpy(), expected[name])


@pytest.fixture(scope="module")
def tiny_model():
    from segsort_unsup.embed.model import build_model

    torch.manual_seed(0)
    return build_model({"backbone": "scratch", "feature_layer": "conv4_3", "embedding_dim": 8, "hidden": 8}).eval()


@pytest.mark.parametrize("sort_stride", [1, 4])
def test_image_prototypes_with_the_model_on_the_device(tiny_model, labels, sort_stride):
    """The whole per-image path (windows, two scales, flip, labels, sort_stride) with the model on
    the device and ``device`` passed explicitly: the same arrays as on the CPU."""
    import copy

    from segsort_unsup.embed.stage import EmbedConfig, image_prototypes

    rgb = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    cfg = EmbedConfig(precision="fp32", scales=(1.0, 0.75), flip=True, window=64, window_stride=32,
                      sort_stride=sort_stride, ignore_label=255, labels="unused")
    big = np.ascontiguousarray(np.tile(rgb, (2, 2, 1)))  # 80 x 112: two windows per side
    big_labels = np.tile(labels, (2, 2))
    expected = image_prototypes(tiny_model, big, cfg, labels=big_labels, precision="fp32", device="cpu")
    model = copy.deepcopy(tiny_model)
    with VirtualDevice():
        model.to("meta")
        got = image_prototypes(model, big, cfg, labels=big_labels, precision="fp32", device="meta")
    assert set(got) == set(expected)
    for name, arr in expected.items():
        assert isinstance(got[name], np.ndarray) and got[name].dtype == arr.dtype
        if name == "prototypes":
            np.testing.assert_allclose(got[name], arr, atol=1e-6)
        else:
            np.testing.assert_array_equal(got[name], arr)


def test_losses_and_their_gradients_stay_on_the_device(embedding, labels):
    """Unsupervised and supervised losses (a memory restored from a checkpoint on the host) with
    the embedding on the device: values and gradients equal the CPU's, gradients on the device."""
    from segsort_unsup.embed.losses import PrototypeMemory, supervised_segsort_loss, unsupervised_segsort_loss
    from segsort_unsup.embed.sorting import pixel_sort

    emb = embedding[None]
    lab = torch.from_numpy(labels)[None]
    seg = pixel_sort(emb)
    state = {"banks": 2, "prototypes": [F.normalize(torch.randn(5, 16), dim=1)], "classes": [torch.arange(5) % 3]}

    def losses(e, lab, seg, memory):
        e = e.clone().requires_grad_(True)
        unsup = unsupervised_segsort_loss(e, seg)
        sup = supervised_segsort_loss(e, lab, memory=memory)
        (unsup + sup).backward()
        return unsup.detach(), sup.detach(), e.grad

    cpu_memory, dev_memory = PrototypeMemory(), PrototypeMemory(capacity=1000)
    cpu_memory.load_state_dict(state)
    dev_memory.load_state_dict(state)
    expected = losses(emb, lab, seg, cpu_memory)
    with VirtualDevice():
        got = losses(emb.to("meta"), lab.to("meta"), seg.to("meta"), dev_memory)
        assert all(on_device(t) for t in got)
        assert on_device(dev_memory.prototypes)  # this batch's prototypes joined the host ones
    for g, e in zip(got, expected):
        torch.testing.assert_close(host(g), e, rtol=1e-5, atol=1e-6)


def test_embed_stage_runs_on_the_device_named_in_its_settings(tiny_model, tmp_path, monkeypatch):
    """``embed`` with ``device`` set: the model file is loaded onto that device and the store
    equals the CPU's (the model must not stay on the host where torch.load put it)."""
    import cv2
    from torch.utils._python_dispatch import _disable_current_modes

    import segsort_unsup.embed.model as model_module

    check = model_module.check_state_fits_config

    def check_on_the_real_meta_device(*args, **kwargs):
        # The file check lays the architecture out on torch's own data-less meta device (shapes
        # only, on the host side); the stand-in device also answers to "meta", so step out of it.
        with _disable_current_modes():
            return check(*args, **kwargs)

    monkeypatch.setattr(model_module, "check_state_fits_config", check_on_the_real_meta_device)

    from segsort_unsup.embed.stage import EmbedConfig, _MODELS, run
    from segsort_unsup.embed.model import save_model
    from segsort_unsup.io.store import StoreReader

    save_model(tmp_path / "model.pt", tiny_model)
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        cv2.imwrite(str(tmp_path / "img" / f"{name}.png"), (rng.random((40, 48, 3)) * 255).astype(np.uint8))
    inputs = [tmp_path / "model.pt", tmp_path / "img"]
    run(EmbedConfig(precision="fp32", device="cpu", sort_stride=2), inputs, tmp_path / "cpu")
    _MODELS.clear()
    try:
        with VirtualDevice():
            summary = run(EmbedConfig(precision="fp32", device="meta", sort_stride=2), inputs, tmp_path / "dev")
    finally:
        _MODELS.clear()
    assert summary.done == 2 and summary.ok
    cpu, dev = StoreReader(tmp_path / "cpu"), StoreReader(tmp_path / "dev")
    for key in cpu.keys():
        for name, arr in cpu[key].arrays.items():
            np.testing.assert_allclose(dev[key].arrays[name], arr, atol=1e-6)
