"""The README's "your own photos" command on 6 real BSDS500 photos, with the CPU preset as shipped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "segsort-unsup"


def _cli(*args: str, env: dict[str, str], cwd: Path, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_folder_command_goes_from_photos_to_a_gallery(bsds, pidinet_dir, hed_h5, tmp_path):
    photos = tmp_path / "my photos"
    photos.mkdir()
    chosen = sorted((bsds / "images" / "val").glob("*.jpg"))[:6]
    for path in chosen:
        (photos / path.name).symlink_to(path)
    env = {**os.environ, "SEGSORT_UNSUP_HOME": str(tmp_path / "home")}
    for model, path in (("pidinet", pidinet_dir / "table5_pidinet.pth"), ("hed-bsds500", hed_h5)):
        assert _cli("weights", "fetch", "--model", model, "--from", str(path), env=env, cwd=tmp_path).returncode == 0

    out = tmp_path / "out"
    done = _cli("run", str(REPO / "pipelines" / "folder.toml"), "--input", f"images={photos}", "-o", str(out),
                env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    uris = re.findall(r"gallery \(discover\)\s+(file://\S+)", done.stdout)
    assert len(uris) == 1, done.stdout
    gallery = Path(unquote(urlparse(uris[0]).path))
    assert gallery == (out / "groups" / "gallery" / "gallery.html").resolve() and gallery.is_file()
    assert str(out / "train" / "model.pt") in done.stdout
    # every photo went through every stage, and the gallery links each member to its photo page
    assert re.search(r"embed: 6 done, 0 already complete, 0 failed of 6", done.stderr), done.stderr[-2000:]
    assert re.search(r"discover: 6 done, 0 already complete, 0 failed of 6", done.stderr)
    text = gallery.read_text()
    assert "photos/i0000" in text and "ucm overview" in (gallery.parent / "photos" / "i000000.html").read_text()
    # a bare --input is refused: this pipeline reads its photos through the named input `images`
    bare = _cli("run", str(REPO / "pipelines" / "folder.toml"), "--input", str(photos), "-o", str(out),
                env=env, cwd=tmp_path)
    assert bare.returncode == 2 and "--input images=PATH" in bare.stderr


def test_run_lists_its_artefacts_even_when_a_stage_fails(bsds, pidinet_dir, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in sorted((bsds / "images" / "val").glob("*.jpg"))[:2]:
        (photos / path.name).symlink_to(path)
    (photos / "notes.jpg").write_text("not an image")
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f"""[pipeline]
input = "photos"
output = "out"
[contours]
model = "pidinet-tiny"
weights = "{pidinet_dir / 'table5_pidinet-tiny.pth'}"
png_dir = "png/contours"
resize_to = 160
""")
    done = _cli("run", str(pipeline), env=dict(os.environ), cwd=tmp_path, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]  # one photo failed; the two others are kept
    listed = dict(re.findall(r"^  (\S+ \(\w+\))\s+(\S+)$", done.stdout, re.M))
    assert listed == {"pictures (contours)": str(tmp_path / "out" / "png" / "contours"),
                      "store (contours)": str(tmp_path / "out" / "contours"),
                      "store (ucm)": str(tmp_path / "out" / "segments")}, done.stdout
