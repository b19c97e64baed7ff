"""Real prototypes stores for discover tests: HED-VGG16 conv4_3 features averaged over SLIC superpixels.

Same schema as the embed stage writes (``prototypes`` K x D unit norm, ``segments`` H x W,
``area``, ``bbox`` y0,x0,y1,x1 exclusive, optional ``label`` = majority class; attr ``source``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def build_prototypes_store(root: str | os.PathLike, images: list[Path], *, hed_h5: Path,
                           labels: list[Path] | None = None, n_segments: int = 40, scale: float = 0.5,
                           ignore: int | None = None, threads: int = 2) -> Path:
    """Write a prototypes store at ``root`` for ``images`` (optionally labelled by ``labels`` PNGs).

    Images are reduced by ``scale`` before features and superpixels; ``source`` points to a copy of
    the reduced image written beside the store (so segments and image align, as embed's do).
    ``ignore``: a label value never taken as a majority (e.g. CamVid's void 11), -1 if nothing else.
    """
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from skimage.segmentation import slic

    from segsort_unsup.embed.backbones import build_backbone
    from segsort_unsup.io.images import read_image, read_label_png
    from segsort_unsup.io.store import Item, StoreWriter

    torch.set_num_threads(threads)
    root = Path(root)
    pics = root.parent / f"{root.name}-images"
    pics.mkdir(parents=True, exist_ok=True)
    trunk = build_backbone("vgg16-hed", weights=hed_h5, feature_layer="conv4_3").eval()
    with StoreWriter(root, kind="prototypes", config={"test": "slic-conv4_3", "n": len(images), "scale": scale},
                     shard_size=16) as writer:
        for i, path in enumerate(images):
            key = Path(path).stem
            if key in writer.completed:
                continue
            rgb = read_image(path)
            h, w = round(rgb.shape[0] * scale), round(rgb.shape[1] * scale)
            rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
            small = pics / f"{key}.png"
            Image.fromarray(rgb).save(small)
            segs = slic(rgb, n_segments=n_segments, compactness=10, start_label=0).astype(np.int32)
            _, segs = np.unique(segs, return_inverse=True)
            segs = segs.reshape(h, w).astype(np.int32)
            k = int(segs.max()) + 1
            with torch.inference_mode():
                feat = trunk(torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float())
                feat = F.interpolate(feat, size=(h, w), mode="bilinear", align_corners=False)[0]
            feat = feat.permute(1, 2, 0).reshape(h * w, -1).numpy().astype(np.float64)
            flat = segs.ravel()
            sums = np.zeros((k, feat.shape[1]))
            np.add.at(sums, flat, feat)
            protos = sums / np.linalg.norm(sums, axis=1, keepdims=True).clip(1e-12)
            area = np.bincount(flat, minlength=k).astype(np.int64)
            ys, xs = np.indices((h, w))
            bbox = np.stack([np.array([ys.ravel()[flat == s].min(), xs.ravel()[flat == s].min(),
                                       ys.ravel()[flat == s].max() + 1, xs.ravel()[flat == s].max() + 1])
                             for s in range(k)]).astype(np.int32)
            arrays = {"prototypes": protos.astype(np.float32), "segments": segs, "area": area, "bbox": bbox}
            if labels is not None:
                lab = np.asarray(Image.fromarray(read_label_png(labels[i])).resize((w, h), Image.NEAREST)).astype(np.int64)
                classes = int(lab.max()) + 1
                counts = np.zeros((k, classes), np.int64)
                np.add.at(counts, (flat, lab.ravel()), 1)
                if ignore is not None and ignore < classes:
                    counts[:, ignore] = 0
                major = counts.argmax(axis=1).astype(np.int32)
                major[counts.sum(axis=1) == 0] = -1
                arrays["label"] = major
            writer.add(Item(key, arrays, {"source": str(small.resolve())}))
    return root
