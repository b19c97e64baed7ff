"""PiDiNet (Su et al., "Pixel Difference Networks for Efficient Edge Detection", ICCV 2021), inference only.

The authors train with *pixel-difference convolutions* (PDC): a 3x3 kernel applied to differences of
pixels rather than to the pixels themselves. Each PDC is linear in its input, so it equals an ordinary
convolution with a rearranged kernel. This module does that rearrangement once, when the weights are
loaded, so inference is nothing but plain convolutions (fast with oneDNN, bf16 autocast, channels_last):

- ``cv`` (vanilla): unchanged.
- ``cd`` (central difference), ``y = sum_i w_i (x_i - x_c)``: subtract the kernel sum from the centre tap.
- ``ad`` (angular difference), ``y = sum_i w_i (x_i - x_next(i))`` around the 3x3 ring (clockwise):
  ``W' = W - W[..., perm]`` on the flattened kernel, ``perm = [3, 0, 1, 6, 4, 2, 7, 8, 5]``.
- ``rd`` (radial difference), ``y = sum_m w_m (x_outer(m) - x_inner(m))`` over the 8 rays of a 5x5
  window: a 5x5 kernel (padding 2) with the weights on the outer ring and their negatives on the inner one.

Architecture (as in the authors' release, config ``carv4``; layer 0 is ``init_block``, layers 1-15 the
blocks ``block1_1`` .. ``block4_4`` in order, with ops ``cd, ad, rd, cv`` repeated four times):
an initial 3x3 PDC to C channels; four stages of 3, 4, 4 and 4 residual blocks at C, 2C, 4C, 4C channels
(block = depthwise 3x3 PDC, ReLU, 1x1 conv, plus the input; the first block of stages 2-4 max-pools by 2
and takes a 1x1 shortcut with bias). Each stage's output goes through CDCM (ReLU, 1x1 to ``dil``
channels, the sum of four 3x3 convs dilated 5, 7, 9, 11) and CSAM (``x * sigmoid(conv3x3(conv1x1(relu x)))``)
when the weights have them (the "-l" variants have neither), then a 1x1 conv to one channel; the four
side maps are upsampled bilinearly to the input size and fused by a 1x1 conv; sigmoid.

Input contract (shared by every contour network here): RGB float 0..255, ``(N, 3, H, W)``; the /255 and
the ImageNet mean/std normalisation happen inside ``forward``. Output: fused edge probability
``(N, 1, H, W)``, float32, at exactly the input size (odd sizes included).

The loaded weights come from the authors' ``trained_models/table5_*.pth`` (MIT; see
``shared/weights/PROVENANCE.md``): ``{'epoch', 'state_dict'}`` with a ``module.`` prefix on every key.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import WeightsError

if TYPE_CHECKING:  # pragma: no cover
    from .registry import ContourModel

__all__ = [
    "PDC_CONFIGS",
    "PiDiNet",
    "PidinetSpec",
    "load_pidinet_state_dict",
    "pdc_to_conv_kernel",
    "pidinet_from_file",
    "pidinet_from_state_dict",
]

#: PDC op of each of the 16 layers (``init_block`` then the 15 blocks) per upstream config name.
PDC_CONFIGS: dict[str, tuple[str, ...]] = {
    "carv4": ("cd", "ad", "rd", "cv") * 4,
    "baseline": ("cv",) * 16,
}

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

# Angular difference: flattened-3x3 index each tap is paired with (tap i sees w_i - w_perm[i]).
_AD_PERM = [3, 0, 1, 6, 4, 2, 7, 8, 5]
# Radial difference: where the 8 weights W.flat[1:] land in the 5x5 kernel (outer ring, inner ring).
_RD_OUTER = [0, 2, 4, 10, 14, 20, 22, 24]
_RD_INNER = [6, 7, 8, 11, 13, 16, 17, 18]

# Published variants (channels, dil) -> registry name; "-l" = without CDCM/CSAM.
_KNOWN = {(60, 24): "pidinet", (30, 12): "pidinet-small", (20, 8): "pidinet-tiny"}
_KNOWN_L = {60: "pidinet-l", 30: "pidinet-small-l", 20: "pidinet-tiny-l"}

_STAGE_BLOCKS = (3, 4, 4, 4)
_STAGE_WIDTH = (1, 2, 4, 4)  # multiples of C
_CDCM_DILATIONS = (5, 7, 9, 11)
_CSAM_MID = 4


@dataclass(frozen=True)
class PidinetSpec:
    """Shape of one PiDiNet: PDC config, base width C, CDCM width (None: no CDCM) and CSAM on/off.

    Its ``variant`` string is what the registry stores, e.g. ``"carv4-c60-dil24-sa"`` (pidinet) or
    ``"carv4-c30"`` (pidinet-small-l).
    """

    config: str = "carv4"
    channels: int = 60
    dil: int | None = 24
    sa: bool = True

    _PATTERN = re.compile(r"^(?P<config>[a-z0-9]+)-c(?P<c>\d+)(?:-dil(?P<dil>\d+))?(?P<sa>-sa)?$")

    @classmethod
    def parse(cls, variant: str) -> PidinetSpec:
        """Parse a registry variant string like ``"carv4-c60-dil24-sa"``."""
        m = cls._PATTERN.match(variant)
        if not m or m["config"] not in PDC_CONFIGS:
            raise ValueError(
                f"bad PiDiNet variant {variant!r}: expected '<config>-c<C>[-dil<D>][-sa]' "
                f"with config in {sorted(PDC_CONFIGS)}, e.g. 'carv4-c60-dil24-sa'"
            )
        return cls(m["config"], int(m["c"]), int(m["dil"]) if m["dil"] else None, bool(m["sa"]))

    @property
    def variant(self) -> str:
        return f"{self.config}-c{self.channels}" + (f"-dil{self.dil}" if self.dil else "") + ("-sa" if self.sa else "")

    @property
    def ops(self) -> tuple[str, ...]:
        return PDC_CONFIGS[self.config]

    def describe(self) -> str:
        """Human name, e.g. ``"pidinet-small (C=30, dil=12, CSAM)"``."""
        if self.dil and self.sa:
            name = _KNOWN.get((self.channels, self.dil), "PiDiNet")
        elif not self.dil and not self.sa:
            name = _KNOWN_L.get(self.channels, "PiDiNet")
        else:
            name = "PiDiNet"
        parts = [f"C={self.channels}"]
        parts += [f"dil={self.dil}"] if self.dil else ["no CDCM"]
        parts += ["CSAM"] if self.sa else ["no CSAM"]
        return f"{name} ({', '.join(parts)})"

    def blocks(self) -> Iterator[tuple[str, int, int, int]]:
        """``(name, in_channels, out_channels, stride)`` of the 15 blocks, in layer order."""
        cin = self.channels
        for stage, (n, width) in enumerate(zip(_STAGE_BLOCKS, _STAGE_WIDTH), start=1):
            cout = width * self.channels
            for i in range(1, n + 1):
                stride = 2 if (i == 1 and stage > 1) else 1
                yield f"block{stage}_{i}", cin, cout, stride
                cin = cout

    def stage_channels(self) -> tuple[int, ...]:
        return tuple(w * self.channels for w in _STAGE_WIDTH)

    def upstream_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the authors' state dict (``module.`` stripped) with its shape."""
        c = self.channels
        shapes: dict[str, tuple[int, ...]] = {"init_block.weight": (c, 3, 3, 3)}
        for name, cin, cout, stride in self.blocks():
            if stride > 1:
                shapes[f"{name}.shortcut.weight"] = (cout, cin, 1, 1)
                shapes[f"{name}.shortcut.bias"] = (cout,)
            shapes[f"{name}.conv1.weight"] = (cin, 1, 3, 3)
            shapes[f"{name}.conv2.weight"] = (cout, cin, 1, 1)
        for i, ch in enumerate(self.stage_channels()):
            if self.dil:
                shapes[f"dilations.{i}.conv1.weight"] = (self.dil, ch, 1, 1)
                shapes[f"dilations.{i}.conv1.bias"] = (self.dil,)
                for j in range(1, len(_CDCM_DILATIONS) + 1):
                    shapes[f"dilations.{i}.conv2_{j}.weight"] = (self.dil, self.dil, 3, 3)
                ch = self.dil
            if self.sa:
                shapes[f"attentions.{i}.conv1.weight"] = (_CSAM_MID, ch, 1, 1)
                shapes[f"attentions.{i}.conv1.bias"] = (_CSAM_MID,)
                shapes[f"attentions.{i}.conv2.weight"] = (1, _CSAM_MID, 3, 3)
            shapes[f"conv_reduces.{i}.conv.weight"] = (1, ch, 1, 1)
            shapes[f"conv_reduces.{i}.conv.bias"] = (1,)
        shapes["classifier.weight"] = (1, 4, 1, 1)
        shapes["classifier.bias"] = (1,)
        return shapes


