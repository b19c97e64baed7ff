"""``segsort-unsup weights``: list, fetch and locate pretrained contour-model weights."""

from __future__ import annotations

from pathlib import Path

import click

from ..contours.registry import DEFAULT_MODEL, MODELS
from .options import FullHelpGroup


@click.group(cls=FullHelpGroup)
def weights() -> None:
    """Pretrained contour-model weights (cache: $SEGSORT_UNSUP_HOME/weights or ~/.cache/segsort-unsup)."""


def _fmt(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


@weights.command("list")
def list_cmd() -> None:
    """Table of the models: architecture, published BSDS500 ODS/OIS/AP, cached file."""
    from ..contours.weights import list_models

    rows = list_models()
    header = ("name", "arch", "ODS", "OIS", "AP", "cached")
    table = [header] + [
        (r["name"], r["arch"], _fmt(r["published"].get("ods")), _fmt(r["published"].get("ois")),
         _fmt(r["published"].get("ap")), r["cached"] or "no (weights fetch --model " + r["name"] + ")")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    click.echo("published = the authors' single-scale BSDS500 test figures; hed-bsds500 is a third party's retrain "
               "with none of its own: this project's evaluator (BSR protocol, 99 thresholds, NMS) measures it "
               "ODS .747 / OIS .767 / AP .786 (see hed_weights/README.md)")


@weights.command("fetch")
@click.option("--model", type=click.Choice(list(MODELS)), default=DEFAULT_MODEL, show_default=True)
@click.option("--from", "from_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Copy this local file (any supported format) instead of downloading.")
@click.option("--sha256", help="Expected sha256 of the file (pins entries without a registry hash).")
def fetch_cmd(model: str, from_path: Path | None, sha256: str | None) -> None:
    """Put the weights of --model into the cache, verified by sha256."""
    from ..contours.weights import fetch
    from ..io.atomic import sha256_file

    path = fetch(model, from_path=from_path, sha256=sha256)
    click.echo(f"{model}: {path} (sha256 {sha256_file(path)})")


@weights.command("path")
@click.option("--model", type=click.Choice(list(MODELS)), default=DEFAULT_MODEL, show_default=True)
def path_cmd(model: str) -> None:
    """Print the verified cached weights file of --model (error with the fetch command if missing)."""
    from ..contours.weights import resolve_weights

    click.echo(str(resolve_weights(model)[0]))
