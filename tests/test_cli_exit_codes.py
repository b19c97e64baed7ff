"""Exit codes of the installed ``segsort-unsup`` script, run as a user's shell or scheduler runs it.

0: every item done; 1: an item failed (the rest are saved) or the run stopped on an error;
2: a usage error. Each command that processes items is run twice on tiny real inputs: once
clean (0), once with one bad item (1). Through a subprocess, not click's CliRunner: the runner
ran in standalone mode and never saw the console entry drop the code of a failed run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from segsort_unsup.io.images import read_image

SCRIPT = Path(sys.executable).parent / "segsort-unsup"
IDS = ("100007", "100039", "100099")
SIZE = (120, 80)  # width, height: tiny photos keep every command at a few seconds
# One process: worker pools (the default, one per core) would only add start-up time to these tiny runs.
ONE_WORKER = {name: ("--workers", "1") for name in ("contours", "ucm", "embed")}


def cli(*args: object, home: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed console script (it imports the checkout under test through PYTHONPATH)."""
    env = dict(os.environ)
    if home is not None:
        env["SEGSORT_UNSUP_HOME"] = str(home)
    return subprocess.run([str(SCRIPT), "-q", *map(str, args), *ONE_WORKER.get(str(args[0]), ())],
                          capture_output=True, text=True, env=env, timeout=timeout)


def _check(result: subprocess.CompletedProcess, code: int) -> None:
    assert result.returncode == code, f"exit {result.returncode}, expected {code}:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def script() -> Path:
    if not SCRIPT.is_file():
        pytest.skip(f"{SCRIPT}: the package is not installed in this environment")
    return SCRIPT


