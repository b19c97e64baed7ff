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

``feature_layer`` picks what feeds the embedding head: ``"conv4_3"`` (default; block5 is then
not built: the design notes found untrained conv4_3 features better for prototype retrieval than
dilated conv5_3) or ``"conv5_3"``.

Every trunk follows the protocol of :mod:`segsort_unsup.embed.trunk` (input convention, blocks
that can be trained, feature layers with channels and stride, a weights loader), so the training
regimes (head only, the last N blocks, everything) are settings on any of them. Registry
(:data:`BACKBONES`, :func:`register_backbone`, :func:`build_backbone`; the CLI's ``--backbone``
choices):

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
``dino-vits8``, ``dino-vits16``, ``dino-vitb8``, ``dino-vitb16``
    facebookresearch/dino's ViTs (:mod:`segsort_unsup.embed.vit`): patch tokens at the patch stride.
``resnet50``
    torchvision's ResNet-50 dilated to stride 8 (:mod:`segsort_unsup.embed.resnet`).

Every trunk takes RGB float 0..255 ``(N, 3, H, W)``; the normalisation happens in ``forward``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from ..contours.hed import MEAN_BGR, VGG16_BLOCKS, VggBlock
from ..errors import InputError
from ..runtime import cpu_fusion_available
from .trunk import (IMAGENET, Backbone, FeatureLayer, InputConvention, Trunk, kaiming_normal_, read_checkpoint,
                    take_tensor)

FEATURE_LAYERS = ("conv5_3", "conv4_3")
DEFAULT_BACKBONE = "vgg16-hed"
STRIDE = 8

# torchvision's vgg16 ``features`` indices of the 13 convs (ReLUs and pools sit in between).
TORCHVISION_VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)

HED_CONVENTION = InputConvention(mean=MEAN_BGR, bgr=True, scale=255.0)

# The map at the input of each VGG block: the pools belong to the block before (they have no
# weights), so partial fine-tuning of conv4 + conv5 caches pool3's output at stride 8, not
# conv3_3 at stride 4. pool4 is dropped: conv5 reads conv4_3.
_VGG_BLOCK_INPUTS = (FeatureLayer("image", 3, 1), FeatureLayer("pool1", 64, 2), FeatureLayer("pool2", 128, 4),
                     FeatureLayer("pool3", 256, 8), FeatureLayer("conv4_3", 512, 8))


class VggTrunk(Trunk):
    """VGG16 conv1-conv5 at output stride 8: RGB float 0..255 ``(N, 3, H, W)`` ->
    ``(N, 512, ceil(H/8), ceil(W/8))`` features of ``feature_layer``.

    Blocks ``block1 .. block5`` (:class:`~segsort_unsup.contours.hed.VggBlock`, the module HED
    uses); state-dict keys are HED's: ``block{1..5}.convs.{i}.{weight,bias}`` (no ``block5``
    with ``feature_layer="conv4_3"``).
    """

    def __init__(self, *, name: str = "", feature_layer: str = "conv4_3",
                 convention: InputConvention = IMAGENET):
        super().__init__(convention)
        if feature_layer not in FEATURE_LAYERS:
            raise InputError(f"feature_layer {feature_layer!r} is not one of {', '.join(FEATURE_LAYERS)}")
        self.name = name
        n_blocks = 5 if feature_layer == "conv5_3" else 4
        for i, (cin, cout, n) in enumerate(VGG16_BLOCKS[:n_blocks]):
            # pool1-pool3 precede blocks 2-4; pool4 is dropped, so block5 has no pool but dilation 2.
            self.add_module(f"block{i + 1}", VggBlock(cin, cout, n, pool=i in (1, 2, 3),
                                                      dilation=2 if i == 4 else 1, exact_input=i == 0))
        self.block_names = tuple(f"block{i}" for i in range(1, n_blocks + 1))
        self.block_inputs = _VGG_BLOCK_INPUTS[:n_blocks]
        self.output = FeatureLayer(feature_layer, 512, STRIDE)

    @property
    def blocks(self) -> list[VggBlock]:
        return [getattr(self, name) for name in self.block_names]

    def run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        blocks = self.blocks
        x = blocks[index].run_convs(x)
        return blocks[index + 1].pool_input(x) if index + 1 < len(blocks) else x

    def fuse_for_cpu(self, dtype: torch.dtype | None = torch.bfloat16) -> "VggTrunk":
        """Faster no-grad CPU inference: oneDNN conv+ReLU with weights pre-cast to ``dtype``
        (``torch.float32`` keeps full precision; ``None`` undoes it). No-op where the op is missing."""
        if dtype is None or cpu_fusion_available():
            for block in self.blocks:
                block.fuse_for_cpu(dtype)
        return self


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
    state = read_checkpoint(path, what="torchvision vgg16")
    n_blocks = 5 if feature_layer == "conv5_3" else 4
    out: dict[str, torch.Tensor] = {}
    tv = iter(TORCHVISION_VGG16_CONVS)
    for b, (cin, cout, n) in enumerate(VGG16_BLOCKS, start=1):
        for i in range(n):
            idx = next(tv)
            if b > n_blocks:
                continue
            for kind, shape in (("weight", (cout, cin if i == 0 else cout, 3, 3)), ("bias", (cout,))):
                out[f"block{b}.convs.{i}.{kind}"] = take_tensor(state, f"features.{idx}.{kind}", shape, path=path,
                                                                what="torchvision vgg16")
    return out


