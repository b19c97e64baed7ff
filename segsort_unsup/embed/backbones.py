"""Backbones for SegSort: a VGG16 conv1-conv5 trunk at output stride 8, and a registry of its
initialisations.

The trunk is VGG16 with its pooling cut back so that the features keep 1/8 of the input
resolution, the stride of the reference's dilated PSPNet (ResNet-101) and of DeepLab-LargeFOV::

    rgb -> normalise -> block1 -> pool1 -> block2 -> pool2 -> block3 -> pool3 -> block4 (conv4_3, /8)
                                                                                 -> block5 (conv5_3, /8)

* pool1-pool3 are kept (2x2, stride 2, rounding up as Caffe and HED do, so an ``H x W`` input
  gives ``ceil(H/8) x ceil(W/8)`` features).
* pool4 is dropped (not replaced by a stride-1 pool): conv5 runs on the stride-8 grid.
* conv5_1-conv5_3 are dilated by 2 (padding 2). The pretrained conv5 filters were learned one
  pool behind, on the stride-16 grid where neighbouring taps are 16 input pixels apart; with
  dilation 2 on the stride-8 grid the taps are again 16 pixels apart, so each filter sees the
  same spatial layout it was trained on (the "atrous" trick of DeepLab), at twice the density.
  conv1-conv4 run at their original strides, so their weights need no change.
* pool5 and the fully connected layers are not used.

``feature_layer`` picks what feeds the embedding head: ``"conv5_3"`` (default) or ``"conv4_3"``
(block5 is then not built; the design notes found untrained conv4_3 features better for
prototype retrieval than dilated conv5_3).

Registry (:data:`BACKBONES`, :func:`build_backbone`):

``vgg16-hed`` (default)
    The VGG16 trunk of HED trained on BSDS500 (HED itself started from ImageNet VGG16), read by
    :func:`segsort_unsup.contours.formats.load_hed_state_dict` (any HED format). Input handling
    as HED: RGB -> BGR, minus the Caffe mean.
``vgg16``
    torchvision's ImageNet ``vgg16`` checkpoint (``features.N.weight`` keys, e.g.
    ``vgg16-397923af.pth``), loaded with ``weights_only=True``. Input: RGB / 255, minus the
    ImageNet mean, divided by its std (torchvision's convention).
``scratch``
    Random initialisation (Kaiming normal, fan-out, zero biases; torchvision's VGG init), with
    torchvision's input convention.

Every trunk takes RGB float 0..255 ``(N, 3, H, W)``; the normalisation happens in ``forward``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..contours.hed import MEAN_BGR, VGG16_BLOCKS
from ..errors import InputError, WeightsError

FEATURE_LAYERS = ("conv5_3", "conv4_3")
DEFAULT_BACKBONE = "vgg16-hed"
STRIDE = 8

# torchvision's vgg16 ``features`` indices of the 13 convs (ReLUs and pools sit in between).
TORCHVISION_VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)

_IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class VggBlock(nn.Module):
    """Optional 2x2 max-pool (stride 2, rounding up), then ``n_convs`` 3x3 conv + ReLU.

    With ``exact_input`` the first conv runs in float32 also under autocast: raw pixels (+-150)
    keep only ~0.5 grey levels in bfloat16, and that conv (3 -> 64 channels) is under 1% of the
    trunk's FLOPs (as in :class:`segsort_unsup.contours.hed.VggBlock`).
    """

    def __init__(self, in_channels: int, out_channels: int, n_convs: int, *, pool: bool,
                 dilation: int = 1, exact_input: bool = False):
        super().__init__()
        self.pool = pool
        self.exact_input = exact_input
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, kernel_size=3,
                      padding=dilation, dilation=dilation)
            for i in range(n_convs)
        )
        self._fused: list[tuple[torch.Tensor, torch.Tensor, int]] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool:
            x = F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True)
        if self._fused is not None and x.device.type == "cpu" and not torch.is_grad_enabled():
            return self._forward_fused(x)
        for i, conv in enumerate(self.convs):
            if i == 0 and self.exact_input:
                with torch.autocast(x.device.type, enabled=False):
                    x = F.relu_(conv(x.float()))
            else:
                x = F.relu_(conv(x))
        return x

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        for weight, bias, dil in self._fused:  # (input, weight, bias, padding, stride, dilation, groups, op, ...)
            x = torch.ops.mkldnn._convolution_pointwise(
                x.to(weight.dtype), weight, bias, [dil, dil], [1, 1], [dil, dil], 1, "relu", [None], "")
        return x

    def fuse_for_cpu(self, dtype: torch.dtype | None) -> None:
        """No-grad CPU inference through oneDNN's fused conv+ReLU with weights pre-cast to
        ``dtype`` (``None`` undoes it). Gradient-enabled calls always take the plain path, and the
        pre-cast copies are snapshots: call again after the weights change."""
        if dtype is None:
            self._fused = None
            return
        self._fused = []
        for i, conv in enumerate(self.convs):
            dt = torch.float32 if i == 0 and self.exact_input else dtype
            self._fused.append((conv.weight.detach().to(dt).contiguous(memory_format=torch.channels_last),
                                conv.bias.detach().to(dt), conv.dilation[0]))


class VggTrunk(nn.Module):
    """VGG16 conv1-conv5 at output stride 8: RGB float 0..255 ``(N, 3, H, W)`` ->
    ``(N, 512, ceil(H/8), ceil(W/8))`` features of ``feature_layer``.

    State-dict keys are HED's: ``block{1..5}.convs.{i}.{weight,bias}`` (no ``block5`` with
    ``feature_layer="conv4_3"``).
    """

    out_channels = 512
    stride = STRIDE

    def __init__(self, *, name: str = "", feature_layer: str = "conv5_3",
                 mean_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0),
                 std_rgb: tuple[float, float, float] = (1.0, 1.0, 1.0), bgr: bool = False):
        super().__init__()
        if feature_layer not in FEATURE_LAYERS:
            raise InputError(f"feature_layer {feature_layer!r} is not one of {', '.join(FEATURE_LAYERS)}")
        self.name = name
        self.feature_layer = feature_layer
        self.bgr = bgr
        n_blocks = 5 if feature_layer == "conv5_3" else 4
        blocks = []
        for i, (cin, cout, n) in enumerate(VGG16_BLOCKS[:n_blocks]):
            # pool1-pool3 precede blocks 2-4; pool4 is dropped, so block5 has no pool but dilation 2.
            blocks.append(VggBlock(cin, cout, n, pool=i in (1, 2, 3), dilation=2 if i == 4 else 1,
                                   exact_input=i == 0))
        for i, block in enumerate(blocks, start=1):
            self.add_module(f"block{i}", block)
        self.n_blocks = n_blocks
        mean, std = torch.tensor(mean_rgb), torch.tensor(std_rgb)
        if bgr:
            mean, std = mean.flip(0), std.flip(0)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)

    @property
    def blocks(self) -> list[VggBlock]:
        return [getattr(self, f"block{i}") for i in range(1, self.n_blocks + 1)]

    def normalise(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB 0..255 -> the network's input convention (channel order, mean, std)."""
        x = rgb.flip(1) if self.bgr else rgb
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        if rgb.ndim != 4 or rgb.shape[1] != 3:
            raise InputError(f"backbone input must be RGB (N, 3, H, W), got shape {tuple(rgb.shape)}")
        x = self.normalise(rgb)
        for block in self.blocks:
            x = block(x)
        return x

    def freeze(self, n_blocks: int) -> "VggTrunk":
        """Freeze (``requires_grad=False``) the first ``n_blocks`` blocks; the rest stay trainable."""
        if not 0 <= n_blocks <= self.n_blocks:
            raise InputError(f"freeze_blocks={n_blocks}: must be in 0..{self.n_blocks} "
                             f"for feature_layer {self.feature_layer!r}")
        for i, block in enumerate(self.blocks, start=1):
            for p in block.parameters():
                p.requires_grad_(i > n_blocks)
        return self

    def fuse_for_cpu(self, dtype: torch.dtype | None = torch.bfloat16) -> "VggTrunk":
        """Faster no-grad CPU inference: oneDNN conv+ReLU with weights pre-cast to ``dtype``
        (``torch.float32`` keeps full precision; ``None`` undoes it). No-op where the op is missing."""
        if dtype is None or cpu_fusion_available():
            for block in self.blocks:
                block.fuse_for_cpu(dtype)
        return self