def pdc_to_conv_kernel(op: str, weight: Tensor) -> Tensor:
    """The plain-conv kernel equal to pixel-difference conv ``op`` with 3x3 kernel ``weight`` (O, I, 3, 3).

    Returns a 3x3 kernel (padding 1) for ``cv``/``cd``/``ad`` and a 5x5 kernel (padding 2) for ``rd``.
    Computed in float64 and returned in ``weight``'s dtype.
    """
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"a PDC kernel must be (O, I, 3, 3), got {tuple(weight.shape)}")
    w = weight.detach().double()
    if op == "cv":
        k = w.clone()
    elif op == "cd":
        k = w.clone()
        k[:, :, 1, 1] -= w.sum(dim=(2, 3))
    elif op == "ad":
        flat = w.flatten(2)
        k = (flat - flat[:, :, _AD_PERM]).view_as(w)
    elif op == "rd":
        flat = w.flatten(2)
        k5 = w.new_zeros(w.shape[0], w.shape[1], 25)
        k5[:, :, _RD_OUTER] = flat[:, :, 1:]
        k5[:, :, _RD_INNER] = -flat[:, :, 1:]
        k = k5.view(w.shape[0], w.shape[1], 5, 5)
    else:
        raise ValueError(f"unknown pixel-difference op {op!r}: expected one of cv, cd, ad, rd")
    return k.to(weight.dtype).contiguous()


