"""The protocol every backbone trunk follows, so that a training regime is a setting, not a fork.

A trunk turns RGB float 0..255 ``(N, 3, H, W)`` into a feature map ``(N, C, h, w)`` at a fixed
stride. It says:

* its **input convention** (:class:`InputConvention`): channel order, pixel scale (0..255 or
  0..1), mean and std; :meth:`Trunk.normalise` applies it inside ``forward``, so callers always
  pass RGB 0..255;
* its **blocks**: the ordered units that can be trained (``trunk.block_names``), block ``i``
  owning ``trunk.block_parameters(i)``. The whole forward is the normalised image run through every block;
* its **layers** (:class:`FeatureLayer`: name, channels, stride): ``trunk.block_inputs[i]`` is the
  layer at the input of block ``i`` (what partial fine-tuning caches to train blocks ``i..``),
  ``trunk.output`` is the layer ``forward`` returns (what the head reads);
* its weights loader, in its registry entry (:class:`Backbone`, registered in
  :mod:`segsort_unsup.embed.backbones`).

Subclasses implement :meth:`Trunk.run_block` (one block on the representation between blocks) and
may override :meth:`Trunk.run_blocks` for a faster whole pass. The representation between blocks
is a 4-D map ``(N, C, h, w)`` for every trunk (so cached features can be cropped the same way).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError, WeightsError


@dataclass(frozen=True)
class InputConvention:
    """How a trunk wants its pixels: ``(pixels[order] * scale / 255 - mean) / std``.

    ``mean`` and ``std`` are in the network's channel order (BGR when ``bgr``) and pixel scale
    (``scale = 255``: 0..255 pixels, as Caffe's VGG; ``scale = 1``: 0..1, as torchvision and DINO).
    """

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    bgr: bool = False
    scale: float = 255.0


IMAGENET = InputConvention(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), scale=1.0)


@dataclass(frozen=True)
class FeatureLayer:
    """A named feature map of a trunk: its channels and its stride in input pixels."""

    name: str
    channels: int
    stride: int


class Trunk(nn.Module):
    """Base class of the backbones (see the module doc). ``forward(rgb)`` gives ``output`` features."""

    name: str = ""
    convention: InputConvention = InputConvention()
    block_names: tuple[str, ...] = ()
    block_inputs: tuple[FeatureLayer, ...] = ()
    output: FeatureLayer

    def __init__(self, convention: InputConvention) -> None:
        super().__init__()
        self.convention = convention
        mean, std = torch.tensor(convention.mean), torch.tensor(convention.std)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)

    # -- what the protocol declares ---------------------------------------------------------------
    @property
    def feature_layer(self) -> str:
        return self.output.name

    @property
    def out_channels(self) -> int:
        return self.output.channels

    @property
    def stride(self) -> int:
        return self.output.stride

    @property
    def n_blocks(self) -> int:
        return len(self.block_names)

    def block_parameters(self, index: int) -> list[nn.Parameter]:
        """The parameters of block ``index`` (default: those of the submodule named ``block_names[index]``)."""
        return list(self.get_submodule(self.block_names[index]).parameters())

    def block_index(self, layer: str | int) -> int:
        """Index of the block whose input is ``layer`` (a name in ``block_inputs`` or an index)."""
        if isinstance(layer, int) and not isinstance(layer, bool):
            if 0 <= layer <= self.n_blocks:
                return layer
        else:
            names = [b.name for b in self.block_inputs]
            if layer in names:
                return names.index(layer)
            if layer == self.output.name:
                return self.n_blocks
        known = ", ".join([b.name for b in self.block_inputs] + [self.output.name])
        raise InputError(f"{self.name}: no layer {layer!r} to start from; known: {known}")

    def layer_at(self, index: int) -> FeatureLayer:
        """The layer at the input of block ``index`` (``n_blocks``: the output)."""
        return self.block_inputs[index] if index < self.n_blocks else self.output

    # -- forward ------------------------------------------------------------------------------------
    def normalise(self, rgb: torch.Tensor) -> torch.Tensor:
        """RGB 0..255 -> the network's input convention (channel order, scale, mean, std)."""
        x = rgb.flip(1) if self.convention.bgr else rgb
        if self.convention.scale != 255.0:
            x = x * (self.convention.scale / 255.0)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Block ``index`` on the map at its input -> the map at the next block's input."""
        raise NotImplementedError

    def run_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start .. stop - 1`` on the map at the input of block ``start``."""
        for i in range(start, stop):
            x = self.run_block(i, x)
        return x

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.run_blocks(self.normalise(_check_rgb(rgb)), 0, self.n_blocks)

    def features_at(self, layer: str | int, rgb: torch.Tensor) -> torch.Tensor:
        """The map at ``layer`` (the input of a block, or the output) for RGB 0..255 images."""
        return self.run_blocks(self.normalise(_check_rgb(rgb)), 0, self.block_index(layer))

    def forward_from(self, layer: str | int, features: torch.Tensor) -> torch.Tensor:
        """The output features from the map at ``layer`` (e.g. cached by :meth:`features_at`)."""
        start = self.block_index(layer)
        want = self.layer_at(start)
        if features.ndim != 4 or features.shape[1] != want.channels:
            raise InputError(f"{self.name}: features at {want.name} must be (N, {want.channels}, h, w), "
                             f"got shape {tuple(features.shape)}")
        return self.run_blocks(features, start, self.n_blocks)

    # -- training -----------------------------------------------------------------------------------
    def freeze(self, n_blocks: int) -> "Trunk":
        """Freeze (``requires_grad=False``) the first ``n_blocks`` blocks; the rest stay trainable."""
        if isinstance(n_blocks, bool) or not isinstance(n_blocks, int) or not 0 <= n_blocks <= self.n_blocks:
            raise InputError(f"freeze_blocks={n_blocks!r}: must be in 0..{self.n_blocks} "
                             f"for backbone {self.name!r} at {self.feature_layer!r}")
        for i in range(self.n_blocks):
            for p in self.block_parameters(i):
                p.requires_grad_(i >= n_blocks)
        return self

    def frozen_blocks(self) -> int:
        """How many leading blocks have no trainable parameter."""
        frozen = 0
        for i in range(self.n_blocks):
            if any(p.requires_grad for p in self.block_parameters(i)):
                break
            frozen += 1
        return frozen

    def train_blocks_index(self, train_blocks: int | str) -> int:
        """Index of the first trainable block when the last ``train_blocks`` blocks train
        (``"all"``: every block, ``0``: none, the head-only mode)."""
        if train_blocks == "all":
            return 0
        valid = isinstance(train_blocks, int) and not isinstance(train_blocks, bool)
        if not valid or not 0 <= train_blocks <= self.n_blocks:
            raise InputError(f"train_blocks={train_blocks!r}: give 0..{self.n_blocks} or 'all' "
                             f"for backbone {self.name!r} at {self.feature_layer!r} "
                             f"(blocks: {', '.join(self.block_names)})")
        return self.n_blocks - train_blocks

    def fuse_for_cpu(self, dtype: torch.dtype | None = torch.bfloat16) -> "Trunk":
        """Faster no-grad CPU inference where the trunk has such a path (default: none)."""
        return self


@dataclass(frozen=True)
class Backbone:
    """One registry entry.

    ``build(weights=, feature_layer=, pretrained=)`` returns a :class:`Trunk` whose ``output`` is
    ``feature_layer`` (one of ``feature_layers``, the first being the default); with
    ``pretrained=False`` only the architecture (to load a saved model into). ``weights`` says
    what file its loader reads.
    """

    name: str
    summary: str
    build: Callable[..., Trunk]
    feature_layers: tuple[str, ...]
    weights: str = ""

    @property
    def default_layer(self) -> str:
        return self.feature_layers[0]


def _check_rgb(rgb: torch.Tensor) -> torch.Tensor:
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise InputError(f"backbone input must be RGB (N, 3, H, W), got shape {tuple(rgb.shape)}")
    return rgb


# -- initialisation -----------------------------------------------------------------------------------
def kaiming_normal_(weight: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``nn.init.kaiming_normal_``, skipped on the meta device (shapes only, no values to draw):
    torch's meta ``normal_`` imports ``torch._dynamo``, about a second in every process that
    checks a model file against its config."""
    if weight.is_meta:
        return weight
    return nn.init.kaiming_normal_(weight, **kwargs)


# -- weights files ------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike, *, what: str) -> Mapping[str, Any]:
    """A torch checkpoint read with ``weights_only=True`` (never unpickled) as a mapping.

    Raises :class:`WeightsError` naming the file for a missing, unreadable or non-mapping file.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(path, "weights file not found") from None
    except Exception as exc:  # noqa: BLE001 - a torch pickle error: name the file and cause
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise WeightsError(path, f"not a torch checkpoint readable with weights_only=True ({first})") from None
    if not isinstance(state, Mapping):
        raise WeightsError(path, f"expected a {what} state_dict (mapping of tensors), found {type(state).__name__}")
    return state


def take_tensor(state: Mapping[str, Any], key: str, shape: tuple[int, ...], *, path: str | os.PathLike,
                what: str) -> torch.Tensor:
    """``state[key]`` as a float32 copy, checked to have ``shape``; a one-line WeightsError otherwise."""
    if key not in state:
        raise WeightsError(path, f"not a {what} checkpoint: missing {key!r}")
    t = state[key]
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise WeightsError(path, f"tensor {key} has shape {got}, expected {tuple(shape)} for {what}")
    return t.detach().float().clone()
