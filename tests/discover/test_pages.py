"""What the gallery says about the segments it shows."""

from __future__ import annotations

import pytest

from segsort_unsup.discover.pages import units_line


@pytest.mark.parametrize("settings, cells", [({"grid": [5, 5]}, (5, 5)), ({"grid": [4, 6]}, (4, 6)),
                                             ({"units": "grid8"}, (8, 8)), ({}, (5, 5))])
def test_pixel_sorting_units_name_their_grid(settings, cells):
    text = units_line({"settings": settings})
    assert f"{cells[0]}×{cells[1]} grid" in text and f"up to {cells[0] * cells[1]} per photo" in text
    assert "not the OWT-UCM regions" in text


def test_ucm_units_say_they_are_the_overview_regions():
    text = units_line({"settings": {"units": "ucm:0.3", "grid": [5, 5]}})
    assert "OWT-UCM regions cut at 0.3" in text and "grid" not in text


def test_names_from_data_are_escaped():
    assert "<b>" not in units_line({"settings": {"units": "ucm:<b>", "features": "<i>"}})
