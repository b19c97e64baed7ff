"""End to end on the real BSDS500 test split, through the command line: the published PiDiNet
weights must give the published numbers with this project's detector, NMS and evaluator.

PiDiNet (Su et al. ICCV 2021) publishes ODS .807 / OIS .823 on BSDS500 test (single scale).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PUBLISHED = {"ods": 0.807, "ois": 0.823}


def _cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "segsort_unsup.cli", "-q", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_pidinet_reproduces_published_bsds500_numbers(tmp_path, bsds, pidinet_dir):
    _cli("contours", str(bsds / "images" / "test"), "-o", str(tmp_path / "contours"),
         "--model", "pidinet", "--weights", str(pidinet_dir / "table5_pidinet.pth"))
    _cli("evaluate", "boundaries", str(tmp_path / "contours"), "--gt", str(bsds / "groundTruth" / "test"),
         "-o", str(tmp_path / "eval"), "--workers", "2")
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["images"] == 200
    got = summary["boundaries"]
    for key, value in PUBLISHED.items():
        assert abs(got[key] - value) <= 0.005, (key, got[key], value)
