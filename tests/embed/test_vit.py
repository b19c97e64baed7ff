"""The DINO ViT trunk on a small synthetic checkpoint in facebookresearch/dino's layout, against a
reference written here the way dino's vision_transformer.py computes (explicit softmax attention,
the positional grid resized by a NumPy bicubic from PyTorch's documented formula).

timm's VisionTransformer would be the natural peer, but timm imports torchvision, which does not
install beside this CPU torch; the reference below restates the network instead.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segsort_unsup.embed.backbones import build_backbone
from segsort_unsup.embed.model import SegSortNet
from segsort_unsup.embed.vit import ViTSpec, ViTTrunk, load_dino_vit
from segsort_unsup.errors import InputError, WeightsError

SPEC = ViTSpec(patch=8, dim=48, depth=2, heads=3, pos_grid=4)
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def dino_checkpoint(spec: ViTSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of dino's ``*_pretrain.pth`` files."""
    g = torch.Generator().manual_seed(seed)
    d, h = spec.dim, 4 * spec.dim

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    state = {"cls_token": r(1, 1, d), "pos_embed": r(1, 1 + spec.grid ** 2, d),
             "patch_embed.proj.weight": r(d, 3, spec.patch, spec.patch, scale=0.05), "patch_embed.proj.bias": r(d),
             "norm.weight": 1 + r(d), "norm.bias": r(d)}
    for i in range(spec.depth):
        p = f"blocks.{i}."
        state |= {p + "norm1.weight": 1 + r(d), p + "norm1.bias": r(d), p + "norm2.weight": 1 + r(d),
                  p + "norm2.bias": r(d), p + "attn.qkv.weight": r(3 * d, d, scale=0.3), p + "attn.qkv.bias": r(3 * d),
                  p + "attn.proj.weight": r(d, d), p + "attn.proj.bias": r(d), p + "mlp.fc1.weight": r(h, d),
                  p + "mlp.fc1.bias": r(h), p + "mlp.fc2.weight": r(d, h), p + "mlp.fc2.bias": r(d)}
    return state


def bicubic_numpy(grid: np.ndarray, scale_y: float, scale_x: float) -> np.ndarray:
    """PyTorch's bicubic (``align_corners=False``, a = -0.75, clamped borders) on (C, h, w), output
    ``floor(h * scale)``, source coordinate ``(dst + 0.5) / scale - 0.5`` with the given scale."""
    def weights(t):
        a = -0.75
        t = np.abs(t)
        return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                        np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))

    def matrix(n_in, scale):
        n_out = math.floor(n_in * scale)
        m = np.zeros((n_out, n_in))
        for o in range(n_out):
            src = (o + 0.5) / scale - 0.5
            base = math.floor(src)
            for k in range(base - 1, base + 3):
                m[o, min(max(k, 0), n_in - 1)] += weights(src - k)
        return m

    my, mx = matrix(grid.shape[1], scale_y), matrix(grid.shape[2], scale_x)
    return np.einsum("oh,chw,pw->cop", my, grid, mx)


def reference_forward(state: dict, rgb: np.ndarray, spec: ViTSpec) -> np.ndarray:
    """dino's VisionTransformer on one RGB 0..255 (H, W, 3) image whose sides are whole patches,
    in float64: its last block's patch tokens after the final norm, as (dim, H/p, W/p)."""
    s = {k: v.double() for k, v in state.items()}
    x = torch.from_numpy(((rgb / 255 - MEAN) / STD).transpose(2, 0, 1)[None].copy())
    p, d, g = spec.patch, spec.dim, spec.grid
    rows, cols = x.shape[2] // p, x.shape[3] // p
    tokens = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    tokens = torch.cat([s["cls_token"], tokens], dim=1)
    pos = s["pos_embed"]
    if not (rows * cols == g * g and x.shape[2] == x.shape[3]):
        grid = pos[0, 1:].reshape(g, g, d).permute(2, 0, 1).numpy()
        grid = bicubic_numpy(grid, (rows + 0.1) / g, (cols + 0.1) / g)
        pos = torch.cat([pos[:, :1], torch.from_numpy(grid).reshape(d, -1).T[None]], dim=1)
    x = tokens + pos
    heads, hd = spec.heads, d // spec.heads
    for i in range(spec.depth):
        def w(name):
            return s[f"blocks.{i}.{name}.weight"], s[f"blocks.{i}.{name}.bias"]
        y = F.layer_norm(x, (d,), *w("norm1"), eps=1e-6)
        qkv = F.linear(y, *w("attn.qkv")).reshape(1, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * hd ** -0.5).softmax(dim=-1)
        x = x + F.linear((attn @ qkv[2]).transpose(1, 2).reshape(1, -1, d), *w("attn.proj"))
        y = F.layer_norm(x, (d,), *w("norm2"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(y, *w("mlp.fc1"))), *w("mlp.fc2"))
    x = F.layer_norm(x, (d,), s["norm.weight"], s["norm.bias"], eps=1e-6)
    return x[0, 1:].T.reshape(d, rows, cols).numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("dino") / "dino_tiny_pretrain.pth"
    state = dino_checkpoint(SPEC)
    torch.save(state, path)
    return path, state


