from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def keras_state(hed_h5):
    """The HED state_dict read from the real Keras weights (the reference for the other formats)."""
    from segsort_unsup.contours.formats import load_hed_state_dict

    return load_hed_state_dict(hed_h5)