def _kernel_size(op: str) -> int:
    return 5 if op == "rd" else 3


class _Block(nn.Module):
    """Residual block: [maxpool 2] -> depthwise conv (converted PDC) -> ReLU -> 1x1, plus [1x1 shortcut of] input."""

    def __init__(self, op: str, cin: int, cout: int, stride: int):
        super().__init__()
        k = _kernel_size(op)
        self.downsample = stride > 1
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2) if self.downsample else nn.Identity()
        self.shortcut = nn.Conv2d(cin, cout, 1) if self.downsample else nn.Identity()
        self.conv1 = nn.Conv2d(cin, cin, k, padding=k // 2, groups=cin, bias=False)
        self.conv2 = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x)  # floors odd sizes, as upstream
        y = self.conv2(F.relu(self.conv1(x), inplace=True))
        return y.add_(self.shortcut(x))  # y is a fresh tensor: add in place, saving a full-size buffer


class _CDCM(nn.Module):
    """Compact dilation convolution module: ReLU, 1x1 (bias), sum of four dilated 3x3 convs."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 1)
        for j, d in enumerate(_CDCM_DILATIONS, start=1):
            self.add_module(f"conv2_{j}", nn.Conv2d(cout, cout, 3, padding=d, dilation=d, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(F.relu(x))
        return self.conv2_1(x).add_(self.conv2_2(x)).add_(self.conv2_3(x)).add_(self.conv2_4(x))


class _CSAM(nn.Module):
    """Compact spatial attention module: ``x * sigmoid(conv3x3(conv1x1(relu(x))))``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, _CSAM_MID, 1)
        self.conv2 = nn.Conv2d(_CSAM_MID, 1, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(F.relu(x))))