def cpu_fusion_available() -> bool:
    """Whether this torch build has oneDNN's fused convolution + pointwise op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


# -- weights --------------------------------------------------------------------------------------
def trunk_state_from_hed(hed_state: Mapping[str, torch.Tensor], *, feature_layer: str = "conv5_3") -> dict:
    """The VGG16 trunk (``block*`` tensors) of a HED state_dict, as a :class:`VggTrunk` state_dict."""
    n_blocks = 5 if feature_layer == "conv5_3" else 4
    keep = tuple(f"block{i}." for i in range(1, n_blocks + 1))
    return {k: v for k, v in hed_state.items() if k.startswith(keep)}


def load_torchvision_vgg16(path: str | os.PathLike, *, feature_layer: str = "conv5_3") -> dict:
    """Read a torchvision ``vgg16`` checkpoint (``features.N.{weight,bias}``) into a
    :class:`VggTrunk` state_dict. The classifier is ignored.

    Raises :class:`WeightsError` when the file cannot be read safely or lacks a conv tensor.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(path, "weights file not found") from None
    except Exception as exc:  # noqa: BLE001 - a torch pickle error: name the file and cause
        raise WeightsError(path, f"not a torch checkpoint readable with weights_only=True ({exc})") from None
    if not isinstance(state, Mapping):
        raise WeightsError(path, f"expected a state_dict (mapping of tensors), found {type(state).__name__}")
    n_blocks = 5 if feature_layer == "conv5_3" else 4
    out: dict[str, torch.Tensor] = {}
    tv = iter(TORCHVISION_VGG16_CONVS)
    for b, (cin, cout, n) in enumerate(VGG16_BLOCKS, start=1):
        for i in range(n):
            idx = next(tv)
            if b > n_blocks:
                continue
            for kind, shape in (("weight", (cout, cin if i == 0 else cout, 3, 3)), ("bias", (cout,))):
                key = f"features.{idx}.{kind}"
                if key not in state:
                    raise WeightsError(path, f"not a torchvision vgg16 checkpoint: missing {key!r}")
                t = state[key]
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise WeightsError(path, f"tensor {key} has shape {got}, expected {shape}")
                out[f"block{b}.convs.{i}.{kind}"] = t.detach().float().clone()
    return out


