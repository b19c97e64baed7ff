"""``segsort-unsup discover``: prototypes store -> FINCH groups store, gallery and 2-D map."""

from __future__ import annotations

import click

from .options import finish, output_option, overwrite_option, seed_option


def _int_list(ctx: click.Context | None, param: click.Parameter | None, value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        values = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of class ids (e.g. 1,3,8)") from None
    if any(v < 0 for v in values):
        raise click.BadParameter(f"{value!r}: class ids are >= 0")
    return values


def _level(ctx: click.Context | None, param: click.Parameter | None, value: str | None) -> int | str | None:
    if value is None or value == "requested":
        return value
    try:
        level = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: give a level number (0 = finest) or 'requested'") from None
    if level < 0:
        raise click.BadParameter(f"{value!r}: levels are numbered from 0 (finest)")
    return level


@click.command("discover")
@click.argument("prototypes", type=click.Path(exists=True, file_okay=False))
@output_option("Groups store folder to create (or keep, when complete with the same settings).")
@click.option("--min-area", type=click.IntRange(min=0), default=0, show_default=True,
              help="Leave out segments smaller than this (pixels).")
@click.option("--classes", callback=_int_list, default="", metavar="C1,C2,...",
              help="Cluster only these classes (labelled prototypes), e.g. 1,3,8.")
@click.option("--exclude-classes", callback=_int_list, default="", metavar="C1,C2,...",
              help="Leave out these classes (labelled prototypes), e.g. the background.")
@click.option("--max-prototypes", type=click.IntRange(min=0), default=0, show_default=True,
              help="Cluster a random sample of at most this many prototypes (0: all); drawn with --seed.")
@seed_option
@click.option("--req-clust", type=click.IntRange(min=1), default=None,
              help="Also store the partition with exactly this many groups.")
@click.option("--distance", type=click.Choice(["cosine", "euclidean"]), default="cosine", show_default=True)
@click.option("--level", callback=_level, default=None, metavar="N|requested",
              help="Gallery level [default: the requested partition, else the level with ~20-50 groups].")
@click.option("--representatives", type=click.IntRange(min=0), default=5, show_default=True,
              help="Members nearest the group mean shown per group.")
@click.option("--random-members", type=click.IntRange(min=0), default=2, show_default=True,
              help="Random members shown per group.")
@click.option("--max-groups", type=click.IntRange(min=1), default=200, show_default=True,
              help="Levels with more groups get no gallery page (the chosen level shows its largest).")
@click.option("--groups-per-page", type=click.IntRange(min=1), default=30, show_default=True,
              help="Group cards per gallery page (pages stay small at any store size).")
@click.option("--overviews", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of ucm <key>_overview.png pictures to link from the photo pages "
                   "[default: png/segments beside OUTPUT, if there].")
@click.option("--map", "map_method", type=click.Choice(["auto", "tsne", "pca", "none"]), default="auto",
              show_default=True, help="2-D map: t-SNE (scikit-learn), PCA, or none; auto = t-SNE if available.")
@click.option("--map-points", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Sample of prototypes placed on the map (seeded; one per grid cell is drawn).")
@click.option("--no-gallery", is_flag=True, help="Only the groups store: no gallery pages, crops or map.")
@overwrite_option
def discover(prototypes, output, min_area, classes, exclude_classes, max_prototypes, seed, req_clust, distance,
             level, representatives, random_members, max_groups, groups_per_page, overviews, map_method, map_points,
             no_gallery, overwrite):
    """Visual groups: FINCH over the segment prototypes, every level, with a browsable gallery.

    PROTOTYPES is a prototypes store written by `segsort-unsup embed`. The groups store gets
    each level's partition, group means and sizes, links to the coarser level and, when the
    prototypes carry classes, purity and NMI; OUTPUT/gallery/gallery.html shows the groups.
    A level: FINCH joins each segment with its nearest neighbour into groups (level 0, the
    finest), then each group with its nearest group (level 1), and so on.
    """
    from ..discover.stage import DiscoverConfig, run

    if classes and exclude_classes:
        raise click.UsageError("give --classes or --exclude-classes, not both")
    config = DiscoverConfig(min_area=min_area, classes=classes, exclude_classes=exclude_classes,
                            max_prototypes=max_prototypes, seed=seed, req_clust=req_clust, distance=distance,
                            level=level, gallery=not no_gallery, representatives=representatives,
                            random_members=random_members, max_groups=max_groups, groups_per_page=groups_per_page,
                            overviews=overviews, map_method=map_method, map_points=map_points)
    summary = run(config, prototypes, output, overwrite=overwrite)
    gallery = output / "gallery" / "gallery.html"
    try:
        finish(summary)
    finally:
        if not no_gallery and gallery.is_file():
            click.echo(f"gallery: {gallery.resolve().as_uri()}", err=True)
