"""``segsort-unsup transfer``: kNN labels for a query prototypes store from a labelled one (options from its config)."""

from __future__ import annotations

from ..transfer.stage import STAGE
from .options import stage_command

transfer = stage_command(STAGE, help="""Label every query image by its segments' k nearest labelled prototypes.

    LABELLED is a prototypes store embedded with --labels; QUERY a prototypes store. The PNGs are
    ready for `segsort-unsup evaluate semantic`.
    """)