class _Reduce(nn.Module):
    """1x1 conv to the single-channel side map (upstream name ``conv_reduces.{i}.conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class PiDiNet(nn.Module):
    """PiDiNet with plain convolutions (pixel differences already folded into the kernels).

    Build it with :func:`pidinet_from_file` or :func:`pidinet_from_state_dict`; the module's own
    ``state_dict`` holds the *converted* kernels (``rd`` layers are 5x5) under the upstream names.
    """

    def __init__(self, spec: PidinetSpec):
        super().__init__()
        self.spec = spec
        ops = spec.ops
        k0 = _kernel_size(ops[0])
        self.init_block = nn.Conv2d(3, spec.channels, k0, padding=k0 // 2, bias=False)
        for (name, cin, cout, stride), op in zip(spec.blocks(), ops[1:]):
            self.add_module(name, _Block(op, cin, cout, stride))
        self._stages = [[f"block{s}_{i}" for i in range(1, n + 1)] for s, n in enumerate(_STAGE_BLOCKS, start=1)]
        side = list(spec.stage_channels())
        if spec.dil:
            self.dilations = nn.ModuleList(_CDCM(ch, spec.dil) for ch in side)
            side = [spec.dil] * 4
        if spec.sa:
            self.attentions = nn.ModuleList(_CSAM(ch) for ch in side)
        self.conv_reduces = nn.ModuleList(_Reduce(ch) for ch in side)
        self.classifier = nn.Conv2d(4, 1, 1)
        mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
        # x / 255 then (x - mean) / std, as one multiply-add
        self.register_buffer("_in_scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("_in_shift", -mean / std, persistent=False)

    def _side_logits(self, x: Tensor) -> list[Tensor]:
        """Five logit maps at input size, float32: the four side outputs, then the fused one."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"PiDiNet expects RGB input (N, 3, H, W), got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        device = x.device.type
        if self.init_block.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # an NCHW input would drag every layer to NCHW
        # The first layer is a central-difference conv on raw pixels: sum_i w_i (x_i - x_c) cancels
        # heavily, and in bf16 it alone moves the output by up to ~0.15. It is cheap (3 input
        # channels), so it always runs in the weights' precision; the rest follows autocast.
        with torch.autocast(device_type=device, enabled=False):
            dtype = self.init_block.weight.dtype
            x = x.to(dtype) * self._in_scale.to(dtype) + self._in_shift.to(dtype)
            x = self.init_block(x)
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))
        feats = []
        for names in self._stages:
            for name in names:
                x = getattr(self, name)(x)
            feats.append(x)
        sides = []
        for i, f in enumerate(feats):
            if self.spec.dil:
                f = self.dilations[i](f)
            if self.spec.sa:
                f = self.attentions[i](f)
            e = self.conv_reduces[i](f).float()
            if e.shape[-2:] != (height, width):
                e = F.interpolate(e, size=(height, width), mode="bilinear", align_corners=False)
            sides.append(e)
        # The fusion is 4 -> 1 channel: keep it in float32 even under autocast.
        with torch.autocast(device_type=x.device.type, enabled=False):
            fused = F.conv2d(torch.cat(sides, dim=1), self.classifier.weight.float(), self.classifier.bias.float())
        return [*sides, fused]

    def forward(self, x: Tensor) -> Tensor:
        """Fused edge probability ``(N, 1, H, W)`` (float32) for RGB 0..255 input ``(N, 3, H, W)``."""
        return torch.sigmoid(self._side_logits(x)[-1])


# --------------------------------------------------------------------------------------- loading


def _sniff(path: Path) -> str | None:
    """A reason when the first bytes show the file is plainly not a torch checkpoint."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if not head:
        return "the file is empty; download it again"
    if head.startswith(b"version https://git-lfs"):
        return "this is a Git LFS pointer, not the weights; download the real file (git lfs pull, or the raw URL)"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<?xml", b"<")):
        return "this is a web page (HTML), not weights: the download saved an error or login page; download it again"
    if head.startswith(b"\x89HDF"):
        return "this is an HDF5 file (Keras weights?), not a PiDiNet .pth checkpoint"
    return None


def _read_checkpoint(path: Path) -> Mapping[str, Tensor]:
    if not path.exists():
        raise WeightsError(
            path, "weights file not found; fetch it with `segsort-unsup weights fetch --model pidinet` or pass --from PATH"
        )
    if not path.is_file():
        raise WeightsError(path, "is not a file; pass the .pth weights file itself")
    reason = _sniff(path)
    if reason:
        raise WeightsError(path, reason)
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure to parse an untrusted file is "bad weights"
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            path,
            f"cannot read it as a torch checkpoint ({detail}); it is truncated, corrupt or not a PiDiNet .pth: "
            "download it again",
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(path, f"holds a {type(obj).__name__}, not a state dict; expected the authors' table5_*.pth")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(path, f"is not a plain state dict (entries {bad[:3]!r} are not named tensors)")
    return obj


def _strip_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        out[key.removeprefix("module.")] = value
    return out


def _guess_spec(state: Mapping[str, Tensor], config: str = "carv4") -> PidinetSpec | None:
    """The PiDiNet variant the keys and shapes describe, or None when they are not PiDiNet's."""
    init = state.get("init_block.weight")
    if init is None or init.dim() != 4 or tuple(init.shape[1:]) != (3, 3, 3):
        return None
    dil_w = state.get("dilations.0.conv1.weight")
    dil = int(dil_w.shape[0]) if dil_w is not None and dil_w.dim() == 4 else None
    sa = any(k.startswith("attentions.") for k in state)
    return PidinetSpec(config, int(init.shape[0]), dil, sa)


