from __future__ import annotations

import pytest

from .maps import bsds_maps


@pytest.fixture(scope="session")
def gt_maps(bsds):
    """(id, edge, orientation) for 4 BSDS500 test images (blurred mean human boundaries)."""
    return bsds_maps(bsds, ids=("100007", "100039", "100099", "10081"))