def _trunk(path) -> ViTTrunk:
    trunk = ViTTrunk(SPEC, name="tiny")
    trunk.load_state_dict(load_dino_vit(path, SPEC))
    return trunk.eval()


@pytest.mark.parametrize("size", [(32, 32), (40, 56), (48, 24), (37, 53)])
def test_forward_matches_the_dino_reference(checkpoint, size):
    path, state = checkpoint
    trunk = _trunk(path)
    rgb = np.random.default_rng(size[0]).uniform(0, 255, (*size, 3))
    with torch.no_grad():
        ours = trunk(torch.from_numpy(rgb.transpose(2, 0, 1)[None]).float())[0].double().numpy()
    rows, cols = -(-size[0] // 8), -(-size[1] // 8)
    assert ours.shape == (48, rows, cols)
    # sides that are not whole patches: the image padded with its mean colour (0 after normalising)
    padded = np.broadcast_to(MEAN * 255, (rows * 8, cols * 8, 3)).copy()
    padded[: size[0], : size[1]] = rgb
    ref = reference_forward(state, padded, SPEC)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-4 * np.abs(ref).max())


def test_full_training_checkpoint_reads_its_teacher(checkpoint, tmp_path):
    path, state = checkpoint
    full = {"teacher": {**{f"backbone.{k}": v for k, v in state.items()}, "head.mlp.0.weight": torch.zeros(2, 2)},
            "student": {f"module.backbone.{k}": v * 0 for k, v in state.items()}, "epoch": 100}
    torch.save(full, tmp_path / "checkpoint.pth")
    loaded = load_dino_vit(tmp_path / "checkpoint.pth", SPEC)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_wrong_layout_is_one_line(checkpoint, tmp_path):
    path, state = checkpoint
    with pytest.raises(WeightsError, match=r"cls_token has shape \(1, 1, 48\), expected \(1, 1, 64\)"):
        load_dino_vit(path, ViTSpec(8, 64, 2, 4, pos_grid=4))
    with pytest.raises(WeightsError, match="more blocks"):
        load_dino_vit(path, ViTSpec(8, 48, 1, 3, pos_grid=4))
    broken = dict(state)
    del broken["norm.weight"]
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match="missing 'norm.weight'"):
        load_dino_vit(tmp_path / "broken.pth", SPEC)
    with pytest.raises(InputError, match="dino_deitsmall8_pretrain.pth"):
        build_backbone("dino-vits8")
    with pytest.raises(WeightsError, match="missing 'cls_token'|has shape"):
        build_backbone("dino-vits8", weights=path)


def test_partial_fine_tuning_from_cached_tokens(checkpoint):
    path, _ = checkpoint
    model = SegSortNet(_trunk(path), embedding_dim=8, hidden=16).eval()
    rgb = torch.rand(1, 3, 40, 48) * 255
    layer = model.cache_layer(1)
    assert layer == "blocks.0"
    with torch.no_grad():
        cached = model.features_at(layer, rgb)
        assert cached.shape == (1, 96, 5, 6)  # patch tokens, then the class token broadcast
        torch.testing.assert_close(model.forward_from(layer, cached), model(rgb), rtol=1e-5, atol=1e-6)
        # a crop of the cached map runs through the upper block like any map
        assert model.forward_from(layer, cached[:, :, 1:4, 2:5]).shape == (1, 8, 3, 3)
    model.train_blocks(1)
    assert [i for i in range(3) if model.backbone.block_parameters(i)[0].requires_grad] == [2]
    assert model.backbone.norm.weight.requires_grad and not model.backbone.pos_embed.requires_grad
