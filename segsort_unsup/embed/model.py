"""The SegSort embedding network: a backbone trunk at stride 8 and a small head giving unit-norm
pixel embeddings.

Head
    The reference (``seg_models/models/pspnet.py``) puts, on ResNet-101 at stride 8, a pyramid
    pooling module (four average-pooled branches, 1x1 conv 512 + BN + ReLU each, upsampled and
    concatenated with the features), a 3x3 conv 512 + BN + ReLU, and a biased 1x1 conv to the
    embedding dimension; everything in that ``block5`` scope trains at 10x the learning rate.
    Here the head keeps its last two layers: ``"conv3"`` (default) is a 3x3 conv to ``hidden``
    (256) channels + ReLU, then a 1x1 conv to ``embedding_dim`` (32); ``"conv1"`` uses a 1x1 conv
    instead of the 3x3 (the 512 -> 256 -> 32 head of the design notes). No pyramid pooling (it
    assumes square, fixed-size crops) and no batch norm (the VGG trunk has none, and the
    cached-feature mode trains on small batches). Embeddings are L2-normalised per pixel, in
    float32 also under autocast.

Modes
    Full: ``model(rgb)``. Head-only: compute ``model.features(rgb)`` once with a frozen trunk
    (no grad), cache it, and train ``model.head`` on the cached features through
    ``model.embed_features(features)``; the CPU-practical mode.

Rebuilding
    :meth:`SegSortNet.model_config` is a plain dict; ``build_model(config, state_dict=...)``
    rebuilds the same network from it (``model.pt`` holds both).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .backbones import DEFAULT_BACKBONE, VggTrunk, build_backbone

HEADS = ("conv3", "conv1")
HEAD_LR_MULT = 10.0

DEFAULT_CONFIG: dict[str, Any] = {
    "backbone": DEFAULT_BACKBONE,
    "feature_layer": "conv5_3",
    "freeze_blocks": 0,
    "embedding_dim": 32,
    "head": "conv3",
    "hidden": 256,
}


class EmbeddingHead(nn.Module):
    """Backbone features ``(N, C, h, w)`` -> unit-norm embeddings ``(N, D, h, w)`` (float32)."""

    def __init__(self, in_channels: int, *, embedding_dim: int = 32, head: str = "conv3", hidden: int = 256):
        super().__init__()
        if head not in HEADS:
            raise InputError(f"head {head!r} is not one of {', '.join(HEADS)}")
        for name, value in (("in_channels", in_channels), ("embedding_dim", embedding_dim), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        k = 3 if head == "conv3" else 1
        self.hidden = nn.Conv2d(in_channels, hidden, kernel_size=k, padding=k // 2)
        self.out = nn.Conv2d(hidden, embedding_dim, kernel_size=1)
        nn.init.kaiming_normal_(self.hidden.weight, nonlinearity="relu")
        nn.init.zeros_(self.hidden.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.out(F.relu(self.hidden(features)))
        return F.normalize(x.float(), dim=1)


class SegSortNet(nn.Module):
    """RGB float 0..255 ``(N, 3, H, W)`` -> unit-norm pixel embeddings ``(N, D, ceil(H/8), ceil(W/8))``."""

    def __init__(self, backbone: VggTrunk, *, embedding_dim: int = 32, head: str = "conv3", hidden: int = 256):
        super().__init__()
        if not isinstance(backbone, VggTrunk):
            raise InputError(f"backbone must be a VggTrunk (see embed.backbones.build_backbone), "
                             f"got {type(backbone).__name__}")
        self.backbone = backbone
        self.head = EmbeddingHead(backbone.out_channels, embedding_dim=embedding_dim, head=head, hidden=hidden)
        self.embedding_dim = embedding_dim
        self._head_kind = head
        self._hidden = hidden

    @property
    def stride(self) -> int:
        return self.backbone.stride

    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        """Backbone features that feed the head (what the head-only mode caches)."""
        return self.backbone(rgb)

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Embeddings from (cached) backbone features."""
        if features.ndim != 4 or features.shape[1] != self.backbone.out_channels:
            raise InputError(f"features must be (N, {self.backbone.out_channels}, h, w), "
                             f"got shape {tuple(features.shape)}")
        return self.head(features)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(rgb))

    def freeze_backbone(self, n_blocks: int | None = None) -> "SegSortNet":
        """Freeze the first ``n_blocks`` trunk blocks (all when ``None``): the head-only mode."""
        self.backbone.freeze(self.backbone.n_blocks if n_blocks is None else n_blocks)
        return self

    def param_groups(self, lr: float, *, weight_decay: float = 0.0,
                     head_lr_mult: float = HEAD_LR_MULT) -> list[dict[str, Any]]:
        """Optimizer groups: trainable trunk parameters at ``lr``, the head at ``head_lr_mult * lr``
        (10x, as the reference's ``block5`` scope). Weight decay applies to conv weights only (the
        reference decays variables named ``weights``, not biases). Empty groups are left out."""
        if lr <= 0:
            raise InputError(f"lr must be positive, got {lr}")
        groups = []
        for name, module, group_lr in (("backbone", self.backbone, lr), ("head", self.head, lr * head_lr_mult)):
            weights = [p for n, p in module.named_parameters() if p.requires_grad and n.endswith("weight")]
            biases = [p for n, p in module.named_parameters() if p.requires_grad and not n.endswith("weight")]
            if weights:
                groups.append({"name": f"{name}.weights", "params": weights, "lr": group_lr,
                               "weight_decay": weight_decay})
            if biases:
                groups.append({"name": f"{name}.biases", "params": biases, "lr": group_lr, "weight_decay": 0.0})
        return groups

    def model_config(self) -> dict[str, Any]:
        """Everything :func:`build_model` needs to rebuild this architecture (plain types)."""
        frozen = 0
        for block in self.backbone.blocks:
            if any(p.requires_grad for p in block.parameters()):
                break
            frozen += 1
        return {
            "backbone": self.backbone.name or DEFAULT_BACKBONE,
            "feature_layer": self.backbone.feature_layer,
            "freeze_blocks": frozen,
            "embedding_dim": self.embedding_dim,
            "head": self._head_kind,
            "hidden": self._hidden,
        }


