"""List and read images, with clear errors for bad files.

:func:`read_image` reads photos as RGB uint8; :func:`read_edge_png` reads edge-probability maps
(from any detector) as float32 in [0, 1]; :func:`read_label_png` and :func:`read_png` read
single-channel PNGs (label maps, boundary maps) as stored.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import BadImageError, InputError
from ..log import get_logger

log = get_logger("images")

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".gif"}
)
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})
# Images above this many pixels are refused by PIL's bomb check; we allow large photos
# (stages tile or refuse them explicitly) but keep a guard against absurd headers.
MAX_PIXELS = 40_000 * 40_000
# The default limit of the stages that decode photos: PIL's own warning level (~89 Mpx, a
# 9459 x 9459 image). Checked on the header, before anything is decoded.
DEFAULT_MAX_PIXELS = 89_478_485
# PIL modes numpy cannot take directly (palette, CMYK, ...): converted to RGB(A) first.
_CONVERT_MODES = frozenset({"P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"})


# Files that mark a folder as written by this tool (a store, transfer labels, a gallery): a folder
# holding one is never read as input, nor is anything below it.
OUTPUT_MARKERS = ("store.json", "transfer.json", "gallery.json", ".segsort-output.json")  # the last: io.outdir folders
# Folders the running command or pipeline writes (see :func:`excluding_outputs`).
_WRITING: list[Path] = []


@contextlib.contextmanager
def excluding_outputs(*paths: str | os.PathLike | None) -> Iterator[None]:
    """While inside, :func:`list_images` never lists these folders (what this run writes).

    An input folder that contains an output folder is read without it, so a run whose output lies
    inside its input does not eat its own pictures; an input that *is* one of them, or lies inside
    one, is refused.
    """
    added = [Path(os.path.abspath(os.path.expanduser(os.fspath(p)))) for p in paths if p]
    _WRITING.extend(added)
    try:
        yield
    finally:
        for path in added:
            _WRITING.remove(path)


def _written_here(path: Path) -> bool:
    absolute = Path(os.path.abspath(path))
    return any(absolute == out or out in absolute.parents for out in _WRITING)


def _refuse_output_as_input(text: str, path: Path) -> None:
    if _written_here(path):
        raise InputError(f"{text}: is (or lies inside) this run's output folder; give an input folder the run "
                         "does not write to (an output *inside* the input is fine: it is skipped)")


def _under_tool_output(path: Path, root: Path) -> bool:
    """Whether a folder between ``root`` (excluded) and ``path`` holds an output marker."""
    folder = path.parent
    while folder != root and folder != folder.parent:
        if any((folder / marker).is_file() for marker in OUTPUT_MARKERS):
            return True
        folder = folder.parent
    return False


def _folder_images(root: Path) -> list[Path]:
    """The images under ``root``, skipping hidden names, this run's outputs and folders the tool wrote."""
    found: list[Path] = []
    hidden = 0
    outputs: list[str] = []
    visited: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        here = Path(folder)
        real = os.path.realpath(folder)
        if real in visited:  # a symlink back up the tree
            dirs.clear()
            continue
        visited.add(real)
        if here != root and (_written_here(here) or any(m in files for m in OUTPUT_MARKERS)):
            outputs.append(str(here))
            dirs.clear()
            continue
        hidden += sum(name.startswith(".") for name in dirs)
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in files:
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if name.startswith("."):
                hidden += 1
            else:
                found.append(here / name)
    if hidden:
        log.info("%s: %d hidden file(s) or folder(s) (names starting with '.') skipped", root, hidden)
    if outputs:
        log.info("%s: %d output folder(s) of segsort-unsup skipped (%s)", root, len(outputs),
                 ", ".join(sorted(outputs)[:3]) + (", ..." if len(outputs) > 3 else ""))
    return found


@dataclass(frozen=True, order=True)
class ImageRef:
    """One input image: a stable ``key`` (used in stores) and its ``path``."""

    key: str
    path: Path


def _key_for(path: Path, root: Path) -> str:
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        rel = Path(path.name)
    return rel.with_suffix("").as_posix()


