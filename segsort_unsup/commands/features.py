"""``segsort-unsup features``: the frozen trunk's features of a segments store's images (options from its config)."""

from __future__ import annotations

from ..train.features import STAGE
from .options import stage_command

features = stage_command(STAGE, help="""Compute the trunk features of every image of SEGMENTS at each scale and flip.

    `train --mode cached` computes them itself when needed; running this first lets several
    training runs share one store (`--features-dir`).
    """)