def _kaiming_init(trunk: nn.Module) -> None:
    for m in trunk.modules():
        if isinstance(m, nn.Conv2d):
            kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)


# -- registry ------------------------------------------------------------------------------------
def _build_vgg16_hed(*, weights: str | os.PathLike | None, feature_layer: str, pretrained: bool) -> VggTrunk:
    trunk = VggTrunk(name="vgg16-hed", feature_layer=feature_layer, convention=HED_CONVENTION)
    if pretrained:
        from ..contours.formats import load_hed_state_dict
        from ..contours.weights import resolve_weights

        path, _ = resolve_weights("hed-bsds500", weights)
        trunk.load_state_dict(trunk_state_from_hed(load_hed_state_dict(path), feature_layer=feature_layer))
    return trunk


def _build_vgg16(*, weights: str | os.PathLike | None, feature_layer: str, pretrained: bool) -> VggTrunk:
    trunk = VggTrunk(name="vgg16", feature_layer=feature_layer, convention=IMAGENET)
    if pretrained:
        if weights is None:
            raise InputError("backbone 'vgg16' needs weights: the path of a torchvision vgg16 ImageNet "
                             "checkpoint (e.g. vgg16-397923af.pth); or use backbone 'vgg16-hed'")
        trunk.load_state_dict(load_torchvision_vgg16(weights, feature_layer=feature_layer))
    return trunk


def _build_scratch(*, weights: str | os.PathLike | None, feature_layer: str, pretrained: bool) -> VggTrunk:
    if weights is not None:
        raise InputError("backbone 'scratch' is randomly initialised and takes no weights file")
    trunk = VggTrunk(name="scratch", feature_layer=feature_layer, convention=IMAGENET)
    _kaiming_init(trunk)
    return trunk


BACKBONES: dict[str, Backbone] = {}


def register_backbone(entry: Backbone) -> Backbone:
    """Add ``entry`` to the registry (the CLI's ``--backbone`` choices and model files read it)."""
    if not entry.feature_layers:
        raise InputError(f"backbone {entry.name!r} declares no feature layer")
    BACKBONES[entry.name] = entry
    return entry


def _register_builtin() -> None:
    from . import resnet, vit

    vgg_layers = ("conv4_3", "conv5_3")  # conv4_3 first: the layer the design notes build on
    for entry in (
        Backbone("vgg16-hed", "VGG16 trunk of HED (BSDS500), from the hed-bsds500 weights; BGR minus Caffe mean",
                 _build_vgg16_hed, vgg_layers, "any HED weights format (default: the verified hed-bsds500 file)"),
        Backbone("vgg16", "VGG16 from a local torchvision ImageNet checkpoint; torchvision normalisation",
                 _build_vgg16, vgg_layers, "torchvision vgg16 checkpoint, e.g. vgg16-397923af.pth (required)"),
        Backbone("scratch", "VGG16 trunk, random (Kaiming) initialisation; torchvision normalisation",
                 _build_scratch, vgg_layers, "none"),
        *vit.BACKBONES,
        *resnet.BACKBONES,
    ):
        register_backbone(entry)


def get_backbone(name: str) -> Backbone:
    """The registry entry ``name``; an unknown name is an error listing the known ones."""
    try:
        return BACKBONES[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}") from None


def check_feature_layer(backbone: str, feature_layer: str | None) -> str:
    """``feature_layer`` if ``backbone`` has it (``None``: its default); else a one-line InputError."""
    entry = get_backbone(backbone)
    if feature_layer is None:
        return entry.default_layer
    if feature_layer not in entry.feature_layers:
        raise InputError(f"feature_layer {feature_layer!r} is not one of {', '.join(entry.feature_layers)} "
                         f"(the layers of backbone {backbone!r})")
    return feature_layer


def build_backbone(name: str = DEFAULT_BACKBONE, *, weights: str | os.PathLike | None = None,
                   feature_layer: str | None = None, freeze_blocks: int = 0, pretrained: bool = True) -> Trunk:
    """Build the trunk ``name`` (see the module docstring).

    Parameters
    ----------
    weights
        Weight file, as the entry's ``weights`` says (e.g. any HED format for ``vgg16-hed``,
        default: the verified ``hed-bsds500`` cache file; a torchvision checkpoint for ``vgg16``).
    feature_layer
        The layer returned by ``forward``; ``None``: the entry's default (the first it lists).
    freeze_blocks
        Freeze the first N blocks (0 = train everything).
    pretrained
        ``False`` builds the architecture only (random init), e.g. to load a saved model into.

    Raises
    ------
    InputError
        Unknown name or feature layer, bad ``freeze_blocks``, or missing weights.
    WeightsError
        The weights file is missing, unreadable or of the wrong layout.
    """
    entry = get_backbone(name)
    feature_layer = check_feature_layer(name, feature_layer)
    trunk = entry.build(weights=weights if pretrained else None, feature_layer=feature_layer, pretrained=pretrained)
    return trunk.freeze(freeze_blocks)


_register_builtin()