def _unique(refs: list[ImageRef], source: str) -> list[ImageRef]:
    seen: dict[str, Path] = {}
    for ref in refs:
        if ref.key in seen and seen[ref.key] != ref.path:
            raise InputError(
                f"{source}: two inputs map to the same key {ref.key!r} ({seen[ref.key]} and {ref.path}); "
                "rename one (keys are paths without extension)"
            )
        seen[ref.key] = ref.path
    return sorted({r.key: r for r in refs}.values())


def list_images(source: str | os.PathLike) -> list[ImageRef]:
    """Images named by ``source``: a folder (recursive), a glob, a list file, or one image.

    Keys are paths relative to the folder (or the glob's fixed prefix, or the list file's
    folder) without extension, so ``a/b.jpg`` and ``a/b.png`` would collide and are refused.
    A list file (``.txt``/``.lst``) holds one path per line, relative to the list file;
    blank lines and lines starting with ``#`` are skipped. Missing files listed there are
    kept, so that reading them fails per image with a clear reason.

    A folder or glob never yields hidden files (names starting with ``.``; their count is logged)
    nor anything under this run's output folders (:func:`excluding_outputs`) or under a folder
    the tool wrote (one holding a store, transfer or gallery manifest).
    """
    text = os.fspath(source)
    path = Path(text)
    if path.is_dir():
        _refuse_output_as_input(text, path)
        refs = [ImageRef(_key_for(p, path), p) for p in _folder_images(path)]
        if not refs:
            raise InputError(f"{text}: folder holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        return _unique(refs, text)
    if path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
        base = path.parent
        refs = []
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line)
            full = p if p.is_absolute() else base / p
            refs.append(ImageRef(_key_for(full, base), full))
        if not refs:
            raise InputError(f"{text}: list file names no images")
        return _unique(refs, text)
    if path.is_file():
        return [ImageRef(path.stem, path)]
    if _glob.has_magic(text):
        matches = [Path(m) for m in sorted(_glob.glob(text, recursive=True))]
        fixed = []
        for part in Path(text).parts:
            if _glob.has_magic(part):
                break
            fixed.append(part)
        root = Path(*fixed) if fixed else Path(".")
        matches = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_EXTENSIONS
                   and not _written_here(m) and not _under_tool_output(m, root)]
        if not matches:
            raise InputError(f"{text}: glob matches no images")
        return _unique([ImageRef(_key_for(m, root), m) for m in matches], text)
    raise InputError(f"{text}: no such folder, image, list file or glob")


def resized_size(width: int, height: int, resize_to: int | None) -> tuple[int, int]:
    """``(width, height)`` after scaling the longer side down to ``resize_to`` (never up)."""
    longer = max(width, height)
    if resize_to is None or longer <= resize_to:
        return width, height
    scale = resize_to / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def check_image_size(path: str | os.PathLike, width: int, height: int, *, max_pixels: int | None,
                     resize_to: int | None = None) -> None:
    """Refuse an image of ``width x height`` whose processed size is above ``max_pixels``.

    The processed size is the size after ``resize_to``; ``max_pixels`` ``None`` or 0 means no limit.
    The error names the file, its size, the limit and the two options that get it processed.
    """
    if not max_pixels:
        return
    w, h = resized_size(width, height, resize_to)
    if w * h <= max_pixels:
        return
    side = max(1, int(max(w, h) * (max_pixels / (w * h)) ** 0.5))
    raise BadImageError(path, f"{width}x{height} pixels ({width * height / 1e6:.1f} Mpx"
                              + (f", {w}x{h} after --resize-to {resize_to}" if (w, h) != (width, height) else "")
                              + f") is above the limit of {max_pixels / 1e6:.1f} Mpx; use --max-pixels {w * h} to "
                              f"process it (needs about {1 + 8 * w * h / 2**30:.0f} GiB of memory) or "
                              f"--resize-to {side} to process it smaller")


