"""Backbones and the embedding model: stride-8 shapes, weights from HED and torchvision layouts,
the registry, freezing, and rebuilding a saved model from its config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segsort_unsup.contours.hed import MEAN_BGR
from segsort_unsup.contours.formats import load_hed_state_dict
from segsort_unsup.embed.backbones import BACKBONES, build_backbone
from segsort_unsup.embed.model import SegSortNet, build_model
from segsort_unsup.errors import InputError, WeightsError

# torchvision's vgg16.features: conv, ReLU, ..., MaxPool; the convs sit at these indices
TV_CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
HED_CONVS = [(b, i) for b, n in enumerate((2, 2, 3, 3, 3), start=1) for i in range(n)]


@pytest.fixture(scope="module")
def hed_state(hed_h5):
    return load_hed_state_dict(hed_h5)


@pytest.fixture(scope="module")
def hed_trunk(hed_h5):
    return build_backbone("vgg16-hed", weights=hed_h5, feature_layer="conv5_3").eval()


def naive_trunk(state: dict, rgb: torch.Tensor, *, layer: str = "conv5_3") -> torch.Tensor:
    """The stride-8 VGG16 spelled out in float64: BGR - Caffe mean, 3x3 convs + ReLU, 'same'
    2x2 pools (odd sizes keep their last row) after blocks 1-3, none after block 4, conv5 dilated 2."""
    x = (rgb.double().flip(1) - torch.tensor(MEAN_BGR, dtype=torch.float64).view(1, 3, 1, 1))
    for b, n in enumerate((2, 2, 3, 3, 3), start=1):
        if b == 5 and layer == "conv4_3":
            break
        if b in (2, 3, 4):
            h, w = x.shape[-2:]
            x = F.pad(x, (0, w % 2, 0, h % 2), value=-np.inf)
            x = x.unfold(2, 2, 2).unfold(3, 2, 2).amax(dim=(-1, -2))
        d = 2 if b == 5 else 1
        for i in range(n):
            x = F.relu(F.conv2d(x, state[f"block{b}.convs.{i}.weight"].double(),
                                state[f"block{b}.convs.{i}.bias"].double(), padding=d, dilation=d))
    return x


@pytest.mark.parametrize("size", [(64, 96), (65, 97), (33, 41), (8, 8)])
def test_output_stride_8(hed_trunk, size):
    with torch.no_grad():
        out = hed_trunk(torch.rand(1, 3, *size) * 255)
    assert out.shape == (1, 512, -(-size[0] // 8), -(-size[1] // 8))


def test_vgg16_hed_weights_are_the_hed_trunk(hed_state, hed_trunk):
    trunk_state = hed_trunk.state_dict()
    assert len(trunk_state) == 26
    for b, i in HED_CONVS:
        for kind in ("weight", "bias"):
            assert torch.equal(trunk_state[f"block{b}.convs.{i}.{kind}"], hed_state[f"block{b}.convs.{i}.{kind}"])


@pytest.mark.parametrize("layer", ["conv5_3", "conv4_3"])
def test_forward_equals_the_spelled_out_network(hed_h5, hed_state, layer):
    trunk = build_backbone("vgg16-hed", weights=hed_h5, feature_layer=layer).eval()
    rgb = torch.rand(2, 3, 45, 59, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        ours = trunk(rgb)
    ref = naive_trunk(hed_state, rgb, layer=layer)
    assert ours.shape == ref.shape == (2, 512, 6, 8)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-4, atol=1e-3 * float(ref.abs().max()))
    if layer == "conv4_3":
        assert not any(k.startswith("block5") for k in trunk.state_dict())


def test_fused_inference_path_matches(hed_trunk):
    rgb = torch.rand(1, 3, 40, 56) * 255
    with torch.no_grad():
        plain = hed_trunk(rgb)
        hed_trunk.fuse_for_cpu(torch.float32)
        try:
            fused = hed_trunk(rgb)
        finally:
            hed_trunk.fuse_for_cpu(None)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-3 * float(plain.abs().max()))


def test_torchvision_layout_round_trip(tmp_path, hed_state, hed_trunk):
    # a checkpoint in torchvision's vgg16 layout, written from the HED trunk (plus a classifier)
    tv = {}
    for idx, (b, i) in zip(TV_CONV_INDICES, HED_CONVS):
        tv[f"features.{idx}.weight"] = hed_state[f"block{b}.convs.{i}.weight"].clone()
        tv[f"features.{idx}.bias"] = hed_state[f"block{b}.convs.{i}.bias"].clone()
    tv["classifier.0.weight"] = torch.zeros(8, 4)
    path = tmp_path / "vgg16-test.pth"
    torch.save(tv, path)
    trunk = build_backbone("vgg16", weights=path, feature_layer="conv5_3")
    loaded = trunk.state_dict()
    for key, value in hed_trunk.state_dict().items():
        assert torch.equal(loaded[key], value), key
    # torchvision's input convention: RGB / 255, ImageNet mean and std
    rgb = torch.full((1, 3, 1, 1), 255.0)
    expect = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(trunk.normalise(rgb).flatten(), expect)

    del tv["features.26.weight"]
    torch.save(tv, path)
    with pytest.raises(WeightsError, match="features.26.weight"):
        build_backbone("vgg16", weights=path, feature_layer="conv5_3")


def test_vgg16_needs_weights():
    with pytest.raises(InputError, match="torchvision vgg16"):
        build_backbone("vgg16")


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(InputError) as err:
        build_backbone("resnet101")
    for name in BACKBONES:
        assert name in str(err.value)


def test_scratch_is_random_and_seeded():
    torch.manual_seed(0)
    a = build_backbone("scratch", feature_layer="conv4_3")
    torch.manual_seed(0)
    b = build_backbone("scratch", feature_layer="conv4_3")
    c = build_backbone("scratch", feature_layer="conv4_3")
    assert torch.equal(a.block3.convs[0].weight, b.block3.convs[0].weight)
    assert not torch.equal(a.block3.convs[0].weight, c.block3.convs[0].weight)
    with pytest.raises(InputError, match="no weights"):
        build_backbone("scratch", weights="x.pth")


def test_freeze_blocks(hed_h5):
    model = build_model({"feature_layer": "conv5_3", "freeze_blocks": 3}, backbone_weights=hed_h5)
    trunk = model.backbone
    for i, block in enumerate(trunk.blocks, start=1):
        assert all(p.requires_grad == (i > 3) for p in block.parameters())
    model(torch.rand(1, 3, 32, 40) * 255).sum().backward()
    assert trunk.block3.convs[0].weight.grad is None and trunk.block4.convs[0].weight.grad is not None
    grouped = {id(p) for g in model.param_groups(1e-3) for p in g["params"]}
    assert id(trunk.block2.convs[0].weight) not in grouped and id(trunk.block5.convs[0].weight) in grouped
    assert model.model_config()["freeze_blocks"] == 3
    with pytest.raises(InputError, match="freeze_blocks"):
        build_backbone("scratch", freeze_blocks=6)


# -- the model ------------------------------------------------------------------------------------
def test_model_embeddings_are_unit_norm_at_stride_8(hed_h5):
    model = build_model({"feature_layer": "conv4_3", "embedding_dim": 16}, backbone_weights=hed_h5).eval()
    with torch.no_grad():
        emb = model(torch.rand(2, 3, 50, 70) * 255)
    assert emb.shape == (2, 16, 7, 9) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2, 7, 9))


def test_head_only_mode_equals_full_forward(hed_h5):
    model = build_model({"feature_layer": "conv4_3"}, backbone_weights=hed_h5).eval().freeze_backbone()
    rgb = torch.rand(1, 3, 40, 48) * 255
    with torch.no_grad():
        cached = model.features(rgb)
        full = model(rgb)
    assert torch.equal(model.embed_features(cached), full)
    assert [g["name"] for g in model.param_groups(1e-3)] == ["head.weights", "head.biases"]


def test_param_groups_head_at_10x(hed_h5):
    model = build_model(backbone_weights=hed_h5)
    groups = {g["name"]: g for g in model.param_groups(2e-3, weight_decay=5e-4)}
    assert groups["backbone.weights"]["lr"] == 2e-3 and groups["head.weights"]["lr"] == pytest.approx(2e-2)
    assert groups["head.weights"]["weight_decay"] == 5e-4 and groups["head.biases"]["weight_decay"] == 0
    n_params = sum(len(g["params"]) for g in groups.values())
    assert n_params == len(list(model.parameters()))
    torch.optim.SGD(model.param_groups(2e-3), lr=2e-3, momentum=0.9)  # accepted as is


def test_saved_model_rebuilds_from_its_config(tmp_path):
    torch.manual_seed(1)
    model = build_model({"backbone": "scratch", "feature_layer": "conv4_3", "head": "conv1", "hidden": 64,
                         "embedding_dim": 8, "freeze_blocks": 2}).eval()
    path = tmp_path / "model.pt"
    torch.save({"config": model.model_config(), "state_dict": model.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    rebuilt = build_model(saved["config"], state_dict=saved["state_dict"]).eval()
    assert rebuilt.model_config() == model.model_config()
    rgb = torch.rand(1, 3, 24, 32) * 255
    with torch.no_grad():
        assert torch.equal(rebuilt(rgb), model(rgb))


def test_model_config_errors():
    with pytest.raises(InputError, match="unknown model config keys"):
        build_model({"backbone": "scratch", "dim": 3})
    with pytest.raises(InputError, match="head"):
        build_model({"backbone": "scratch", "head": "psp"})
    with pytest.raises(InputError, match="Trunk"):
        SegSortNet(torch.nn.Identity())
