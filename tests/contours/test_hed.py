"""The torch HED against a naive re-statement of the paper's network, and bf16 vs fp32 on BSDS500.

The naive forward spells out what the Keras reference does (checked against Keras itself in
test_hed_keras.py): 'same' 2x2 pooling that keeps the odd last row/column, bilinear resizing with
half-pixel centres written from the formula, BGR minus the Caffe mean.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segsort_unsup.contours.formats import hed_from_file
from segsort_unsup.contours.hed import HED, MEAN_BGR
from segsort_unsup.io.images import read_image


def _pool_same(x: np.ndarray) -> np.ndarray:
    """Keras MaxPooling2D(2, 2, 'same') on (C, H, W): pad the odd end with -inf, take 2x2 maxima."""
    c, h, w = x.shape
    padded = np.full((c, h + h % 2, w + w % 2), -np.inf, x.dtype)
    padded[:, :h, :w] = x
    return padded.reshape(c, padded.shape[1] // 2, 2, padded.shape[2] // 2, 2).max(axis=(2, 4))


def _resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """tf.image.resize bilinear (half-pixel centres, clamped at the border) on (C, h, w)."""
    def coords(out_len, in_len):
        src = (np.arange(out_len) + 0.5) * in_len / out_len - 0.5
        src = np.clip(src, 0, in_len - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, in_len - 1)
        return lo, hi, src - lo

    y0, y1, fy = coords(height, x.shape[1])
    x0, x1, fx = coords(width, x.shape[2])
    top = x[:, y0][:, :, x0] * (1 - fx) + x[:, y0][:, :, x1] * fx
    bottom = x[:, y1][:, :, x0] * (1 - fx) + x[:, y1][:, :, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


def _conv(x: np.ndarray, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    pad = weight.shape[-1] // 2
    out = F.conv2d(torch.from_numpy(x)[None].double(), weight.double(), bias.double(), padding=pad)
    return out[0].numpy()


def naive_hed(state: dict, rgb: np.ndarray) -> np.ndarray:
    """HED forward in float64 from the description (one image, RGB (H, W, 3) -> (H, W))."""
    h, w = rgb.shape[:2]
    x = rgb[..., ::-1].astype(np.float64) - np.array(MEAN_BGR)
    x = x.transpose(2, 0, 1)
    sides = []
    for b, n in enumerate((2, 2, 3, 3, 3), start=1):
        if b > 1:
            x = _pool_same(x)
        for i in range(n):
            x = np.maximum(_conv(x, state[f"block{b}.convs.{i}.weight"], state[f"block{b}.convs.{i}.bias"]), 0)
        side = _conv(x, state[f"dsn{b}.weight"], state[f"dsn{b}.bias"])
        sides.append(side if b == 1 else _resize_bilinear(side, h, w))
    fused = _conv(np.concatenate(sides), state["fuse.weight"], state["fuse.bias"])[0]
    return 1 / (1 + np.exp(-fused))


@pytest.fixture(scope="module")
def hed(hed_h5):
    return hed_from_file(None, hed_h5)


@pytest.mark.parametrize("size", [(33, 47), (32, 48), (1, 1), (17, 5)])
def test_matches_naive_forward_on_odd_sizes(hed, bsds, size):
    rgb = read_image(bsds / "images" / "test" / "100007.jpg")[100 : 100 + size[0], 200 : 200 + size[1]]
    with torch.inference_mode():
        prob = hed(torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float())[0, 0].numpy()
    assert prob.shape == size
    ref = naive_hed(hed.state_dict(), rgb)
    assert np.abs(prob - ref).max() < 1e-5


def test_forward_contract(hed):
    x = torch.full((2, 3, 20, 30), 128.0)
    with torch.inference_mode():
        out = hed(x)
    assert out.shape == (2, 1, 20, 30) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert set(HED().state_dict()) == set(hed.state_dict())


def test_bf16_close_to_fp32_on_bsds_images(hed, hed_h5, bsds):
    """Autocast bf16 + channels_last (the default CPU path) vs fp32, on full BSDS500 test images."""
    names = ["100007.jpg", "101027.jpg", "10081.jpg"]  # all 321 x 481
    x = torch.stack([torch.from_numpy(np.array(read_image(bsds / "images" / "test" / n))).permute(2, 0, 1).float()
                     for n in names])
    net_cl = hed_from_file(None, hed_h5).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref = hed(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net_cl(x.contiguous(memory_format=torch.channels_last))
    assert low.dtype == torch.float32
    diff = float((low - ref).abs().max())
    assert 0 < diff <= 0.02, diff  # > 0: bf16 really ran


def test_fused_cpu_paths(hed, hed_h5, bsds):
    """oneDNN conv+ReLU with pre-cast weights: same as the plain path in fp32, within 0.02 in bf16."""
    from segsort_unsup.contours.hed import cpu_fusion_available

    if not cpu_fusion_available():
        pytest.skip("torch built without oneDNN fused convolutions")
    x = torch.stack([torch.from_numpy(np.array(read_image(bsds / "images" / "test" / n))).permute(2, 0, 1).float()
                     for n in ("100039.jpg", "10081.jpg")])
    fused32 = hed_from_file(None, hed_h5).fuse_for_cpu(torch.float32)
    fused16 = hed_from_file(None, hed_h5).fuse_for_cpu(torch.bfloat16)
    with torch.inference_mode():
        ref = hed(x)
        assert float((fused32(x) - ref).abs().max()) < 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = fused16(x.contiguous(memory_format=torch.channels_last))
    assert 0 < float((low - ref).abs().max()) <= 0.02
    x.requires_grad_(True)  # autograd falls back to the plain path
    assert fused32(x).requires_grad
