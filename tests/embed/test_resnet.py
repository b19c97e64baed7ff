"""The dilated ResNet-50 trunk on a synthetic checkpoint in torchvision's layout, against a literal
conv / batch-norm reference written from torchvision's ``resnet50(replace_stride_with_dilation=
[False, True, True])`` (torchvision itself does not install beside this CPU torch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segsort_unsup.embed.backbones import build_backbone
from segsort_unsup.embed.model import SegSortNet
from segsort_unsup.errors import InputError, WeightsError

# torchvision resnet50: (layer, bottlenecks, width); dilated: layer3 stride -> dilation 2, layer4 -> 4
ARCH = (("layer1", 3, 64), ("layer2", 4, 128), ("layer3", 6, 256), ("layer4", 3, 512))


def torchvision_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under torchvision resnet50's keys (with num_batches_tracked and fc, as in the files)."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def conv(key, cout, cin, k):
        state[key] = torch.randn(cout, cin, k, k, generator=g) * (2 / (cin * k * k)) ** 0.5

    def bn(prefix, c):
        state[f"{prefix}.weight"] = 0.5 + torch.rand(c, generator=g) * 0.5
        state[f"{prefix}.bias"] = torch.randn(c, generator=g) * 0.1
        state[f"{prefix}.running_mean"] = torch.randn(c, generator=g) * 0.1
        state[f"{prefix}.running_var"] = 0.5 + torch.rand(c, generator=g)
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(1000)

    conv("conv1.weight", 64, 3, 7)
    bn("bn1", 64)
    cin = 64
    for name, n, width in ARCH:
        for b in range(n):
            p = f"{name}.{b}"
            conv(f"{p}.conv1.weight", width, cin, 1)
            bn(f"{p}.bn1", width)
            conv(f"{p}.conv2.weight", width, width, 3)
            bn(f"{p}.bn2", width)
            conv(f"{p}.conv3.weight", 4 * width, width, 1)
            bn(f"{p}.bn3", 4 * width)
            if b == 0:
                conv(f"{p}.downsample.0.weight", 4 * width, cin, 1)
                bn(f"{p}.downsample.1", 4 * width)
            cin = 4 * width
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    return state


def reference(state: dict, rgb: torch.Tensor, *, last: str = "layer4") -> torch.Tensor:
    """torchvision's forward spelled out in float64 (eval-mode batch norm)."""
    s = {k: v.double() for k, v in state.items()}

    def bn(x, p):
        return F.batch_norm(x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"], s[f"{p}.bias"],
                            training=False, eps=1e-5)

    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    x = (rgb.double() / 255 - mean) / std
    x = F.max_pool2d(F.relu(bn(F.conv2d(x, s["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    dilation = 1
    for name, n, _ in ARCH:
        stride = 2 if name == "layer2" else 1
        new = {"layer3": 2, "layer4": 4}.get(name, dilation)  # _make_layer: dilation *= the replaced stride
        for b in range(n):
            p, d = f"{name}.{b}", dilation if b == 0 else new  # the first block keeps the previous dilation
            out = F.relu(bn(F.conv2d(x, s[f"{p}.conv1.weight"]), f"{p}.bn1"))
            out = F.relu(bn(F.conv2d(out, s[f"{p}.conv2.weight"], stride=stride if b == 0 else 1, padding=d,
                                     dilation=d), f"{p}.bn2"))
            out = bn(F.conv2d(out, s[f"{p}.conv3.weight"]), f"{p}.bn3")
            short = bn(F.conv2d(x, s[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1") if b == 0 else x
            x = F.relu(out + short)
        dilation = new
        if name == last:
            return x
    return x


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("resnet") / "resnet50-test.pth"
    state = torchvision_checkpoint()
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("layer", ["layer4", "layer3"])
def test_forward_matches_torchvision_dilated(checkpoint, layer):
    path, state = checkpoint
    trunk = build_backbone("resnet50", weights=path, feature_layer=layer).eval()
    rgb = torch.rand(1, 3, 45, 62, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        ours = trunk(rgb)
    ref = reference(state, rgb, last=layer)
    assert ours.shape == ref.shape == (1, 2048 if layer == "layer4" else 1024, 6, 8)  # ceil(/8)
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
    assert trunk.stride == 8


def test_partial_fine_tuning_from_layer3_input(checkpoint):
    path, _ = checkpoint
    model = SegSortNet(build_backbone("resnet50", weights=path), embedding_dim=8, hidden=16).eval()
    assert [model.cache_layer(n) for n in (0, 1, 2)] == ["layer4", "layer3", "layer2"]
    rgb = torch.rand(1, 3, 40, 48) * 255
    with torch.no_grad():
        cached = model.features_at("layer2", rgb)
        assert cached.shape == (1, 512, 5, 6)
        assert torch.equal(model.forward_from("layer2", cached), model(rgb))
    model.train_blocks(2)
    trunk = model.backbone
    assert not trunk.conv1.weight.requires_grad and not trunk.layer2[0].conv1.weight.requires_grad
    assert trunk.layer3[0].bn1.weight.requires_grad and trunk.layer4[2].conv3.weight.requires_grad


def test_wrong_checkpoint_is_one_line(checkpoint, tmp_path):
    path, state = checkpoint
    broken = {k: v for k, v in state.items() if k != "layer3.0.downsample.0.weight"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match="missing 'layer3.0.downsample.0.weight'"):
        build_backbone("resnet50", weights=tmp_path / "broken.pth")
    # layer4's tensors are not needed for feature_layer layer3
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4")}, tmp_path / "no4.pth")
    assert build_backbone("resnet50", weights=tmp_path / "no4.pth", feature_layer="layer3").out_channels == 1024
    with pytest.raises(InputError, match="resnet50-11ad3fa6.pth"):
        build_backbone("resnet50")
    with pytest.raises(InputError, match="not one of layer4, layer3"):
        build_backbone("resnet50", weights=path, feature_layer="conv4_3")