def _check_state(path: Path | str, state: Mapping[str, Tensor], spec: PidinetSpec) -> None:
    """Raise WeightsError naming the mismatch (and what the file looks like) unless ``state`` fits ``spec``."""
    expected = spec.upstream_shapes()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    if not (missing or unexpected or wrong):
        nonfloat = [k for k, v in state.items() if not v.is_floating_point()]
        if nonfloat:
            raise WeightsError(path, f"tensors {nonfloat[:3]} are not floating point; the file is not PiDiNet weights")
        nonfinite = [k for k, v in state.items() if not torch.isfinite(v).all()]
        if nonfinite:
            raise WeightsError(path, f"tensors {nonfinite[:3]} hold NaN/inf; the file is corrupt: download it again")
        return
    guess = _guess_spec(state, spec.config)
    if guess is None:
        sample = ", ".join(list(state)[:4])
        hint = ""
        if any(k.startswith(("netVgg", "moduleVgg", "netScore", "netCombine")) for k in state):
            hint = " It looks like a pytorch-hed HED state dict: use --model hed-original."
        raise WeightsError(
            path,
            f"is not a PiDiNet checkpoint (no init_block.weight of shape (C, 3, 3, 3); first keys: {sample}).{hint}",
        )
    if guess != spec:
        try:
            _check_state(path, state, guess)
            looks = f"it looks like {guess.describe()}, variant {guess.variant!r}"
        except WeightsError:
            looks = f"its shapes do not match any complete PiDiNet (closest: {guess.describe()})"
        raise WeightsError(
            path, f"does not match {spec.describe()}: {looks}; pick the model that matches the file"
        )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"wrong shapes: {'; '.join(wrong[:3])}")
    raise WeightsError(path, f"does not match {spec.describe()}: {', '.join(problems)}; the file is corrupt or modified")


def load_pidinet_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read an authors' PiDiNet ``.pth`` (``weights_only=True``) into a state dict without ``module.``.

    Raises :class:`WeightsError` for a missing, truncated, non-torch or non-PiDiNet file.
    """
    path = Path(path)
    state = _strip_prefix(_read_checkpoint(path))
    if _guess_spec(state) is None:
        _check_state(path, state, PidinetSpec())  # raises with the reason
    return state


def pidinet_from_state_dict(
    state: Mapping[str, Tensor], spec: PidinetSpec | None = None, *, path: str | Path = "<state dict>"
) -> PiDiNet:
    """Build a :class:`PiDiNet` (eval mode, float32, channels_last) from an upstream PDC state dict.

    Every pixel-difference conv is converted to a plain conv. The network is channels_last
    (faster on CPU in fp32 and bf16); ``net.to(memory_format=torch.contiguous_format)`` gives NCHW.

    ``spec`` defaults to the variant the shapes describe (config ``carv4``); ``path`` only names the
    source in error messages.
    """
    state = _strip_prefix(state)
    if spec is None:
        spec = _guess_spec(state)
        if spec is None:
            _check_state(path, state, PidinetSpec())  # raises
            raise AssertionError("unreachable")  # pragma: no cover
    _check_state(path, state, spec)
    converted = {k: v.detach().float() for k, v in state.items()}
    layers = ["init_block"] + [f"{name}.conv1" for name, *_ in spec.blocks()]
    for layer, op in zip(layers, spec.ops):
        converted[f"{layer}.weight"] = pdc_to_conv_kernel(op, converted[f"{layer}.weight"])
    net = PiDiNet(spec)
    net.load_state_dict(converted, strict=True)
    # channels_last by default: with oneDNN its fp32 convs run 2-5x faster here than NCHW ones
    # (depthwise and 1x1 alike), and bf16 autocast needs it anyway. forward() converts inputs to match.
    return net.eval().requires_grad_(False).to(memory_format=torch.channels_last)


def pidinet_from_file(entry: ContourModel, path: Path) -> PiDiNet:
    """Registry ``build`` hook: the PiDiNet of ``entry.variant`` with the weights in ``path``.

    Loads with ``torch.load(weights_only=True, map_location="cpu")``; the sha256 check is the caller's.
    Raises :class:`WeightsError` when the file is unreadable or holds another model or variant.
    """
    try:
        spec = PidinetSpec.parse(entry.variant)
    except ValueError as exc:
        raise WeightsError(path, f"registry entry {entry.name!r}: {exc}") from None
    path = Path(path)
    state = _strip_prefix(_read_checkpoint(path))
    return pidinet_from_state_dict(state, spec, path=path)