def build_model(config: Mapping[str, Any] | None = None, *, backbone_weights: str | os.PathLike | None = None,
                state_dict: Mapping[str, torch.Tensor] | None = None) -> SegSortNet:
    """A :class:`SegSortNet` from a config dict (keys of :data:`DEFAULT_CONFIG`; missing keys take
    the defaults).

    With ``state_dict`` (a saved model) the architecture is built without pretrained weights and
    the state is loaded strictly. Otherwise the trunk is initialised as its backbone entry says
    (``backbone_weights`` is passed on as its weights file) and the head randomly.

    Raises
    ------
    InputError
        Unknown config keys or values.
    """
    config = dict(config or {})
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise InputError(f"unknown model config keys {unknown}; known: {', '.join(DEFAULT_CONFIG)}")
    cfg = {**DEFAULT_CONFIG, **config}
    if not isinstance(cfg["freeze_blocks"], int):
        raise InputError(f"freeze_blocks must be an integer, got {cfg['freeze_blocks']!r}")
    trunk = build_backbone(cfg["backbone"], weights=backbone_weights, feature_layer=cfg["feature_layer"],
                           freeze_blocks=cfg["freeze_blocks"], pretrained=state_dict is None)
    model = SegSortNet(trunk, embedding_dim=cfg["embedding_dim"], head=cfg["head"], hidden=cfg["hidden"])
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


MODEL_FORMAT = "segsort-unsup-model"
MODEL_VERSION = 1


def save_model(path: str | os.PathLike, model: SegSortNet, *, provenance: Mapping[str, Any] | None = None) -> str:
    """Write ``model.pt`` atomically: weights + the config that rebuilds the network + provenance.

    ``provenance`` holds plain values (the training config and its identity hash, the segments
    store's identity, the package version...). Returns the file's sha256 (what downstream stores record).
    """
    import io

    from .. import __version__
    from ..io.atomic import atomic_write_bytes

    payload = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "model_config": model.model_config(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "provenance": {"package_version": __version__, **dict(provenance or {})},
    }
    buffer = io.BytesIO()  # a file name would go into the archive (and the hash): save to memory first
    torch.save(payload, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    import hashlib

    return hashlib.sha256(data).hexdigest()


def load_model(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> tuple[SegSortNet, dict[str, Any]]:
    """Rebuild a saved model (``weights_only=True``: the file is never unpickled) and its provenance.

    Raises :class:`~segsort_unsup.errors.WeightsError` naming the file for a missing, truncated or
    foreign file.
    """
    from ..errors import WeightsError

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(path, "model file not found (train one with `segsort-unsup train`)")
    if os.path.getsize(path) == 0:
        raise WeightsError(path, "empty file (0 bytes: a copy or save that did not finish); copy or train it again")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle refused by weights_only, ...
        raise WeightsError(path, f"not a readable segsort-unsup model ({type(exc).__name__}: "
                                 f"{(str(exc).splitlines() or ['empty or unreadable'])[0][:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise WeightsError(path, "not a segsort-unsup model file (expected model.pt written by `segsort-unsup train`)")
    if payload.get("version") != MODEL_VERSION:
        raise WeightsError(path, f"model format version {payload.get('version')} is not supported "
                                 f"(this version reads {MODEL_VERSION})")
    try:
        model = build_model(payload["model_config"], state_dict=payload["state_dict"])
    except (KeyError, RuntimeError, InputError) as exc:
        raise WeightsError(path, f"model weights do not fit their config ({exc})") from None
    model.eval()
    return model, dict(payload.get("provenance", {}))
