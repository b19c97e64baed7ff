"""Huge images: the pixel limit (from the header), bounded memory, and stopping within a tile.

The large PNGs are generated here into tmp (a smooth synthetic photo, streamed row strip by row
strip through zlib, so writing one costs neither memory nor much time) and never committed.
"""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segsort_unsup.cli import EXIT_INTERRUPTED, main
from segsort_unsup.errors import BadImageError
from segsort_unsup.io.images import DEFAULT_MAX_PIXELS, image_size, read_image
from segsort_unsup.io.store import StoreReader

REPO = Path(__file__).resolve().parents[2]
HUGE = (12288, 12288)  # 151 Mpx: above the default limit (PIL's warning level, 89.5 Mpx)
GIB = 1 << 30


def _photo_rows(y0: int, y1: int, width: int, channels: int) -> np.ndarray:
    """Rows ``y0..y1`` of a smooth synthetic photo: shading, blocks with straight edges, rings."""
    y = np.arange(y0, y1, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    v = (120 + 50 * np.sin(x / 97.0) * np.cos(y / 131.0) + ((x // 700 + y // 500) % 3) * 25
         + 30 * (np.sin(np.hypot(x - width / 2, y - 3000) / 40.0) > 0.7))
    if channels == 1:
        return np.clip(v, 0, 255).astype(np.uint8)[..., None]
    return np.clip(np.stack([v, v * 0.8 + 30, 255 - v], axis=-1), 0, 255).astype(np.uint8)


def write_png(path: Path, height: int, width: int, *, channels: int = 3, period: int | None = None,
              strip: int = 512) -> Path:
    """A PNG of the synthetic photo, written strip by strip (8-bit grey or RGB, zlib level 1).

    ``period`` repeats the first ``period`` rows (one strip computed once): fast for huge test files.
    """
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(1)
    cached: bytes | None = None
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2 if channels == 3 else 0, 0, 0, 0)))
        step = period or strip
        for y0 in range(0, height, step):
            rows = min(height, y0 + step) - y0
            if cached is None or period is None or rows != step:
                pixels = _photo_rows(y0, y0 + rows, width, channels).reshape(rows, width * channels)
                raw = np.concatenate([np.zeros((rows, 1), np.uint8), pixels], axis=1).tobytes()
                if period is not None and rows == step:
                    cached = raw
            else:
                raw = cached
            data = comp.compress(raw)
            if data:
                f.write(chunk(b"IDAT", data))
        f.write(chunk(b"IDAT", comp.flush()))
        f.write(chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def tiny_weights(pidinet_dir) -> Path:
    return pidinet_dir / "table5_pidinet-tiny.pth"


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """Good and bad images around one 151 Mpx PNG (sorted keys put files on both sides of it)."""
    folder = tmp_path_factory.mktemp("huge") / "in"
    folder.mkdir()
    write_png(folder / "b_huge.png", *HUGE, channels=1, period=512)
    small = _photo_rows(0, 96, 128, 3)
    Image.fromarray(small).save(folder / "a_good.png")
    Image.fromarray(small[:64, :80]).save(folder / "d_good.jpg", quality=90)
    (folder / "c_garbage.jpg").write_bytes(b"not an image at all")
    (folder / "e_empty.png").write_bytes(b"")
    full = (folder / "a_good.png").read_bytes()
    (folder / "f_truncated.png").write_bytes(full[: len(full) // 2])
    Image.fromarray(small[:50, :70, 0]).save(folder / "g_gray.png")
    return folder


def _failed(output: str) -> dict[str, str]:
    """Key -> message of each failed item (printed once, as a warning when it happens)."""
    prefix = "WARNING: contours: "
    lines = [line.split(prefix, 1)[1].strip() for line in output.splitlines() if prefix in line]
    return {line.split(":")[0].strip(): line for line in lines}


def test_limit_is_checked_on_the_header(tmp_path):
    """A 20000 x 20000 PNG header with no pixel data: refused for its size, so nothing was decoded."""
    path = tmp_path / "bomb.png"
    good = tmp_path / "g.png"
    write_png(good, 8, 8, channels=1)
    data = good.read_bytes()
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(
        ">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    path.write_bytes(header + data[33:60])  # a few bytes of a real IDAT: decoding would fail as truncated
    assert image_size(path) == (20000, 20000)
    with pytest.raises(BadImageError) as err:
        read_image(path, max_pixels=DEFAULT_MAX_PIXELS)
    message = str(err.value)
    assert message.startswith(f"{path}: 20000x20000 pixels (400.0 Mpx)")
    assert "limit of 89.5 Mpx" in message and "--max-pixels 400000000" in message
    side = int(20000 * (DEFAULT_MAX_PIXELS / 20000**2) ** 0.5)
    assert f"--resize-to {side}" in message and side * side <= DEFAULT_MAX_PIXELS
    assert "\n" not in message
    with pytest.raises(BadImageError, match="cannot decode"):  # lifted: it is decoded, and is truncated
        read_image(path, max_pixels=0)


def test_resize_to_matches_pil_and_lifts_the_limit(tmp_path):
    path = write_png(tmp_path / "wide.png", 300, 800)
    pil = Image.open(path).convert("RGB").resize((400, 150), Image.Resampling.LANCZOS, reducing_gap=3.0)
    got = read_image(path, resize_to=400)
    assert got.shape == (150, 400, 3) and np.array_equal(got, np.asarray(pil))
    assert read_image(path, resize_to=1000).shape == (300, 800, 3)  # never enlarged
    with pytest.raises(BadImageError, match="240000 pixels|limit"):
        read_image(path, max_pixels=100_000)
    assert read_image(path, max_pixels=100_000, resize_to=400).shape == (150, 400, 3)  # 60000 px after resizing


def test_huge_image_is_one_line_and_the_batch_goes_on(tmp_path, mixed_folder, tiny_weights):
    out = tmp_path / "store"
    start = time.monotonic()
    result = CliRunner().invoke(main, ["contours", str(mixed_folder), "-o", str(out), "--model", "pidinet-tiny",
                                       "--weights", str(tiny_weights), "--workers", "1"])  # the in-process path
    elapsed = time.monotonic() - start
    assert result.exit_code == 1, result.output
    failed = _failed(result.output)
    assert set(failed) == {"b_huge", "c_garbage", "e_empty", "f_truncated"}
    line = failed["b_huge"]
    assert "12288x12288 pixels (151.0 Mpx) is above the limit of 89.5 Mpx" in line
    assert f"--max-pixels {HUGE[0] * HUGE[1]}" in line and "--resize-to 9459" in line
    # one line when it happens (a warning), not repeated in the summary
    mentions = [row for row in result.output.splitlines() if "b_huge" in row]
    assert len(mentions) == 1 and all(line in row for row in mentions)
    assert "Traceback" not in result.output and "4 failed of 7" in result.output
    # header failures are reported at once, before any image is decoded (the truncated file is
    # found by decoding it, so its warning comes after them)
    warnings = [row for row in result.output.splitlines() if "WARNING" in row]
    order = [next(k for k in failed if k in row) for row in warnings]
    assert order[:3] == ["b_huge", "c_garbage", "e_empty"] and order[3] == "f_truncated"
    with StoreReader(out, kind="contours") as store:
        assert set(store.keys()) == {"a_good", "d_good", "g_gray"}
        assert store["a_good"].arrays["edge"].shape == (96, 128)
    assert elapsed < 60  # the 151 Mpx file is never decoded


def test_resize_to_processes_the_huge_image_smaller(tmp_path, mixed_folder, tiny_weights):
    out = tmp_path / "store"
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "b_huge.png").symlink_to(mixed_folder / "b_huge.png")
    result = CliRunner().invoke(main, ["contours", str(folder), "-o", str(out), "--model", "pidinet-tiny",
                                       "--weights", str(tiny_weights), "--resize-to", "1024"])
    assert result.exit_code == 0, result.output
    with StoreReader(out, kind="contours") as store:
        item = store["b_huge"]
        assert item.arrays["edge"].shape == (1024, 1024)
        assert store.meta["settings"]["resize_to"] == 1024


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "segsort_unsup.cli", "-q", "contours", *args]


@pytest.mark.slow
def test_lifted_limit_peak_memory_within_goal(tmp_path, tiny_weights):
    """A tiled 17 Mpx photo in a child process, default settings: peak RSS <= 1 GiB + 8 bytes per pixel.

    The automatic tile side keeps one tile's working memory within its budget (a 2048 x 2048
    tile alone took about 1.1 GiB in PiDiNet-tiny fp32). The 50 and 150 Mpx figures of the
    README were measured by hand (too slow for CI on 2 cores).
    """
    h, w = 4096, 4096  # 16.8 Mpx, 25 tiles of 1120
    folder = tmp_path / "in"
    folder.mkdir()
    write_png(folder / "photo.png", h, w)
    out = tmp_path / "store"
    # A fresh parent whose only child is the CLI: RUSAGE_CHILDREN of this test process would also
    # hold the peaks of every earlier test's subprocesses.
    cli = _cli(str(folder), "-o", str(out), "--model", "pidinet-tiny", "--weights", str(tiny_weights),
               "--max-pixels", "0")
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    proc = subprocess.run([sys.executable, "-c", probe, *cli], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.split("PEAK")[-1].split()[0]) * 1024  # Linux: KiB
    assert peak <= GIB + 8 * h * w, f"peak {peak / GIB:.2f} GiB = 1 GiB + {(peak - GIB) / (h * w):.1f} B/px"
    with StoreReader(out, kind="contours", required=("edge", "orientation")) as store:
        item = store["photo"]
        assert item.arrays["edge"].shape == (h, w) and item.arrays["edge"].dtype == np.float16
        edge = np.asarray(item.arrays["edge"][1700:2000], np.float32)  # across a tile overlap (1728-1984)
        assert 0 < edge.max() <= 1 and np.isfinite(edge).all()


@pytest.mark.slow
def test_sigterm_within_a_tiled_image_stops_fast_and_resumes(tmp_path, tiny_weights):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(_photo_rows(0, 96, 128, 3)).save(folder / "a_small.png")
    write_png(folder / "b_big.png", 3072, 3072)  # 16 tiles of 1024: over 10 s on 2 cores
    Image.fromarray(_photo_rows(0, 64, 64, 3)).save(folder / "c_small.png")
    out = tmp_path / "store"
    cmd = _cli(str(folder), "-o", str(out), "--model", "pidinet-tiny", "--weights", str(tiny_weights),
               "--shard-size", "1", "--max-side", "1024", "--workers", "1")  # one item at a time, in order
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not list(out.glob("part-*.h5")):
            time.sleep(0.05)  # a_small is saved: the run is now inside b_big
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(3)  # well into b_big's tiles (decoded in about a second)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        stopped = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert stopped < 10, f"took {stopped:.1f} s to stop"
    with StoreReader(out, kind="contours") as store:  # opens: nothing half-written
        assert set(store.keys()) == {"a_small"}, "b_big finished before the stop"
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    with StoreReader(out, kind="contours", required=("edge", "orientation")) as store:
        assert set(store.keys()) == {"a_small", "b_big", "c_small"}
        assert store["b_big"].arrays["edge"].shape == (3072, 3072)


@pytest.fixture(scope="module")
def tiny_detector(tiny_weights):
    from segsort_unsup.contours.detect import EdgeDetector

    return EdgeDetector("pidinet-tiny", tiny_weights, device="cpu", precision="fp32", max_side=384)


@pytest.fixture(scope="module")
def small_tiles(tiny_weights):
    """Images above 512 px tiled, in tiles of 352 (smaller than the threshold)."""
    from segsort_unsup.contours.detect import EdgeDetector

    return EdgeDetector("pidinet-tiny", tiny_weights, device="cpu", precision="fp32", max_side=512, tile_side=352)


@pytest.mark.parametrize("which, side", [("tiny_detector", 384), ("small_tiles", 352)])
def test_banded_tiling_equals_full_size_blend(request, which, side):
    """The float16 band blend against the straightforward one: full-size float32 sums of weight x
    probability and of weights, divided at the end (what the detector did before), over tiles of
    the detector's tile side (which may be below the side above which images are tiled)."""
    import torch

    from segsort_unsup.contours.detect import _edge_weights, _tile_spans

    detector = request.getfixturevalue(which)
    assert detector.tile_side == side
    image = _photo_rows(0, 500, 600, 3)
    h, w = image.shape[:2]
    acc = np.zeros((h, w), np.float64)
    norm = np.zeros((h, w), np.float64)
    overlap = detector.tile_overlap
    spans = [(y, x) for y in _tile_spans(h, side, overlap) for x in _tile_spans(w, side, overlap)]
    assert len(spans) == {384: 6, 352: 12}[side]  # 2 x 3 tiles of 384, 3 x 4 of 352
    assert max(max(y1 - y0, x1 - x0) for (y0, y1), (x0, x1) in spans) == side
    for (y0, y1), (x0, x1) in spans:
        wy = _edge_weights(y1 - y0, y0 > 0, y1 < h, detector.tile_overlap, torch.device("cpu")).numpy()
        wx = _edge_weights(x1 - x0, x0 > 0, x1 < w, detector.tile_overlap, torch.device("cpu")).numpy()
        with torch.inference_mode():
            tile = torch.from_numpy(np.ascontiguousarray(image[y0:y1, x0:x1])).permute(2, 0, 1)[None].float()
            prob = detector.network(tile)[0, 0].numpy()
        acc[y0:y1, x0:x1] += prob * np.outer(wy, wx)
        norm[y0:y1, x0:x1] += np.outer(wy, wx)
    expected = np.clip(acc / norm, 0, 1)
    got = detector.detect(image)
    assert got.dtype == np.float16 and got.shape == (h, w)
    assert np.abs(got.astype(np.float64) - expected).max() < 1e-3  # float16 rounding (<= 2^-11 at 1)


def test_tile_side_leaves_untiled_images_alone(small_tiles, tiny_weights):
    """An image at or below max_side runs whole whatever the tile side: bit for bit the network's
    own float32 output, as with the default (automatic) tiles."""
    import torch

    from segsort_unsup.contours.detect import EdgeDetector

    image = _photo_rows(0, 480, 512, 3)
    default = EdgeDetector("pidinet-tiny", tiny_weights, device="cpu", precision="fp32", max_side=512)
    assert default.tile_side == 512 and small_tiles.tile_side == 352
    got = small_tiles.detect(image)
    with torch.inference_mode():
        whole = small_tiles._run_network(torch.from_numpy(image).permute(2, 0, 1)[None].float())[0, 0].numpy()
    assert got.dtype == np.float32 and np.array_equal(got, whole)
    assert np.array_equal(got, default.detect(image))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_auto_tile_side_is_the_largest_within_budget(precision):
    from segsort_unsup.contours.detect import MIN_TILE_SIDE, TILE_ALIGN, TILE_MEMORY_BUDGET, auto_tile_side
    from segsort_unsup.contours.registry import MODELS

    for name, entry in MODELS.items():
        side = auto_tile_side(name, precision)
        per_pixel = entry.tile_bytes[precision]
        assert side % TILE_ALIGN == 0 and side >= MIN_TILE_SIDE, name
        assert per_pixel * side**2 <= TILE_MEMORY_BUDGET < per_pixel * (side + TILE_ALIGN) ** 2, name
    assert auto_tile_side("pidinet", "fp16") == auto_tile_side("pidinet", "bf16")


def test_tile_side_option_is_checked(tmp_path):
    result = CliRunner().invoke(main, ["contours", str(tmp_path), "-o", str(tmp_path / "s"), "--tile-side", "100"])
    assert result.exit_code == 2 and "--tile-side" in result.output
    assert "100 is not in the range x>=320" in result.output


def _load_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tile_memory", REPO / "benchmarks" / "tile_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model", ["hed-bsds500", "pidinet", "pidinet-small", "pidinet-tiny"])
def test_tile_working_memory_within_budget(model, precision, pidinet_dir, hed_h5):
    """One tile of the automatic side, run three times in a fresh process (cut from a uint8
    image, through the network, times the blend weights): its peak resident-memory growth stays
    within the budget the side was chosen for. A model whose activations grow (or whose
    ``tile_bytes`` figure is too low) fails here."""
    from segsort_unsup.contours.detect import TILE_MEMORY_BUDGET, auto_tile_side
    from segsort_unsup.contours.registry import get_model

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")
    entry = get_model(model)
    weights = hed_h5 if entry.arch == "hed" else pidinet_dir / entry.upstream_name
    got = _load_benchmark().measure(model, weights, precision, "auto")
    side = auto_tile_side(model, precision)
    assert got["pixels"] == side * side and got["precision"] == precision
    assert got["bytes"] <= TILE_MEMORY_BUDGET, (
        f"{model} {precision}: a {side} px tile needs {got['bytes'] / 2**20:.0f} MiB "
        f"({got['bytes'] / side**2:.0f} B/px; registry {entry.tile_bytes[precision]})")


def test_stop_request_is_honoured_between_tiles(tiny_detector, monkeypatch):
    from segsort_unsup import parallel

    calls = []
    network = tiny_detector.network

    def counting(x):
        calls.append(x.shape)
        if len(calls) == 2:
            parallel.request_stop()  # what the CLI's SIGTERM handler does
        return network(x)

    monkeypatch.setattr(tiny_detector, "network", counting)
    try:
        with pytest.raises(KeyboardInterrupt):
            tiny_detector.detect(_photo_rows(0, 1200, 1200, 3))  # 4 x 4 tiles of 384
    finally:
        parallel.clear_stop()  # the flag is process-wide: later tests must not see it
    assert len(calls) == 2  # the tile running when the stop came finished; no other started


def test_orientation_in_strips_equals_whole_map(monkeypatch):
    """Strips with halos give exactly the full-map orientation (float32 and float16)."""
    import cv2

    from segsort_unsup import edgemaps

    rng = np.random.default_rng(0)
    edge = cv2.GaussianBlur(rng.random((403, 517), np.float32), (0, 0), 2)
    whole = edgemaps.edge_orientation(edge)
    whole16 = edgemaps.edge_orientation(edge, dtype=np.float16)
    monkeypatch.setattr(edgemaps, "STRIP_PIXELS", 517 * 50)  # strips of 50 rows
    assert np.array_equal(edgemaps.edge_orientation(edge), whole)
    strips16 = edgemaps.edge_orientation(edge, dtype=np.float16)
    assert strips16.dtype == np.float16 and np.array_equal(strips16, whole16)
    assert 0 <= whole16.min() and whole16.astype(np.float32).max() < np.pi
