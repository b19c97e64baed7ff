"""The command line as a newcomer meets it: help, typos, -v anywhere, Ctrl-C and SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from segsort_unsup.cli import EXIT_INTERRUPTED, run

REPO = Path(__file__).resolve().parents[1]


def test_help_lists_every_command_untruncated(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    commands = out.split("Commands:")[1]
    assert "..." not in commands and "(cache:" not in commands
    for name in ("contours", "ucm", "evaluate", "run", "weights", "demo"):
        assert f"  {name}" in out


def test_mistyped_command_gets_a_suggestion(capsys):
    assert run(["countours", "x"]) == 2
    assert "Did you mean 'contours'?" in capsys.readouterr().err


def test_verbose_flag_after_the_command(capsys, tmp_path):
    code = run(["ucm", str(tmp_path / "missing"), "-o", str(tmp_path / "o"), "-v"])
    err = capsys.readouterr().err
    assert code == 2 and "No such option" not in err and "does not exist" in err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_exits_130_without_tracebacks_and_resumes(tmp_path, bsds, sig):
    from PIL import Image
    from skimage import color, filters, io

    edges = tmp_path / "edges"
    edges.mkdir()
    for path in sorted((bsds / "images" / "test").glob("*.jpg"))[:40]:
        image_id = path.stem
        photo = io.imread(path)
        sob = filters.sobel(color.rgb2gray(photo))
        Image.fromarray((255 * sob / sob.max()).astype("uint8")).save(edges / f"{image_id}.png")
    cmd = [sys.executable, "-m", "segsort_unsup.cli", "ucm", str(edges), "-o", str(tmp_path / "seg"),
           "--workers", "2", "--shard-size", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((tmp_path / "seg").glob("part-*.h5")):
        time.sleep(0.05)
    t0 = time.monotonic()
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # Ctrl-C reaches the whole foreground process group
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED and time.monotonic() - t0 < 10, err[-800:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "Interrupted" in err
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already complete" in again.stderr, again.stderr
