"""``segsort-unsup cluster``: label-free cluster maps of a prototypes store (k-means or FINCH)."""

from __future__ import annotations

import click

from .options import finish, output_option, overwrite_option, seed_option


@click.command("cluster")
@click.argument("prototypes", type=click.Path(exists=True, file_okay=False))
@output_option("Folder for the cluster-id PNGs (one per image).")
@click.option("--groups", type=click.IntRange(min=2), default=11, show_default=True,
              help="Clusters made: as many as the classes that will be scored.")
@click.option("--method", type=click.Choice(["kmeans", "finch"]), default="kmeans", show_default=True,
              help="kmeans: spherical k-means; finch: FINCH refined to exactly --groups.")
@seed_option
@overwrite_option
def cluster(prototypes, output, groups, method, seed, overwrite):
    """Put every segment prototype of PROTOTYPES in one of --groups clusters, without labels, and
    write a cluster-id PNG per image.

    Score them the way STEGO and PiCIE report: `segsort-unsup evaluate semantic OUT --gt LABELS
    --hungarian` matches clusters to classes one-to-one on those images (labels are read there only).
    """
    from ..discover.clusters import ClusterConfig, run

    finish(run(ClusterConfig(groups=groups, method=method, seed=seed), prototypes, output, overwrite=overwrite))
