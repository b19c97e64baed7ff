"""``segsort-unsup retrieve``: pictures of query segments next to their nearest labelled segments."""

from __future__ import annotations

import click

from .options import output_option, overwrite_option, seed_option


@click.command("retrieve")
@click.argument("labelled", type=click.Path(exists=True, file_okay=False))
@click.argument("query", type=click.Path(exists=True, file_okay=False))
@output_option("Folder for the pictures and index.html.")
@click.option("--query", "queries", multiple=True, metavar="KEY:SEGMENT",
              help="A query segment (repeatable); default: a seeded random sample of --n segments.")
@click.option("--n", type=click.IntRange(min=1), default=4, show_default=True, help="Random query segments.")
@click.option("--top", type=click.IntRange(min=1), default=6, show_default=True, help="Neighbours shown.")
@click.option("--min-area", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Smallest random query segment (pixels).")
@click.option("--geometry", type=click.FloatRange(0.0, 10.0), default=0.0, show_default=True, metavar="W",
              help="Search the prototypes joined to their regions' geometry with this weight, as "
                   "`transfer --geometry W` votes (0: the embedding alone).")
@click.option("--class-names", type=click.Path(exists=True, dir_okay=False),
              help="One class name per line (e.g. '0 Sky').")
@seed_option
@overwrite_option
def retrieve(labelled, query, output, queries, n, top, min_area, geometry, class_names, seed, overwrite):
    """Query segments cut out of their images, next to their nearest labelled segments.

    LABELLED and QUERY are prototypes stores (`segsort-unsup embed`); they may be the same.
    """
    from ..transfer.retrieve import parse_query, read_class_names, run_retrieve

    names = read_class_names(class_names) if class_names else None
    written = run_retrieve(labelled, query, output, queries=[parse_query(q) for q in queries], n=n, seed=seed,
                           top=top, min_area=min_area, class_names=names, geometry=geometry,
                           overwrite=overwrite)
    click.echo(f"retrieve: {len(written)} picture(s) -> {output}/index.html", err=True)
