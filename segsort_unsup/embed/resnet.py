"""A ResNet-50 trunk that reads torchvision's checkpoint layout, dilated to output stride 8.

torchvision's ``resnet50(replace_stride_with_dilation=[False, True, True])``, the DeepLab
arrangement (He et al., CVPR 2016; Chen et al., TPAMI 2018)::

    rgb -> /255, ImageNet mean/std -> stem: conv1 7x7/2, bn1, ReLU, max-pool 3x3/2 (stride 4)
        -> layer1 (3 bottlenecks, 256 ch, /4) -> layer2 (4, 512 ch, /8)
        -> layer3 (6, 1024 ch, /8: stride replaced by dilation 2) -> layer4 (3, 2048 ch, /8: dilation 4)

* Bottleneck (torchvision's "v1.5"): 1x1 conv -> bn -> ReLU -> 3x3 conv (the stride, padding =
  dilation) -> bn -> ReLU -> 1x1 conv (4x) -> bn, plus the shortcut (``downsample``: 1x1 conv with
  the stride, bn, on each layer's first block), then ReLU. In a dilated layer the first block
  keeps the previous dilation and the others take the new one (torchvision's ``_make_layer``).
* Batch norm always uses the checkpoint's running statistics (affine weights stay trainable):
  the small crops of CPU training cannot estimate batch statistics.
* Keys: ``conv1.weight``, ``bn1.{weight,bias,running_mean,running_var}``,
  ``layerL.B.{conv1,conv2,conv3}.weight``, ``layerL.B.{bn1,bn2,bn3}.*``,
  ``layerL.0.downsample.{0.weight,1.*}``; ``num_batches_tracked`` and ``fc.*`` are ignored.

Blocks that can be trained: ``stem``, ``layer1`` .. ``layer4`` (feature layer ``layer4``, 2048
channels, or ``layer3``, 1024 channels, where ``layer4`` is not built).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .trunk import IMAGENET, Backbone, FeatureLayer, Trunk, kaiming_normal_, read_checkpoint, take_tensor

# (name, blocks, width, stride, dilation of the layer's later blocks) for output stride 8.
LAYERS = (("layer1", 3, 64, 1, 1), ("layer2", 4, 128, 2, 1), ("layer3", 6, 256, 1, 2), ("layer4", 3, 512, 1, 4))
FEATURE_LAYERS = ("layer4", "layer3")
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


class StatsBatchNorm2d(nn.Module):
    """Batch norm with fixed running statistics (buffers) and a trainable affine (parameters)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _conv(cin: int, cout: int, k: int, *, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=dilation * (k // 2), dilation=dilation, bias=False)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, *, stride: int, dilation: int, downsample: bool):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, width, 1), StatsBatchNorm2d(width)
        self.conv2, self.bn2 = _conv(width, width, 3, stride=stride, dilation=dilation), StatsBatchNorm2d(width)
        self.conv3, self.bn3 = _conv(width, 4 * width, 1), StatsBatchNorm2d(4 * width)
        self.downsample = (nn.Sequential(_conv(cin, 4 * width, 1, stride=stride), StatsBatchNorm2d(4 * width))
                           if downsample else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class ResNetTrunk(Trunk):
    """Dilated ResNet-50: RGB 0..255 ``(N, 3, H, W)`` -> ``(N, C, ceil(H/8), ceil(W/8))`` of ``feature_layer``.

    The state dict has torchvision's keys (``conv1``, ``bn1``, ``layer1`` ...), less ``fc`` and
    ``num_batches_tracked``.
    """

    def __init__(self, *, name: str = "", feature_layer: str = "layer4"):
        super().__init__(IMAGENET)
        if feature_layer not in FEATURE_LAYERS:
            raise InputError(f"feature_layer {feature_layer!r} is not one of {', '.join(FEATURE_LAYERS)}")
        self.name = name
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), StatsBatchNorm2d(64)
        layers = LAYERS if feature_layer == "layer4" else LAYERS[:3]
        cin, dilation, inputs = 64, 1, [FeatureLayer("image", 3, 1), FeatureLayer("stem", 64, 4)]
        for lname, n, width, stride, new_dilation in layers:
            blocks = [Bottleneck(cin, width, stride=stride, dilation=dilation, downsample=True)]
            blocks += [Bottleneck(4 * width, width, stride=1, dilation=new_dilation, downsample=False)
                       for _ in range(1, n)]
            self.add_module(lname, nn.Sequential(*blocks))
            cin, dilation = 4 * width, new_dilation
            inputs.append(FeatureLayer(lname, cin, 4 if lname == "layer1" else 8))
        self.block_names = ("stem", *(layer[0] for layer in layers))
        self.block_inputs = tuple(inputs[:-1])
        self.output = inputs[-1]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def block_parameters(self, index: int) -> list[nn.Parameter]:
        if index == 0:
            return [*self.conv1.parameters(), *self.bn1.parameters()]
        return super().block_parameters(index)

    def run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            return F.max_pool2d(F.relu(self.bn1(self.conv1(x))), kernel_size=3, stride=2, padding=1)
        return self.get_submodule(self.block_names[index])(x)


def load_torchvision_resnet50(path: str | os.PathLike, *, feature_layer: str = "layer4") -> dict[str, torch.Tensor]:
    """Read a torchvision ``resnet50`` checkpoint into a :class:`ResNetTrunk` state_dict (shapes checked)."""
    state = read_checkpoint(path, what="torchvision resnet50")
    what = "torchvision resnet50"
    out = {"conv1.weight": take_tensor(state, "conv1.weight", (64, 3, 7, 7), path=path, what=what)}
    out.update(_bn(state, "bn1", 64, path))
    cin = 64
    for lname, n, width, _, _ in LAYERS if feature_layer == "layer4" else LAYERS[:3]:
        for b in range(n):
            pre = f"{lname}.{b}"
            for conv, shape in (("conv1", (width, cin, 1, 1)), ("conv2", (width, width, 3, 3)),
                                ("conv3", (4 * width, width, 1, 1))):
                out[f"{pre}.{conv}.weight"] = take_tensor(state, f"{pre}.{conv}.weight", shape, path=path, what=what)
            for bn, c in (("bn1", width), ("bn2", width), ("bn3", 4 * width)):
                out.update(_bn(state, f"{pre}.{bn}", c, path))
            if b == 0:
                out[f"{pre}.downsample.0.weight"] = take_tensor(state, f"{pre}.downsample.0.weight",
                                                                (4 * width, cin, 1, 1), path=path, what=what)
                out.update(_bn(state, f"{pre}.downsample.1", 4 * width, path))
            cin = 4 * width
    return out


def _bn(state, prefix: str, channels: int, path) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": take_tensor(state, f"{prefix}.{k}", (channels,), path=path, what="torchvision resnet50")
            for k in _BN_KEYS}


def _build_resnet50(*, weights: str | os.PathLike | None, feature_layer: str, pretrained: bool) -> ResNetTrunk:
    trunk = ResNetTrunk(name="resnet50", feature_layer=feature_layer)
    if pretrained:
        if weights is None:
            raise InputError("backbone 'resnet50' needs weights: the path of a torchvision resnet50 checkpoint "
                             "(e.g. resnet50-11ad3fa6.pth or resnet50-0676ba61.pth; --backbone-weights PATH)")
        trunk.load_state_dict(load_torchvision_resnet50(weights, feature_layer=feature_layer))
    return trunk


BACKBONES = (
    Backbone("resnet50", "ResNet-50 from a local torchvision checkpoint, dilated to stride 8 (layer3 x2, layer4 x4); "
             "ImageNet normalisation", _build_resnet50, FEATURE_LAYERS,
             "torchvision resnet50 checkpoint, e.g. resnet50-11ad3fa6.pth (required)"),
)