@contextlib.contextmanager
def _pil_errors(path: Path, doing: str, *, truncated_hint: bool = False) -> Iterator[None]:
    """PIL's ways of failing on a bad file, as one :class:`BadImageError` naming ``path``."""
    try:
        yield
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file (format not recognised)") from None
    except Image.DecompressionBombError as exc:
        raise BadImageError(path, f"image too large to read ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        if truncated_hint and "truncated" in reason.lower():
            reason = "truncated image file (incomplete download or copy?)"
        raise BadImageError(path, f"{doing}: {reason}") from None


def _existing_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path, or BadImageError for a missing or empty file (and PIL's bomb guard set)."""
    path = Path(path)
    if not path.exists():
        raise BadImageError(path, "file not found")
    if path.stat().st_size == 0:
        raise BadImageError(path, "empty file")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    return path


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header alone (nothing is decoded).

    Raises :class:`BadImageError` for missing, empty, unrecognised files and absurd headers.
    EXIF orientation may swap the two; the pixel count is the same.
    """
    path = _existing_file(path)
    with _pil_errors(path, "cannot read image header"), Image.open(path) as im:  # reads the header only
        return im.size


def read_image(path: str | os.PathLike, *, max_pixels: int | None = None,
               resize_to: int | None = None) -> np.ndarray:
    """Read an image as an ``(H, W, 3)`` uint8 RGB array.

    Grayscale is replicated to three channels, alpha is dropped (composited on white),
    16-bit and float images are scaled to 0..255, and EXIF orientation is applied.
    ``resize_to`` scales images whose longer side is above it down to that side (Lanczos).
    ``max_pixels`` (``None``/0: no limit) refuses images whose (resized) size is above it, from
    the header, before decoding: see :func:`check_image_size`.
    Raises :class:`BadImageError` naming the file and the reason for anything unreadable,
    truncated, empty, too large or absurdly large.
    """
    path = _existing_file(path)
    with _pil_errors(path, "cannot decode image", truncated_hint=True), Image.open(path) as im:
        check_image_size(path, *im.size, max_pixels=max_pixels, resize_to=resize_to)  # header only so far
        size = resized_size(*im.size, resize_to)
        if size != im.size:
            im.draft(im.mode, size)  # JPEG: decode at a reduced scale already (no-op elsewhere)
        im.load()  # forces a full decode: truncated files raise here
        ImageOps.exif_transpose(im, in_place=True)  # no copy when there is nothing to turn
        if im.mode in _CONVERT_MODES:
            keep_alpha = im.mode == "PA" or "transparency" in im.info
            im = im.convert("RGBA" if keep_alpha else "RGB")
        if resize_to is not None and max(im.size) > resize_to:
            im = _resize(im, resized_size(*im.size, resize_to))
        pixels = _pixels(im)
        del im
    return _to_rgb8(pixels, path)


STRIP_BYTES = 1 << 22  # large images are copied out of PIL this many bytes of rows at a time


def _pixels(im: Image.Image) -> np.ndarray:
    """``np.asarray(im)``, built strip by strip for large images: ``np.asarray`` goes through
    ``tobytes``, which holds the whole image twice more while it joins its chunks (a 150 Mpx RGB
    photo then peaked at 14 bytes per pixel, decoded image included; this keeps it at 7)."""
    w, h = im.size
    if w * h * 4 <= 8 * STRIP_BYTES:
        return np.asarray(im)
    first = np.asarray(im.crop((0, 0, w, 1)))
    out = np.empty((h,) + first.shape[1:], first.dtype)
    rows = max(1, STRIP_BYTES // max(1, first.nbytes))
    for y in range(0, h, rows):
        out[y : y + rows] = np.asarray(im.crop((0, y, w, min(h, y + rows))))
    return out


def _resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Lanczos downscale; modes PIL cannot resample (16-bit...) go through 32-bit first."""
    try:
        return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    except ValueError:
        return im.convert("I" if im.mode.startswith("I") else "F" if im.mode == "F" else "RGBA").resize(
            size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _to_rgb8(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.size == 0:
        raise BadImageError(path, "image has no pixels")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise BadImageError(path, f"unsupported image shape {arr.shape}")
    arr = _scale_to_uint8(arr, path)
    channels = arr.shape[2]
    if channels in (2, 4):  # grey+alpha or RGBA: composite on white
        alpha = arr[..., -1:].astype(np.float32) / 255.0
        color = arr[..., :-1].astype(np.float32)
        arr = np.clip(color * alpha + 255.0 * (1.0 - alpha) + 0.5, 0, 255).astype(np.uint8)
        channels -= 1
    if channels == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def _scale_to_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16 or (arr.dtype.kind in "iu" and arr.max(initial=0) > 255):
        top = 65535.0 if arr.max(initial=0) > 255 or arr.dtype == np.uint16 else 255.0
        return np.clip(arr.astype(np.float64) * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
    if arr.dtype.kind in "iu":
        return np.clip(arr, 0, 255).astype(np.uint8)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise BadImageError(path, "float image holds NaN or inf values")
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        return np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
    raise BadImageError(path, f"unsupported pixel type {arr.dtype}")


# -- edge maps and single-channel PNGs -------------------------------------------------------------
# An edge-probability map is mostly background: measured on BSDS500 test images, at most 37% of
# a HED map's pixels and 30% of a PiDiNet map's are above 0.5. A map with more than this share
# above 0.5 is a photo or an inverted map (white background), not an edge probability.
EDGE_MAX_HIGH_FRACTION = 0.5
_COLOUR_PHOTO = "looks like a colour photo, not an edge map: run `segsort-unsup contours` on it first"


def read_edge_png(path: str | os.PathLike) -> np.ndarray:
    """An edge-probability image as float32 ``(H, W)`` in [0, 1] (PNG, or any format PIL reads).

    Accepted: grey (8-bit / 255, 16-bit / 65535, 1-bit), grey + alpha (alpha ignored), and RGB(A)
    whose colour channels are all equal (an edge map saved as RGB); float images are taken as
    they are (negative values clipped to 0). Refused with :class:`BadImageError`: unreadable or
    empty files, colour images (a photo given where an edge map is expected), and maps with more
    than half their pixels above 0.5 (a grey photo, or an inverted map), which no edge detector
    produces.
    """
    path = Path(path)
    if not path.exists():
        raise BadImageError(path, "file not found")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    with _pil_errors(path, "cannot decode edge map"), Image.open(path) as im:
        im.load()
        if im.mode in _CONVERT_MODES - {"1"}:  # palette, CMYK...: to RGB(A) first
            im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
        arr = np.asarray(im)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise BadImageError(path, _COLOUR_PHOTO)
        arr = arr[..., 0]
    elif arr.ndim == 3 and arr.shape[2] == 2:  # grey + alpha
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.size == 0:
        raise BadImageError(path, f"unsupported edge map shape {arr.shape}")
    edge = _edge_values(arr, path)
    high = float(np.count_nonzero(edge > 0.5)) / edge.size
    if high > EDGE_MAX_HIGH_FRACTION:
        raise BadImageError(path, f"does not look like an edge map: {high:.0%} of its pixels are above 0.5 "
                                  "(a photo, or an inverted map with a white background?); edge maps are "
                                  "mostly dark background, run `segsort-unsup contours` on a photo first")
    return edge


def _edge_values(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise BadImageError(path, "edge map holds NaN or inf values")
        return np.clip(arr.astype(np.float32), 0, None)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    if arr.dtype.kind in "iu" and arr.min(initial=0) >= 0 and arr.max(initial=0) <= 65535:
        return arr.astype(np.float32) / np.float32(65535.0)  # 16-bit (PIL's I;16 or I modes)
    raise BadImageError(path, f"unsupported edge map pixel type {arr.dtype}")


def read_png(path: str | os.PathLike) -> np.ndarray:
    """A grey PNG as float in [0, 1] (8-bit / 255, 16-bit / 65535)."""
    arr = read_label_png(path)
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0
    return arr.astype(np.float64) / scale


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """A single-channel PNG's raw values (uint8 / uint16); BadImageError if unreadable or RGB."""
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(im)
    except Exception as exc:  # noqa: BLE001
        raise BadImageError(path, f"cannot read PNG: {exc}") from None
    if arr.ndim == 3:
        if arr.shape[2] in (3, 4) and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]):
            arr = arr[..., 0]
        else:
            raise BadImageError(path, f"expected a single-channel PNG, got {arr.shape[2]} channels")
    if arr.dtype == np.int32:  # PIL 'I' mode for 16-bit greys
        arr = arr.astype(np.uint16)
    if arr.dtype not in (np.uint8, np.uint16, np.bool_):
        raise BadImageError(path, f"unsupported PNG pixel type {arr.dtype}")
    return arr.astype(np.uint8) if arr.dtype == np.bool_ else arr


def image_id(key: str) -> str:
    """The id an item is matched by: the last part of a key or the stem of a file name."""
    last = key.replace("\\", "/").rstrip("/").split("/")[-1]
    return Path(last).stem if "." in last else last