def _kaiming_init(trunk: VggTrunk) -> None:
    for m in trunk.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)


# -- registry ------------------------------------------------------------------------------------
def _build_vgg16_hed(*, weights: str | os.PathLike | None, feature_layer: str, pretrained: bool) -> VggTrunk:
    trunk = VggTrunk(name="vgg16-hed", feature_layer=feature_layer, mean_rgb=MEAN_BGR[::-1], bgr=True)
    if pretrained:
        from ..contours.formats import load_hed_state_dict
        from ..contours.weights import resolve_weights

        path, _ = resolve_weights("hed-bsds500", weights)
        trunk.load_state_dict(trunk_state_from_hed(load_hed_state_dict(path), feature_layer=feature_layer))
    return trunk


def _build_vgg16(*, weights: str | os.PathLike | None, feature_layer: str, pretrained: bool) -> VggTrunk:
    trunk = VggTrunk(name="vgg16", feature_layer=feature_layer, mean_rgb=_IMAGENET_MEAN_RGB, std_rgb=_IMAGENET_STD_RGB)
    if pretrained:
        if weights is None:
            raise InputError("backbone 'vgg16' needs weights: the path of a torchvision vgg16 ImageNet "
                             "checkpoint (e.g. vgg16-397923af.pth); or use backbone 'vgg16-hed'")
        trunk.load_state_dict(load_torchvision_vgg16(weights, feature_layer=feature_layer))
    return trunk


def _build_scratch(*, weights: str | os.PathLike | None, feature_layer: str, pretrained: bool) -> VggTrunk:
    if weights is not None:
        raise InputError("backbone 'scratch' is randomly initialised and takes no weights file")
    trunk = VggTrunk(name="scratch", feature_layer=feature_layer, mean_rgb=_IMAGENET_MEAN_RGB,
                     std_rgb=_IMAGENET_STD_RGB)
    _kaiming_init(trunk)
    return trunk


@dataclass(frozen=True)
class Backbone:
    """One registry entry: ``build(weights=, feature_layer=, pretrained=)`` returns a trunk."""

    name: str
    summary: str
    build: Callable[..., VggTrunk]


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("vgg16-hed", "VGG16 trunk of HED (BSDS500), from the hed-bsds500 weights; BGR minus Caffe mean",
                 _build_vgg16_hed),
        Backbone("vgg16", "VGG16 from a local torchvision ImageNet checkpoint; torchvision normalisation",
                 _build_vgg16),
        Backbone("scratch", "VGG16 trunk, random (Kaiming) initialisation; torchvision normalisation",
                 _build_scratch),
    )
}


def get_backbone(name: str) -> Backbone:
    """The registry entry ``name``; an unknown name is an error listing the known ones."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}") from None


def build_backbone(name: str = DEFAULT_BACKBONE, *, weights: str | os.PathLike | None = None,
                   feature_layer: str = "conv5_3", freeze_blocks: int = 0, pretrained: bool = True) -> VggTrunk:
    """Build the trunk ``name`` (see the module docstring).

    Parameters
    ----------
    weights
        Weight file: any HED format for ``vgg16-hed`` (default: the verified ``hed-bsds500`` cache
        file), a torchvision checkpoint for ``vgg16`` (required); none for ``scratch``.
    feature_layer
        ``"conv5_3"`` or ``"conv4_3"``: the layer returned by ``forward``.
    freeze_blocks
        Freeze the first N VGG blocks (0 = train everything).
    pretrained
        ``False`` builds the architecture only (random init), e.g. to load a saved model into.

    Raises
    ------
    InputError
        Unknown name or feature layer, bad ``freeze_blocks``, or missing ``vgg16`` weights.
    WeightsError
        The weights file is missing, unreadable or of the wrong layout.
    """
    entry = get_backbone(name)
    if feature_layer not in FEATURE_LAYERS:
        raise InputError(f"feature_layer {feature_layer!r} is not one of {', '.join(FEATURE_LAYERS)}")
    if pretrained:
        trunk = entry.build(weights=weights, feature_layer=feature_layer, pretrained=True)
    else:
        trunk = entry.build(weights=None, feature_layer=feature_layer, pretrained=False)
    return trunk.freeze(freeze_blocks)
