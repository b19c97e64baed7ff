"""``segsort-unsup discover``: prototypes store -> FINCH groups store, gallery and 2-D map (options from its config)."""

from __future__ import annotations

from pathlib import Path

import click

from ..discover.stage import STAGE
from .options import stage_command


def _show_gallery(config, output: Path) -> None:
    """Print where the gallery is, also when some items failed."""
    gallery = Path(output) / "gallery" / "gallery.html"
    if config.gallery and gallery.is_file():
        click.echo(f"gallery: {gallery.resolve().as_uri()}", err=True)


discover = stage_command(STAGE, after=_show_gallery, help="""Visual groups: FINCH over the segment prototypes,
    every level, with a browsable gallery.

    PROTOTYPES is a prototypes store written by `segsort-unsup embed`. The groups store gets
    each level's partition, group means and sizes, links to the coarser level and, when the
    prototypes carry classes, purity and NMI; OUTPUT/gallery/gallery.html shows the groups.
    A level: FINCH joins each segment with its nearest neighbour into groups (level 0, the
    finest), then each group with its nearest group (level 1), and so on.
    """)
