"""``segsort-unsup ucm``: contour maps -> OWT-UCM segment hierarchies (options from its config)."""

from __future__ import annotations

from ..ucm.stage import STAGE
from .options import stage_command

ucm = stage_command(STAGE, help="""Hierarchical segments (OWT-UCM) from contour maps.

    SOURCE is a contours store written by `segsort-unsup contours`, or edge-probability
    images (a folder, glob, list file or one PNG). A killed run resumes where it stopped.
    """)
