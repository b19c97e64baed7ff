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
    ``model.embed_features(features)``; the CPU-practical mode. Partial: the last N trunk blocks
    and the head train from the maps at the input of the first of them
    (``model.train_blocks(n)``, ``layer = model.cache_layer(n)``, ``model.features_at(layer, rgb)``
    cached once, ``model.forward_from(layer, maps)`` per step; :class:`FromLayer` bundles both).

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
from .backbones import DEFAULT_BACKBONE, build_backbone
from .trunk import Trunk, kaiming_normal_

HEADS = ("conv3", "conv1")
HEAD_LR_MULT = 10.0

DEFAULT_CONFIG: dict[str, Any] = {
    "backbone": DEFAULT_BACKBONE,
    "feature_layer": None,  # the backbone's default (conv4_3 for the VGG16 trunks)
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
        kaiming_normal_(self.hidden.weight, nonlinearity="relu")
        nn.init.zeros_(self.hidden.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.out(F.relu(self.hidden(features)))
        return F.normalize(x.float(), dim=1)


class SegSortNet(nn.Module):
    """RGB float 0..255 ``(N, 3, H, W)`` -> unit-norm pixel embeddings ``(N, D, ceil(H/8), ceil(W/8))``."""

    def __init__(self, backbone: Trunk, *, embedding_dim: int = 32, head: str = "conv3", hidden: int = 256):
        super().__init__()
        if not isinstance(backbone, Trunk):
            raise InputError(f"backbone must be a Trunk (see embed.backbones.build_backbone), "
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

    # -- partial fine-tuning: the trunk's upper blocks and the head on cached maps -------------------
    def cache_layer(self, train_blocks: int | str) -> str:
        """The layer to cache when the last ``train_blocks`` trunk blocks train (0: the feature
        layer itself, the head-only mode; ``"all"``: the image)."""
        return self.backbone.layer_at(self.backbone.train_blocks_index(train_blocks)).name

    def features_at(self, layer: str, rgb: torch.Tensor) -> torch.Tensor:
        """The trunk's map at ``layer`` for RGB 0..255 images (what partial fine-tuning caches)."""
        return self.backbone.features_at(layer, rgb)

    def forward_from(self, layer: str, features: torch.Tensor) -> torch.Tensor:
        """Embeddings from the trunk's map at ``layer``: the trunk's blocks above it, then the head."""
        return self.head(self.backbone.forward_from(layer, features))

    def from_layer(self, layer: str) -> "FromLayer":
        """This model seen from the cached layer ``layer`` (see :class:`FromLayer`)."""
        return FromLayer(self, layer)

    def train_blocks(self, train_blocks: int | str) -> "SegSortNet":
        """Freeze every trunk block below the last ``train_blocks`` (``"all"``: train them all)."""
        self.backbone.freeze(self.backbone.train_blocks_index(train_blocks))
        return self

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
        frozen = self.backbone.frozen_blocks()
        return {
            "backbone": self.backbone.name or DEFAULT_BACKBONE,
            "feature_layer": self.backbone.feature_layer,
            "freeze_blocks": frozen,
            "embedding_dim": self.embedding_dim,
            "head": self._head_kind,
            "hidden": self._hidden,
        }


class FromLayer(nn.Module):
    """A :class:`SegSortNet` from a cached layer: ``forward(maps)`` runs the trunk's blocks above
    ``layer`` and the head (what partial fine-tuning trains, DDP-wrappable); ``features(rgb)`` gives
    the maps at ``layer`` (what its feature pass caches). Shares the model's parameters."""

    def __init__(self, model: SegSortNet, layer: str):
        super().__init__()
        model.backbone.block_index(layer)  # an unknown layer is an error now, not at the first step
        self.model, self.layer = model, layer

    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.model.features_at(self.layer, rgb)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.model.forward_from(self.layer, maps)


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
        Unknown config keys or values (sizes above :data:`SIZE_LIMITS` included).
    """
    model = _build_architecture(config, pretrained=state_dict is None, backbone_weights=backbone_weights)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


# Sizes a config may declare; far above any real head, far below what would exhaust memory.
SIZE_LIMITS = {"embedding_dim": 4096, "hidden": 16384}


def _build_architecture(config: Mapping[str, Any] | None, *, pretrained: bool,
                        backbone_weights: str | os.PathLike | None = None) -> SegSortNet:
    if config is not None and not isinstance(config, Mapping):
        raise InputError(f"model config must be a table of settings, got {type(config).__name__}")
    config = dict(config or {})
    unknown = sorted(map(str, set(config) - set(DEFAULT_CONFIG)))
    if unknown:
        raise InputError(f"unknown model config keys {unknown}; known: {', '.join(DEFAULT_CONFIG)}")
    cfg = {**DEFAULT_CONFIG, **config}
    if isinstance(cfg["freeze_blocks"], bool) or not isinstance(cfg["freeze_blocks"], int):
        raise InputError(f"freeze_blocks must be an integer, got {cfg['freeze_blocks']!r}")
    for key, limit in SIZE_LIMITS.items():
        if isinstance(cfg[key], int) and cfg[key] > limit:
            raise InputError(f"{key} = {cfg[key]} is above the limit {limit}")
    trunk = build_backbone(cfg["backbone"], weights=backbone_weights, feature_layer=cfg["feature_layer"],
                           freeze_blocks=cfg["freeze_blocks"], pretrained=pretrained)
    return SegSortNet(trunk, embedding_dim=cfg["embedding_dim"], head=cfg["head"], hidden=cfg["hidden"])


def check_state_fits_config(config: Mapping[str, Any], state_dict: Mapping[str, Any]) -> None:
    """Check, before anything is allocated, that ``state_dict`` holds exactly the tensors (names
    and shapes) of the architecture ``config`` declares: the architecture is built on the meta
    device (shapes only, no memory). Raises :class:`InputError` naming the first misfit."""
    if not isinstance(state_dict, Mapping):
        raise InputError(f"state_dict must be a table of tensors, got {type(state_dict).__name__}")
    bad = next((k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise InputError(f"state_dict entry {bad!r} is a {type(state_dict[bad]).__name__}, not a tensor")
    with torch.device("meta"):
        expected = _build_architecture(config, pretrained=False).state_dict()
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which it does not use"
        raise InputError(f"the weights do not fit model_config: the file {what} "
                         f"({len(missing)} missing, {len(extra)} unexpected tensors)")
    for key, want in expected.items():
        got = state_dict[key]
        if tuple(got.shape) != tuple(want.shape):
            raise InputError(f"model_config declares {key} of shape {tuple(want.shape)}, the file holds "
                             f"{tuple(got.shape)}")


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


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[SegSortNet, dict[str, Any]]:
    """Rebuild a saved model (``weights_only=True``: the file is never unpickled) on ``device``, and
    its provenance. The file's tensors are read on the host whatever device saved them.

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
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle refused by weights_only, ...
        raise WeightsError(path, f"not a readable segsort-unsup model ({type(exc).__name__}: "
                                 f"{(str(exc).splitlines() or ['empty or unreadable'])[0][:160]})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise WeightsError(path, "not a segsort-unsup model file (expected model.pt written by `segsort-unsup train`)")
    if payload.get("version") != MODEL_VERSION:
        raise WeightsError(path, f"model format version {payload.get('version')} is not supported "
                                 f"(this version reads {MODEL_VERSION})")
    for key, kind in (("model_config", "a table of settings"), ("state_dict", "a table of tensors")):
        if not isinstance(payload.get(key), dict):
            raise WeightsError(path, f"{key} is {type(payload.get(key)).__name__}, expected {kind} "
                                     "(a damaged or foreign model file)")
    try:
        check_state_fits_config(payload["model_config"], payload["state_dict"])  # before allocating
        model = build_model(payload["model_config"], state_dict=payload["state_dict"])
    except (RuntimeError, InputError) as exc:
        raise WeightsError(path, f"model weights do not fit their config: {str(exc).splitlines()[0][:200]}") from None
    model = model.to(device).eval()
    provenance = payload.get("provenance", {})
    if not isinstance(provenance, dict):
        raise WeightsError(path, f"provenance is {type(provenance).__name__}, expected a table")
    return model, dict(provenance)
