"""``segsort-unsup train``: a SegSort embedding (model.pt) from a segments store (options from its config)."""

from __future__ import annotations

from ..train.stage import STAGE
from .options import stage_command

train = stage_command(STAGE, help="""Train a SegSort embedding on the segments of SEGMENTS (a store written by
    `segsort-unsup ucm`).

    Under `torchrun --nproc-per-node N` the same command trains with DDP. Ctrl-C or SIGTERM stops at
    the end of the current step with a checkpoint; re-running the same command resumes it.
    """)
