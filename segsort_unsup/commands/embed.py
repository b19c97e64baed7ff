"""``segsort-unsup embed``: a trained model + images -> segments and prototypes (options from its config)."""

from __future__ import annotations

from ..embed.stage import STAGE
from .options import stage_command

embed = stage_command(STAGE, help="""Segments and one prototype per segment for every image.

    MODEL is a model.pt (or a train run folder holding one); INPUT a folder, glob, list file or
    image. A killed run resumes where it stopped.
    """)
