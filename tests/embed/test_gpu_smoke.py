"""benchmarks/gpu_smoke.py: a CI-safe skip without CUDA, and its whole logic on a CPU (--tiny)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_smoke.py"


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run")
def test_without_cuda_it_prints_one_line_and_exits_0():
    result = _run()
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "skipped" in result.stdout


@pytest.mark.slow
def test_tiny_cpu_run_passes_every_check(shared, tmp_path):
    """Photos -> contours -> ucm -> train (full mode) -> embeddings, embed, torchrun, DDP probe,
    kill + resume: every row ok, exit 0 (about 2 minutes on 2 loaded cores)."""
    if not (shared / "data" / "camvid" / "train").is_dir():
        pytest.skip("CamVid not found")
    result = _run("--device", "cpu", "--tiny", "--shared", str(shared), "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = result.stdout.split("\n\n")[-1]
    for row in ("train full: loss falling", "embed 4 CamVid val photos", "torchrun 1 process", "DDP step on a gloo",
                "kill at the mid checkpoint + resume"):
        assert row in table
    assert "FAIL" not in table
    assert "ended before the kill" not in table  # the resume was really exercised
