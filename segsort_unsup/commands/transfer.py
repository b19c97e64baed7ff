"""``segsort-unsup transfer``: kNN labels for a query prototypes store from a labelled one."""

from __future__ import annotations

import click

from .options import finish, output_option, overwrite_option


@click.command("transfer")
@click.argument("labelled", type=click.Path(exists=True, file_okay=False))
@click.argument("query", type=click.Path(exists=True, file_okay=False))
@output_option("Folder for the label PNGs (one per query image).")
@click.option("--k", "k", type=click.IntRange(min=1), default=15, show_default=True,
              help="Nearest labelled prototypes that vote.")
@click.option("--ignore-label", type=int, default=None,
              help="Labelled prototypes of this class do not vote; uncovered pixels get it (default 255).")
@click.option("--index", type=click.Choice(["flat", "ivf"]), default="flat", show_default=True,
              help="flat: exact search; ivf: approximate (for millions of prototypes).")
@click.option("--nprobe", type=click.IntRange(min=1), default=16, show_default=True, help="Cells searched (ivf).")
@overwrite_option
def transfer(labelled, query, output, k, ignore_label, index, nprobe, overwrite):
    """Label every query image by its segments' k nearest labelled prototypes.

    LABELLED is a prototypes store embedded with --labels; QUERY a prototypes store. The PNGs are
    ready for `segsort-unsup evaluate semantic`.
    """
    from ..transfer.stage import TransferConfig, run

    config = TransferConfig(k=k, ignore_label=ignore_label, index=index, nprobe=nprobe)
    finish(run(config, [labelled, query], output, overwrite=overwrite))
