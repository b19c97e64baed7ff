"""``segsort-unsup cluster``: label-free cluster maps of a prototypes store (options from its config)."""

from __future__ import annotations

from ..discover.clusters import STAGE
from .options import stage_command

cluster = stage_command(STAGE, help="""Put every segment prototype of PROTOTYPES in one of --groups clusters,
    without labels, and write a cluster-id PNG per image.

    Score them the way STEGO and PiCIE report: `segsort-unsup evaluate semantic OUT --gt LABELS
    --hungarian` matches clusters to classes one-to-one on those images (labels are read there only).
    """)
