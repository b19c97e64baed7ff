"""``segsort-unsup contours``: edge-probability maps for a folder of images (options from its config)."""

from __future__ import annotations

from ..contours.stage import STAGE
from .options import stage_command

contours = stage_command(STAGE, help="""Edge probability + orientation for every image in INPUT (folder, glob,
    list file or image).

    Resumable: re-running skips images already in OUTPUT. Bad images are reported and skipped;
    the exit code is 1 if any image failed.
    """)
