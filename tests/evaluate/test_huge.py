"""Large maps in ``evaluate``: a SIGTERM during one image's benchmark stops the run within seconds,
leaves no partial results, and the same command then completes.

The inputs are generated here into tmp (a synthetic edge map through ``segsort-unsup ucm``, one
synthetic human segmentation in BSDS's groundTruth format) and never committed.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from click.testing import CliRunner
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from segsort_unsup.cli import EXIT_INTERRUPTED, main

REPO = Path(__file__).resolve().parents[2]


def synthetic_pair(folder: Path, height: int, width: int, *, seed: int = 0) -> tuple[Path, Path]:
    """An edge PNG (Voronoi cell boundaries of random strength, blurred, with noise) and a human
    segmentation of slightly moved cells (groundTruth .mat with Segmentation and Boundaries)."""
    rng = np.random.default_rng(seed)
    seeds = rng.uniform((0, 0), (height, width), (max(20, height * width // 25000), 2))
    yy, xx = np.mgrid[0:height, 0:width]
    points = np.column_stack([yy.ravel(), xx.ravel()]).astype(np.float64)
    cells = cKDTree(seeds).query(points)[1].reshape(height, width)
    human = (cKDTree(seeds + rng.normal(0, 6, seeds.shape)).query(points)[1].reshape(height, width) + 1)
    strength = rng.uniform(0.2, 1.0, len(seeds))
    edge = np.zeros((height, width), np.float32)
    right = cells[:, 1:] != cells[:, :-1]
    edge[:, 1:][right] = strength[cells[:, 1:][right]]
    down = cells[1:] != cells[:-1]
    edge[1:][down] = np.maximum(edge[1:][down], strength[cells[1:][down]])
    edge = ndimage.gaussian_filter(edge, 1.0) + rng.random((height, width), dtype=np.float32) * 0.03
    (folder / "edges").mkdir(parents=True)
    (folder / "gt").mkdir()
    Image.fromarray(np.clip(edge / edge.max() * 255, 0, 255).astype(np.uint8)).save(folder / "edges" / "img0.png")
    bdry = np.zeros((height, width), np.uint8)
    bdry[:-1] |= human[:-1] != human[1:]
    bdry[:, :-1] |= human[:, :-1] != human[:, 1:]
    gt = np.empty((1, 1), object)
    gt[0, 0] = {"Segmentation": human.astype(np.uint16), "Boundaries": bdry}
    sio.savemat(folder / "gt" / "img0.mat", {"groundTruth": gt}, do_compression=True)
    return folder / "edges", folder / "gt"


@pytest.mark.slow
def test_sigterm_within_an_image_stops_fast_and_a_rerun_completes(tmp_path):
    edges, gt = synthetic_pair(tmp_path, 1600, 2000)  # 3.2 Mpx: about 15 s of regions and matching
    store = tmp_path / "segments"
    result = CliRunner().invoke(main, ["-q", "ucm", str(edges), "-o", str(store)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = tmp_path / "eval"
    cmd = [sys.executable, "-c", "from segsort_unsup.cli import run; run()", "evaluate", "regions", str(store),
           "--gt", str(gt), "-o", str(out), "--with-boundaries"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and "evaluate:" not in "".join(err) and time.monotonic() < deadline:
            time.sleep(0.05)  # imports done, the handlers installed: its progress bar is up
        time.sleep(4)  # inside the image: the regions from the tree, then the boundary matching
        assert proc.poll() is None, "the benchmark finished before the signal: use a larger image"
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        proc.wait(timeout=30)
        stopped_after = time.monotonic() - sent
        reader.join(timeout=10)
        stderr = "".join(err)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert stopped_after < 5, f"took {stopped_after:.1f} s to stop"
    # stopped at a check point between thresholds (the ordinary stop), not by the CLI's watchdog
    assert "Interrupted" in stderr and "inside a long computation" not in stderr and "Traceback" not in stderr
    assert not (out / "eval_bdry.txt").exists() and not (out / "eval_cover.txt").exists()
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "Covering ODS=" in again.stdout and "ODS F=" in again.stdout
    cover = np.loadtxt(out / "eval_cover.txt")
    bdry = np.loadtxt(out / "eval_bdry.txt")
    assert 0.3 < cover[1] <= 1 and 0.3 < bdry[3] <= 1


def test_stop_request_is_honoured_between_matching_thresholds(monkeypatch):
    """A stop request (what the CLI's SIGTERM handler sets) ends the matching at the next threshold,
    and the regions of a merge tree at the next cut: neither runs to the end first."""
    from segsort_unsup import parallel
    from segsort_unsup.evaluate import boundaries as B
    from segsort_unsup.evaluate import regions as R
    from segsort_unsup.ucm.hierarchy import ultrametric_contour_map

    rng = np.random.default_rng(1)
    pb = ndimage.gaussian_filter(rng.random((120, 160)), 2.0)
    pb = (pb - pb.min()) / (pb.max() - pb.min())
    human = rng.random((120, 160)) < 0.05
    steps = []
    real = B.match_steps

    def counting(t0, t1, *args):
        steps.append(t0)
        if len(steps) == 3:
            parallel.request_stop()
        return real(t0, t1, *args)

    monkeypatch.setattr(B, "match_steps", counting)
    try:
        with pytest.raises(KeyboardInterrupt):
            B.boundary_counts_pb(pb, [human], thresholds=B.default_thresholds(20))
        assert len(steps) == 3
        ucm = ultrametric_contour_map(pb.astype(np.float32))
        scores = R.region_counts_tree(ucm.parents, ucm.altitudes, ucm.leaves, [human.astype(np.int32)],
                                      thresholds=B.default_thresholds(20))
        pytest.fail(f"a stop request was ignored: {scores}")
    except KeyboardInterrupt:
        pass
    finally:
        parallel.clear_stop()
