"""`segsort-unsup contours` and `segsort-unsup weights` through click, plus a real killed run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from segsort_unsup.cli import main
from segsort_unsup.io.store import StoreReader


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGSORT_UNSUP_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def photo(bsds):
    return np.asarray(Image.open(bsds / "images" / "test" / "100039.jpg").convert("RGB"))


def test_bad_input_batch(tmp_path, photo, hed_h5):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.ascontiguousarray(photo[:48, :64])).save(folder / "good.jpg", quality=95)
    (folder / "garbage.jpg").write_bytes(b"\x00\x01 definitely not an image")
    full = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "empty.png").write_bytes(b"")
    Image.fromarray(photo[:40, :50].mean(axis=2).astype(np.uint8)).save(folder / "gray.png")
    rgba = np.dstack([photo[:40, :50], np.full((40, 50), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray((photo[:40, :50, 0].astype(np.uint16) * 257)).save(folder / "deep16.png")
    Image.fromarray(photo[:1, :1]).save(folder / "one.png")
    assert np.asarray(Image.open(folder / "deep16.png")).dtype != np.uint8  # really 16-bit

    out = tmp_path / "store"
    result = CliRunner().invoke(main, ["-q", "contours", str(folder), "-o", str(out), "--model", "hed-bsds500", "--weights", str(hed_h5)])
    assert result.exit_code == 1, result.output
    bad = {"garbage", "truncated", "empty"}
    lines = [line for line in result.output.splitlines() if "failed:" in line]
    assert {line.split("failed:")[1].split(":")[0].strip() for line in lines} == bad
    assert "3 failed of 8" in result.output
    assert "Traceback" not in result.output
    with StoreReader(out, kind="contours") as store:
        assert set(store.keys()) == {"good", "gray", "rgba", "deep16", "one"}
        assert store["one"].arrays["edge"].shape == (1, 1)
        assert store["gray"].arrays["edge"].shape == (40, 50)
    assert sum(1 for _ in open(out / "failures.tsv")) == 1 + 3  # header + one row per failed image


@pytest.mark.parametrize("args, message", [
    (["--scales", "0.5,abc"], "comma-separated"),
    (["--scales", "0"], "between"),
    (["--precision", "int8"], "int8"),
    (["--batch-size", "0"], "batch-size"),
    (["--nms-png"], "--png-dir"),
    (["--model", "vgg"], "vgg"),
])
def test_usage_errors(tmp_path, args, message):
    result = CliRunner().invoke(main, ["contours", str(tmp_path), "-o", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_missing_input_is_a_usage_error(tmp_path, hed_h5):
    result = CliRunner().invoke(main, ["contours", str(tmp_path / "nope"), "-o", str(tmp_path / "o"),
                                       "--model", "hed-bsds500", "--weights", str(hed_h5)])
    assert result.exit_code == 2 and "no such folder" in result.output


def test_missing_weights_say_which_command_to_run(tmp_path, home, photo):
    Image.fromarray(np.ascontiguousarray(photo[:40, :40])).save(tmp_path / "x.png")
    result = CliRunner().invoke(main, ["contours", str(tmp_path / "x.png"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "segsort-unsup weights fetch --model pidinet" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_corrupt_weights_are_one_line(tmp_path, photo):
    Image.fromarray(np.ascontiguousarray(photo[:40, :40])).save(tmp_path / "x.png")
    (tmp_path / "w.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    result = CliRunner().invoke(main, ["contours", str(tmp_path / "x.png"), "-o", str(tmp_path / "o"),
                                       "--weights", str(tmp_path / "w.h5")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "w.h5" in result.output


def test_weights_commands(home, hed_h5):
    runner = CliRunner()
    listed = runner.invoke(main, ["weights", "list"])
    assert listed.exit_code == 0
    assert "hed-original" in listed.output and "0.788" in listed.output and "pidinet-tiny" in listed.output
    missing = runner.invoke(main, ["weights", "path", "--model", "hed-bsds500"])
    assert missing.exit_code == 1 and "weights fetch --model hed-bsds500" in missing.output
    fetched = runner.invoke(main, ["weights", "fetch", "--model", "hed-bsds500", "--from", str(hed_h5)])
    assert fetched.exit_code == 0, fetched.output
    assert "4502df9d0a88873911ea191cb2be5147d190f6a7f4c21731a418960f6bdb8e8f" in fetched.output
    path = runner.invoke(main, ["weights", "path", "--model", "hed-bsds500"])
    assert path.exit_code == 0 and path.output.strip().endswith("hed-bsds500-4502df9d.weights.h5")
    assert "hed-bsds500-4502df9d" in runner.invoke(main, ["weights", "list"]).output
    wrong = runner.invoke(main, ["weights", "fetch", "--model", "hed-bsds500", "--from", str(hed_h5),
                                 "--sha256", "1" * 64])
    assert wrong.exit_code == 1 and "contradicts" in wrong.output
    bad_option = runner.invoke(main, ["weights", "fetch", "--modle", "x"])
    assert bad_option.exit_code == 2


@pytest.mark.slow
def test_killed_run_resumes(tmp_path, photo, hed_h5):
    """SIGKILL a real run after a few shards are saved; the re-run completes the store."""
    folder = tmp_path / "in"
    folder.mkdir()
    n = 20
    for i in range(n):
        crop = photo[(i * 5) % 150 : (i * 5) % 150 + 160, (i * 7) % 240 : (i * 7) % 240 + 240]
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"img{i:02d}.png")
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "segsort_unsup.cli", "-q", "contours", str(folder), "-o", str(out),
           "--model", "hed-bsds500", "--weights", str(hed_h5), "--shard-size", "1", "--batch-size", "1", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and len(list(out.glob("part-*.h5"))) >= 3:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved = len(list(out.glob("part-*.h5")))
    assert 3 <= saved < n
    with StoreReader(out, kind="contours") as store:  # readable right after the kill
        assert len(store) == saved

    rerun = subprocess.run(cmd[:-2], capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "already complete" in rerun.stderr
    done = int(rerun.stderr.split("contours: ")[1].split(" done")[0])
    skipped = int(rerun.stderr.split("done, ")[1].split(" already")[0])
    assert skipped >= saved and done + skipped == n
    with StoreReader(out, kind="contours", required=("edge", "orientation")) as store:
        assert len(store) == n
        for key in store.keys():
            assert store[key].arrays["edge"].shape == (160, 240)
    assert not list(out.glob(".part-*.tmp"))
