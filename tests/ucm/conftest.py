from __future__ import annotations

import pytest

from .maps import bsds_maps


@pytest.fixture(scope="session")
def gt_maps(bsds):
    """(id, edge, orientation) for 4 BSDS500 test images (blurred mean human boundaries)."""
    return bsds_maps(bsds, ids=("100007", "100039", "100099", "10081"))


@pytest.fixture(scope="session")
def sobel_maps(bsds):
    """(id, edge, orientation) for 2 BSDS500 test photos' Sobel gradients (thousands of regions)."""
    from .maps import sobel_map

    return [(i, *sobel_map(bsds / "images" / "test" / f"{i}.jpg")) for i in ("100007", "10081")]
