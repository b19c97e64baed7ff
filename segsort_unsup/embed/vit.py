"""A Vision Transformer trunk that reads facebookresearch/dino's checkpoints (ViT-S/8, ViT-S/16,
ViT-B/8, ViT-B/16): the patch tokens of the last block, after the final LayerNorm, as a feature
map at the patch stride.

The network is DINO's (Caron et al., ICCV 2021; Dosovitskiy et al., ICLR 2021)::

    rgb -> /255, ImageNet mean/std -> pad to a multiple of the patch (right/bottom, the mean colour)
        -> patch_embed.proj (conv p x p, stride p) -> [cls_token; patches] + pos_embed
        -> blocks.0 .. blocks.{depth-1}: x + attn(norm1(x)), then x + mlp(norm2(x))
        -> norm -> patch tokens as (N, dim, ceil(H/p), ceil(W/p))

* Attention: ``qkv`` (with bias) -> heads of ``dim / heads`` -> softmax(q k^T / sqrt(d)) v -> ``proj``;
  MLP: ``fc1`` (4 x dim) -> exact GELU -> ``fc2``; LayerNorm eps 1e-6.
* Positional embeddings: the checkpoint's grid (28 x 28 for patch 8, 14 x 14 for 16: 224 px) is
  resized bicubically to the input's grid as dino's ``interpolate_pos_encoding`` does (scale
  factor ``(grid + 0.1) / trained grid``, ``align_corners=False``), and used as is when the grid
  and image are square and of the trained size.
* Checkpoint keys: ``cls_token``, ``pos_embed``, ``patch_embed.proj.{weight,bias}``,
  ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias}``, ``norm.{weight,bias}``
  (the ``*_pretrain.pth`` backbone files). A full training checkpoint (``teacher`` /
  ``student`` with ``module.`` / ``backbone.`` prefixes) is read from its ``teacher``; ``head.*``
  keys (DINO's projection head) are ignored.

Blocks that can be trained: ``patch_embed`` (with ``cls_token`` and ``pos_embed``), then each
transformer block (the last one holds the final ``norm``). Between blocks the trunk's map has
``2 * dim`` channels: the patch tokens, then the class token broadcast over the grid, so that a
cached map can be cropped like any other and the blocks above still see the class token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, WeightsError
from .trunk import IMAGENET, Backbone, FeatureLayer, Trunk, read_checkpoint, take_tensor

OUTPUT_LAYER = "tokens"


@dataclass(frozen=True)
class ViTSpec:
    """Architecture of a ViT trunk: patch size, width, depth, heads, MLP ratio, and the side of the
    positional-embedding grid the checkpoint was trained at (224 / patch for DINO)."""

    patch: int
    dim: int
    depth: int
    heads: int
    mlp_ratio: int = 4
    pos_grid: int = 0

    @property
    def grid(self) -> int:
        return self.pos_grid or 224 // self.patch


class Attention(nn.Module):
    """Multi-head self-attention with DINO's parameter names (``qkv``, ``proj``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise InputError(f"ViT width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