@pytest.fixture(scope="module")
def photos(bsds, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for image_id in IDS:
        rgb = read_image(bsds / "images" / "test" / f"{image_id}.jpg")
        cv2.imwrite(str(folder / f"{image_id}.png"), cv2.resize(rgb, SIZE, interpolation=cv2.INTER_AREA)[..., ::-1])
    return folder


def _with_garbage(tmp_path: Path, good: Path, name: str = "broken.png") -> Path:
    """A folder holding one good file of ``good`` and one file that is not an image."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(next(iter(sorted(good.glob("*.png")))), folder)
    (folder / name).write_bytes(b"\x00\x01 definitely not an image")
    return folder


@pytest.fixture(scope="module")
def contours_store(script, photos, pidinet_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("contours") / "store"
    _check(cli("contours", photos, "-o", out, "--model", "pidinet-tiny", "--precision", "fp32",
               "--weights", pidinet_dir / "table5_pidinet-tiny.pth"), 0)
    return out


@pytest.fixture(scope="module")
def segments(contours_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("segments") / "store"
    _check(cli("ucm", contours_store, "-o", out), 0)
    return out


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("labels")
    for image_id in IDS:
        label = np.zeros(SIZE[::-1], np.uint8)
        label[:, SIZE[0] // 2:] = 1
        label[SIZE[1] // 2:] = 2
        cv2.imwrite(str(folder / f"{image_id}.png"), label)
    return folder


TRAIN_ARGS = ("--backbone", "scratch", "--mode", "cached", "--steps", "2", "--batch-size", "2", "--crop", "64",
              "--feature-scales", "1", "--head", "conv1", "--threads", "1")


@pytest.fixture(scope="module")
def model(segments, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    _check(cli("train", segments, "-o", out, *TRAIN_ARGS), 0)
    return out / "model.pt"


@pytest.fixture(scope="module")
def prototypes(model, photos, labels, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embed") / "store"
    _check(cli("embed", model, photos, "-o", out, "--labels", labels), 0)
    return out


def test_contours_exit_codes(photos, contours_store, pidinet_dir, tmp_path):
    weights = pidinet_dir / "table5_pidinet-tiny.pth"
    mixed = _with_garbage(tmp_path, photos)
    failed = cli("contours", mixed, "-o", tmp_path / "c", "--model", "pidinet-tiny", "--precision", "fp32",
                 "--weights", weights)
    _check(failed, 1)
    assert "1 done, 0 already complete, 1 failed of 2" in failed.stderr
    _check(cli("contours", photos, "-o", tmp_path / "c2", "--model", "nosuch"), 2)  # usage error


def test_ucm_exit_codes(segments, tmp_path):
    edges = tmp_path / "edges"
    edges.mkdir()
    cv2.imwrite(str(edges / "ok.png"), np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1)))
    (edges / "broken.png").write_bytes(b"not a png")
    failed = cli("ucm", edges, "-o", tmp_path / "s")
    _check(failed, 1)
    assert "1 failed of 2" in failed.stderr
    _check(cli("ucm", edges, "-o", tmp_path / "s2", "--threshold", "-1"), 2)


@pytest.mark.slow
def test_train_exit_codes(segments, model, photos, tmp_path):
    some = tmp_path / "some"
    some.mkdir()
    for path in sorted(photos.glob("*.png"))[:2]:
        shutil.copy(path, some)
    failed = cli("train", segments, "-o", tmp_path / "run", "--images", some, *TRAIN_ARGS)
    _check(failed, 1)  # the photo of one item is missing: trained without it, reported, exit 1
    assert "1 failed" in failed.stderr and (tmp_path / "run" / "model.pt").is_file()


@pytest.mark.slow
def test_embed_exit_codes(model, photos, prototypes, tmp_path):
    failed = cli("embed", model, _with_garbage(tmp_path, photos), "-o", tmp_path / "p")
    _check(failed, 1)
    assert "1 done, 0 already complete, 1 failed of 2" in failed.stderr


@pytest.mark.slow
def test_transfer_exit_codes(prototypes, tmp_path):
    _check(cli("transfer", prototypes, prototypes, "-o", tmp_path / "ok"), 0)
    blocked = tmp_path / "ok" / f"{IDS[0]}.png"
    blocked.unlink()
    blocked.mkdir()  # a folder where a label PNG must go: that item fails, the others are complete
    failed = cli("transfer", prototypes, prototypes, "-o", tmp_path / "ok")
    _check(failed, 1)
    assert f"0 done, {len(IDS) - 1} already complete, 1 failed of {len(IDS)}" in failed.stderr


@pytest.mark.slow
def test_retrieve_exit_codes(model, photos, labels, prototypes, tmp_path):
    _check(cli("retrieve", prototypes, prototypes, "-o", tmp_path / "ok", "--min-area", "10"), 0)
    moved = tmp_path / "moved"
    shutil.copytree(photos, moved)
    query = tmp_path / "query"
    _check(cli("embed", model, moved, "-o", query), 0)
    shutil.rmtree(moved)  # the query's photos are gone: its pictures cannot be drawn
    _check(cli("retrieve", prototypes, query, "-o", tmp_path / "gone", "--min-area", "10"), 1)
    _check(cli("retrieve", prototypes, query, "-o", tmp_path / "bad", "--query", "nokey:0"), 2)


@pytest.mark.slow
def test_discover_exit_codes(prototypes, segments, tmp_path):
    _check(cli("discover", prototypes, "-o", tmp_path / "ok", "--map", "none"), 0)
    wrong = cli("discover", segments, "-o", tmp_path / "wrong", "--map", "none")  # not a prototypes store
    _check(wrong, 1)
    _check(cli("discover", prototypes, "-o", tmp_path / "u", "--classes", "1", "--exclude-classes", "2"), 2)


def test_evaluate_exit_codes(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    for name, shape in (("a", (8, 9)), ("b", (8, 8))):
        cv2.imwrite(str(gt / f"{name}.png"), np.ones((8, 8), np.uint8))
        cv2.imwrite(str(pred / f"{name}.png"), np.ones(shape, np.uint8))
    failed = cli("evaluate", "semantic", pred, "--gt", gt, "-o", tmp_path / "o")
    _check(failed, 1)  # a.png has the wrong size
    (pred / "a.png").unlink()
    _check(cli("evaluate", "semantic", pred, "--gt", gt, "-o", tmp_path / "o2"), 0)


def test_run_exits_1_when_a_stage_had_failures(photos, pidinet_dir, tmp_path):
    mixed = _with_garbage(tmp_path, photos)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f'[pipeline]\ninput = "{mixed}"\noutput = "{tmp_path / "out"}"\nworkers = 1\n'
                        f'[contours]\nmodel = "pidinet-tiny"\nprecision = "fp32"\n'
                        f'weights = "{pidinet_dir / "table5_pidinet-tiny.pth"}"\n[ucm]\n')
    failed = cli("run", pipeline)
    _check(failed, 1)
    assert "contours: 1 done, 0 already complete, 1 failed of 2" in failed.stderr
    assert "ucm: 1 done" in failed.stderr  # the stages after it still ran on what succeeded
    _check(cli("run", pipeline, "--from", "nostage"), 2)