class ViTTrunk(Trunk):
    """DINO's ViT: RGB 0..255 ``(N, 3, H, W)`` -> ``(N, dim, ceil(H/p), ceil(W/p))`` patch tokens."""

    def __init__(self, spec: ViTSpec, *, name: str = ""):
        super().__init__(IMAGENET)
        self.name, self.spec = name, spec
        self.patch_embed = PatchEmbed(spec.patch, spec.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + spec.grid ** 2, spec.dim))
        self.blocks = nn.ModuleList(Block(spec.dim, spec.heads, spec.mlp_ratio) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.block_names = ("patch_embed", *(f"blocks.{i}" for i in range(spec.depth)))
        self.block_inputs = (FeatureLayer("image", 3, 1),
                             *(FeatureLayer("embed" if i == 0 else f"blocks.{i - 1}", 2 * spec.dim, spec.patch)
                               for i in range(spec.depth)))
        self.output = FeatureLayer(OUTPUT_LAYER, spec.dim, spec.patch)

    def block_parameters(self, index: int) -> list[nn.Parameter]:
        if index == 0:
            return [self.cls_token, self.pos_embed, *self.patch_embed.parameters()]
        params = list(self.blocks[index - 1].parameters())
        return params + list(self.norm.parameters()) if index == self.n_blocks - 1 else params

    # -- tokens <-> maps ------------------------------------------------------------------------------
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised image -> ``[cls; patches] + pos_embed`` tokens ``(N, 1 + h * w, dim)`` (the
        image padded to whole patches)."""
        p = self.spec.patch
        height, width = x.shape[-2:]
        x = F.pad(x, (0, -width % p, 0, -height % p))
        patches = self.patch_embed.proj(x)
        grid = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1).to(patches.dtype), patches], dim=1)
        return tokens + self.position_embedding(grid[0], grid[1], square=x.shape[-1] == x.shape[-2]).to(patches.dtype)

    def position_embedding(self, rows: int, cols: int, *, square: bool) -> torch.Tensor:
        """``pos_embed`` for a ``rows x cols`` grid, resized bicubically as dino does."""
        g = self.spec.grid
        if rows * cols == g * g and square:
            return self.pos_embed
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid_pos = grid_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
        with torch.autocast(grid_pos.device.type, enabled=False):
            grid_pos = F.interpolate(grid_pos, scale_factor=((rows + 0.1) / g, (cols + 0.1) / g), mode="bicubic")
        if tuple(grid_pos.shape[-2:]) != (rows, cols):  # dino asserts the same
            raise RuntimeError(f"positional embedding resized to {tuple(grid_pos.shape[-2:])}, not {(rows, cols)}")
        return torch.cat([cls_pos, grid_pos.flatten(2).transpose(1, 2).to(cls_pos.dtype)], dim=1)

    def _to_map(self, tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        patches = tokens[:, 1:].transpose(1, 2).reshape(len(tokens), -1, rows, cols)
        return torch.cat([patches, tokens[:, :1].transpose(1, 2)[..., None].expand(-1, -1, rows, cols)], dim=1)

    def _from_map(self, x: torch.Tensor) -> torch.Tensor:
        d = self.spec.dim
        return torch.cat([x[:, d:, 0, 0][:, None], x[:, :d].flatten(2).transpose(1, 2)], dim=1)

    # -- the protocol's forward -------------------------------------------------------------------------
    def run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.run_blocks(x, index, index + 1)

    def run_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if start >= stop:
            return x
        if start == 0:
            t = self.tokens(x)
            rows, cols = -(-x.shape[-2] // self.spec.patch), -(-x.shape[-1] // self.spec.patch)
        else:
            t, (rows, cols) = self._from_map(x), x.shape[-2:]
        for i in range(max(start, 1), stop):
            t = self.blocks[i - 1](t)
        if stop < self.n_blocks:
            return self._to_map(t, rows, cols)
        t = self.norm(t)
        return t[:, 1:].transpose(1, 2).reshape(len(t), -1, rows, cols)


def load_dino_vit(path: str | os.PathLike, spec: ViTSpec) -> dict[str, torch.Tensor]:
    """Read a facebookresearch/dino ViT checkpoint into a :class:`ViTTrunk` state_dict.

    Raises :class:`WeightsError` naming the file and key for a missing tensor or a wrong shape
    (e.g. a ViT-B file given to a ViT-S backbone).
    """
    state = read_checkpoint(path, what="dino ViT")
    if "teacher" in state and isinstance(state["teacher"], dict):  # a full training checkpoint
        state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state["teacher"].items()}
    what = f"dino ViT (patch {spec.patch}, width {spec.dim}, depth {spec.depth})"
    d, h = spec.dim, spec.dim * spec.mlp_ratio
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + spec.grid ** 2, d),
              "patch_embed.proj.weight": (d, 3, spec.patch, spec.patch), "patch_embed.proj.bias": (d,),
              "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(spec.depth):
        for name, shape in (("norm1", (d,)), ("norm2", (d,)), ("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)),
                            ("mlp.fc1", (h, d)), ("mlp.fc2", (d, h))):
            shapes[f"blocks.{i}.{name}.weight"] = shape
            shapes[f"blocks.{i}.{name}.bias"] = (shape[0],)
    extra = sorted(k for k in state if k.startswith("blocks.") and int(k.split(".")[1]) >= spec.depth)
    if extra:
        raise WeightsError(path, f"checkpoint has more blocks than {what} ({extra[0]}); pick the matching backbone")
    return {key: take_tensor(state, key, shape, path=path, what=what) for key, shape in shapes.items()}


def _vit_builder(name: str, spec: ViTSpec, file_hint: str):
    def build(*, weights: str | os.PathLike | None, feature_layer: str, pretrained: bool) -> ViTTrunk:
        trunk = ViTTrunk(spec, name=name)
        if pretrained:
            if weights is None:
                raise InputError(f"backbone {name!r} needs weights: the path of dino's {file_hint} "
                                 f"(--backbone-weights PATH)")
            trunk.load_state_dict(load_dino_vit(weights, spec))
        return trunk

    return build


_DINO = (("dino-vits8", ViTSpec(8, 384, 12, 6), "dino_deitsmall8_pretrain.pth", "ViT-S/8"),
         ("dino-vits16", ViTSpec(16, 384, 12, 6), "dino_deitsmall16_pretrain.pth", "ViT-S/16"),
         ("dino-vitb8", ViTSpec(8, 768, 12, 12), "dino_vitbase8_pretrain.pth", "ViT-B/8"),
         ("dino-vitb16", ViTSpec(16, 768, 12, 12), "dino_vitbase16_pretrain.pth", "ViT-B/16"))

BACKBONES = tuple(
    Backbone(name, f"DINO {arch} (facebookresearch/dino), patch tokens at stride {spec.patch}; ImageNet normalisation",
             _vit_builder(name, spec, file), (OUTPUT_LAYER,), f"dino checkpoint {file} (required)")
    for name, spec, file, arch in _DINO
)
