"""The train stage on real BSDS500 photos and the OWT-UCM segments of their human contour maps."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from segsort_unsup.embed.model import load_model
from segsort_unsup.train.stage import TrainConfig, run
from segsort_unsup.errors import InputError, StoreError, WeightsError
from tests.embed.train_data import make_segments

REPO = Path(__file__).resolve().parents[2]
TINY = dict(mode="cached", steps=30, batch_size=4, crop=96, feature_scales=(1.0,), log_every=1,
            checkpoint_every=10, threads=2, head="conv1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bsds, hed_h5):
    root = tmp_path_factory.mktemp("train")
    store, images = make_segments(bsds, root)
    return {"root": root, "store": store, "images": images, "weights": str(hed_h5),
            "features": str(root / "features")}


def _config(tiny, **changes) -> TrainConfig:
    return TrainConfig(**{**TINY, "images": str(tiny["images"]), "backbone_weights": tiny["weights"],
                          "features_dir": tiny["features"], **changes})


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in _metrics(run_dir)]


def test_cached_mode_learns_and_writes_a_loadable_model(tiny, tmp_path):
    summary = run(_config(tiny), tiny["store"], tmp_path / "run")
    losses = _losses(tmp_path / "run")
    assert summary.ok and summary.done == 30 and len(losses) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert [m["step"] for m in _metrics(tmp_path / "run")] == list(range(1, 31))
    model, prov = load_model(tmp_path / "run" / "model.pt")
    assert prov["mode"] == "cached" and prov["train_identity_hash"] == summary.identity_hash
    # the saved head is the trained one: its embedding of cached features gives the logged loss's model
    assert model.model_config()["feature_layer"] == "conv4_3"
    assert len(list((tmp_path / "run" / "checkpoints").glob("step-*.pt"))) == 3
    # re-running the finished command changes nothing
    again = run(_config(tiny), tiny["store"], tmp_path / "run")
    assert again.done == 0 and again.skipped == 30


def test_segment_weighted_loss_trains_a_model_of_its_own_identity(tiny, tmp_path):
    plain = run(_config(tiny, steps=10), tiny["store"], tmp_path / "plain")
    weighted = run(_config(tiny, steps=10, loss_weighting="segment"), tiny["store"], tmp_path / "weighted")
    assert weighted.ok and weighted.identity_hash != plain.identity_hash
    losses = _losses(tmp_path / "weighted")
    assert losses != _losses(tmp_path / "plain") and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert "loss_weighting" not in _config(tiny).identity()  # the release's pixel mean: older models keep theirs
    from segsort_unsup.embed.losses import WEIGHTINGS
    from segsort_unsup.train.stage import LOSS_WEIGHTINGS

    assert LOSS_WEIGHTINGS == WEIGHTINGS


def test_resume_in_process_equals_uninterrupted(tiny, tmp_path):
    run(_config(tiny, steps=12, checkpoint_every=4), tiny["store"], tmp_path / "a")
    run(_config(tiny, steps=12, checkpoint_every=4), tiny["store"], tmp_path / "b")
    # roll b back to its step-8 checkpoint, as if killed after it
    (tmp_path / "b" / "checkpoints" / "step-0000012.pt").unlink()
    (tmp_path / "b" / "model.pt").unlink()
    resumed = run(_config(tiny, steps=12, checkpoint_every=4), tiny["store"], tmp_path / "b")
    assert resumed.skipped == 8 and resumed.done == 4
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    _assert_same_weights(tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt")
    assert [m["step"] for m in _metrics(tmp_path / "b")] == list(range(1, 13))


def _assert_same_weights(a: Path, b: Path) -> None:
    ma, _ = load_model(a)
    mb, _ = load_model(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


SCRIPT = str(Path(sys.executable).parent / "segsort-unsup")


def _cli(tiny, out: Path, *extra: str) -> list[str]:
    return [SCRIPT, "train", str(tiny["store"]), "-o", str(out),
            "--mode", "cached", "--images", str(tiny["images"]), "--backbone-weights", tiny["weights"],
            "--features-dir", tiny["features"], "--steps", "24", "--batch-size", "4", "--crop", "96",
            "--feature-scales", "1", "--head", "conv1", "--threads", "2", "--checkpoint-every", "3",
            "--log-every", "1", *extra]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> Path:
    """An uninterrupted CLI run (24 steps) to compare interrupted ones with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    ref = subprocess.run(_cli(tiny, out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    return out


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def test_sigkill_at_a_random_step_then_rerun_gives_the_uninterrupted_weights(tiny, reference, tmp_path):
    env = _env()
    target = random.Random(os.getpid()).choice([3, 6, 9, 12, 15, 18])
    proc = subprocess.Popen(_cli(tiny, tmp_path / "cut"), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = tmp_path / "cut" / "checkpoints" / f"step-{target:07d}.pt"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not ckpt.exists() and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "model.pt").exists(), "the run finished before it could be killed"
    again = subprocess.run(_cli(tiny, tmp_path / "cut"), cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming" in again.stdout + again.stderr
    _assert_same_weights(reference / "model.pt", tmp_path / "cut" / "model.pt")
    assert _losses(tmp_path / "cut") == _losses(reference)


def test_sigterm_right_after_an_optimizer_step_stops_at_the_step_boundary(tiny, reference, tmp_path):
    """The signal lands between optimizer.step() and the step's bookkeeping: the checkpoint saved on the
    way out holds step 7's weights under step 7, so the resumed run ends with the uninterrupted weights."""
    from segsort_unsup.train.stage import TEST_SIGTERM_ENV

    out = tmp_path / "cut"
    stopped = subprocess.run(_cli(tiny, out), cwd=REPO, env=_env(**{TEST_SIGTERM_ENV: "7"}), capture_output=True,
                             text=True, timeout=300)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "stopped at step 7" in stopped.stdout + stopped.stderr
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*.pt"))[-1] == "step-0000007.pt"
    assert not (out / "model.pt").exists()
    again = subprocess.run(_cli(tiny, out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "at step 7 of 24" in again.stdout + again.stderr
    assert "7/24" in again.stderr and "0/17" not in again.stderr  # the bar counts the resumed steps
    _assert_same_weights(reference / "model.pt", out / "model.pt")
    assert _losses(out) == _losses(reference)


# -- bad inputs -----------------------------------------------------------------------------------
def test_store_of_the_wrong_kind_is_refused_naming_it(tiny, tmp_path):
    run(_config(tiny, steps=1), tiny["store"], tmp_path / "run")  # makes the features store
    with pytest.raises(StoreError, match="features.*expected a 'segments' store"):
        run(_config(tiny), tiny["features"], tmp_path / "other")


def test_missing_image_behind_recorded_source_is_skipped(tiny, tmp_path, caplog):
    # a store whose recorded sources are the edge PNGs: remove one of them
    root = tmp_path / "moved"
    shutil.copytree(tiny["root"] / "edges", root / "edges")
    from segsort_unsup.ucm.stage import UcmConfig
    from segsort_unsup.ucm.stage import run as run_ucm

    run_ucm(UcmConfig(), root / "edges", root / "segments")
    (root / "edges" / "100007.png").unlink()
    cfg = _config(tiny, steps=3, images=None, features_dir=str(root / "features"))
    summary = run(cfg, root / "segments", root / "run")
    assert [k for k, _ in summary.failed] == ["100007"]
    assert "image not found" in summary.failed[0][1]
    assert summary.done == 3
    for path in (root / "edges").glob("*.png"):
        path.unlink()
    with pytest.raises(InputError, match="no image could be read"):
        run(cfg, root / "segments", root / "run2")


def test_truncated_or_foreign_checkpoints_give_one_line_errors(tiny, tmp_path):
    out = tmp_path / "run"
    run(_config(tiny, steps=4, checkpoint_every=2), tiny["store"], out)
    folder = out / "checkpoints"
    good = folder / "step-0000004.pt"
    bad = folder / "step-0000099.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match="step-0000099.pt.*not a readable training checkpoint") as info:
        run(_config(tiny, steps=4), tiny["store"], out)
    assert "\n" not in str(info.value)
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"format": "x", "evil": Evil()}, bad)
    with pytest.raises(WeightsError, match="step-0000099.pt"):
        run(_config(tiny, steps=4), tiny["store"], out)
    assert not marker.exists()
    torch.save({"format": "something else"}, bad)
    with pytest.raises(WeightsError, match="not a segsort-unsup training checkpoint"):
        run(_config(tiny, steps=4), tiny["store"], out)
    bad.unlink()
    with pytest.raises(InputError, match=r"other settings or input \(lr\)"):
        run(_config(tiny, steps=4, lr=1e-3), tiny["store"], out)
    summary = run(_config(tiny, steps=6, lr=1e-3), tiny["store"], out, overwrite=True)
    assert summary.done == 6


def test_cut_must_be_a_stored_level(tiny, tmp_path):
    summary = run(_config(tiny, steps=2, cut=0.3), tiny["store"], tmp_path / "run")
    assert summary.ok
    with pytest.raises(InputError, match="available levels: 0.5, 0.3"):
        run(_config(tiny, steps=2, cut=0.7), tiny["store"], tmp_path / "run2")


# -- slow -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_mode_learns(tiny, tmp_path):
    cfg = _config(tiny, mode="full", steps=16, batch_size=2, crop=96, workers=1, head="conv3", lr=1e-3,
                  checkpoint_every=100)
    run(cfg, tiny["store"], tmp_path / "run")
    losses = _losses(tmp_path / "run")
    assert len(losses) == 16
    assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4]), losses
    model, prov = load_model(tmp_path / "run" / "model.pt")
    assert prov["mode"] == "full"


@pytest.mark.slow
def test_two_process_torchrun_follows_one_process(tiny, tmp_path):
    """Same global batch (4): 2 ranks x 2 vs 1 x 4. Tolerance: 1e-4 relative per step (fp32)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    common = ["--steps", "10", "--precision", "fp32", "--threads", "1", "--features-dir", str(tmp_path / "feat")]
    one = subprocess.run(_cli(tiny, tmp_path / "one", *common), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(29500 + os.getpid() % 1000)]
    cmd = _cli(tiny, tmp_path / "two", *common)
    two = subprocess.run(torchrun + ["-m", "segsort_unsup.cli"] + cmd[1:], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = np.array([m["loss"] for m in _metrics(tmp_path / "one")])
    b = np.array([m["loss"] for m in _metrics(tmp_path / "two")])
    assert len(a) == len(b) == 10
    np.testing.assert_allclose(b, a, rtol=1e-4)


def _label_pngs(bsds: Path, images: Path, root: Path) -> Path:
    """Class maps for the tiny set: the first annotator's BSDS regions (ids mod 6), at the photos' size."""
    from segsort_unsup.evaluate.inputs import load_ground_truth

    out = root / "labels"
    out.mkdir(exist_ok=True)
    for photo in sorted(images.glob("*.png")):
        seg = load_ground_truth(bsds / "groundTruth" / "test" / f"{photo.stem}.mat").segmentations[0]
        h, w = cv2.imread(str(photo)).shape[:2]
        cls = cv2.resize((seg % 6).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(out / photo.name), cls)
    return out


def test_supervised_counterpart_shares_the_feature_cache_and_learns(tiny, bsds, tmp_path):
    from segsort_unsup.train import data as D
    from segsort_unsup.io.store import StoreReader

    run(_config(tiny), tiny["store"], tmp_path / "unsup")  # fills the shared features store
    features = Path(tiny["features"])
    before = {p.name: p.stat().st_mtime_ns for p in features.iterdir()}
    labels = _label_pngs(bsds, tiny["images"], tmp_path)
    summary = run(_config(tiny, labels_dir=str(labels), ignore_label=255), tiny["store"], tmp_path / "sup")
    assert summary.ok and summary.done == 30
    assert {p.name: p.stat().st_mtime_ns for p in features.iterdir()} == before  # no second feature pass
    losses = _losses(tmp_path / "sup")
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    # the classes each cached map gets: the label PNG, flipped with the map, sampled at floor(i * H / h)
    samples, _ = D.list_samples(tiny["store"], images=tiny["images"], labels=labels)
    paths = {s.key: s.label for s in samples}
    with StoreReader(features, kind="features") as reader:
        keys = reader.keys()
        data = D.FeatureBatches(features, [], {}, seed=0, batch=1, rank=0, world=1, cells=12, ignore_label=255,
                                labels=paths)
        for key in keys:
            item = reader.read(key)
            h, w = item.arrays["segments"].shape
            cls = cv2.imread(paths[item.attrs["image"]], cv2.IMREAD_UNCHANGED).astype(np.int32)
            if item.attrs["flip"]:
                cls = cls[:, ::-1]
            ys = np.arange(h) * cls.shape[0] // h
            xs = np.arange(w) * cls.shape[1] // w
            np.testing.assert_array_equal(data._read(key).arrays["labels"], cls[ys][:, xs])


def test_label_map_of_another_size_is_skipped_naming_it(tiny, bsds, tmp_path):
    labels = _label_pngs(bsds, tiny["images"], tmp_path)
    bad = sorted(labels.glob("*.png"))[0]
    cv2.imwrite(str(bad), np.zeros((10, 12), np.uint8))
    summary = run(_config(tiny, labels_dir=str(labels), ignore_label=255, steps=2), tiny["store"], tmp_path / "sup")
    h, w = cv2.imread(str(tiny["images"] / bad.name)).shape[:2]
    assert summary.failed == [(bad.stem, f"{bad}: label map is 12x10, its segments {w}x{h}")]
    assert summary.done == 2


# -- non-finite training --------------------------------------------------------------------------
def test_non_finite_learning_rate_is_refused_in_one_line(tiny, tmp_path):
    for value in ("inf", "nan"):
        proc = subprocess.run(_cli(tiny, tmp_path / "run", "--lr", value), cwd=REPO, env=_env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [f"Error: key 'lr': {value} is not a finite number"]
    assert not (tmp_path / "run" / "model.pt").exists()
    with pytest.raises(InputError, match="kappa"):
        _config(tiny, kappa=float("inf"))
    with pytest.raises(InputError, match="feature_scales"):
        _config(tiny, feature_scales=(1.0, float("nan")))


def test_a_non_finite_loss_stops_training_keeping_the_last_good_checkpoint(tiny, tmp_path):
    from segsort_unsup.train.stage import TrainingDiverged, load_checkpoint

    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+ .*lower --lr") as info:
        run(_config(tiny, lr=1e12, steps=30, checkpoint_every=1, keep=30), tiny["store"], out)
    assert "\n" not in str(info.value)
    assert not (out / "model.pt").exists()
    kept = sorted((out / "checkpoints").glob("step-*.pt"))
    assert kept, "no good checkpoint before the divergence"
    assert f"({kept[-1].name}) is kept" in str(info.value)
    for path in kept:
        assert all(torch.isfinite(v).all() for v in load_checkpoint(path)["model"].values())
    assert all(np.isfinite(_losses(out)))


# -- class labels ---------------------------------------------------------------------------------
def test_palette_label_pngs_are_read_as_their_indices(tmp_path):
    """PASCAL VOC labels are palette PNGs: training reads the indices, as embed and evaluate do."""
    from PIL import Image

    from segsort_unsup.train import data as D
    from segsort_unsup.io.images import read_label_png

    indices = np.array([[0, 1, 2], [3, 4, 5]], np.uint8)
    png = tmp_path / "label.png"
    im = Image.fromarray(indices, mode="P")
    im.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128, 128, 0, 128] + [0] * (250 * 3))
    im.save(png)
    assert Image.open(png).mode == "P"
    np.testing.assert_array_equal(D.classes_on_grid(png, (2, 3), flip=False)[0], indices)
    np.testing.assert_array_equal(D.classes_on_grid(png, (2, 3), flip=True)[0], indices[:, ::-1])
    np.testing.assert_array_equal(read_label_png(png), indices)  # the package's one reader
    assert not hasattr(D, "read_label_png") or D.read_label_png is read_label_png


# -- the run folder: locks, grown inputs, full disks, leftovers -----------------------------------
def test_a_second_train_into_a_running_folder_is_refused_and_the_first_is_unharmed(tiny, reference, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(_cli(tiny, out), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (out / "metrics.jsonl").exists() and first.poll() is None:
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # held mid-run while the second one starts
    try:
        assert first.poll() is None, "the first run ended before the second started"
        second = subprocess.run(_cli(tiny, out, "--overwrite"), cwd=REPO, env=_env(), capture_output=True, text=True,
                                timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1].endswith(
        "another segsort-unsup train is using this run folder; wait for it to end or choose another -o folder")
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    _assert_same_weights(reference / "model.pt", out / "model.pt")
    assert _losses(out) == _losses(reference)


def test_a_grown_input_is_refused_by_the_command_and_retrained_by_pipelines(tiny, tmp_path):
    from segsort_unsup.ucm.stage import UcmConfig
    from segsort_unsup.ucm.stage import run as run_ucm

    edges = tmp_path / "edges"
    edges.mkdir()
    photos = sorted((tiny["root"] / "edges").glob("*.png"))
    for path in photos[:3]:
        shutil.copy(path, edges / path.name)
    store = tmp_path / "segments"
    run_ucm(UcmConfig(levels=(0.3,)), edges, store)
    cfg = _config(tiny, steps=2, features_dir=str(tmp_path / "features"))
    run(cfg, store, tmp_path / "run")
    assert load_model(tmp_path / "run" / "model.pt")[1]["images"] == 3
    shutil.copy(photos[3], edges / photos[3].name)
    run_ucm(UcmConfig(levels=(0.3,)), edges, store)  # the segments store grows by one item
    with pytest.raises(InputError, match="segments_contents: items of the segments store added, removed or recomputed"):
        run(cfg, store, tmp_path / "run")
    again = run(cfg, store, tmp_path / "run", overwrite="changed")
    assert again.done == 2 and again.skipped == 0
    assert load_model(tmp_path / "run" / "model.pt")[1]["images"] == 4


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tiny, tmp_path, monkeypatch):
    import segsort_unsup.train.stage as T
    from segsort_unsup.io.atomic import DiskFullError, atomic_path

    out = tmp_path / "run"
    run(_config(tiny, steps=4, checkpoint_every=2), tiny["store"], out)
    (out / "model.pt").unlink()
    (out / "checkpoints" / "step-0000004.pt").unlink()

    def onto_a_full_disk(path, data):  # the kernel's own ENOSPC, from /dev/full
        with atomic_path(path), open("/dev/full", "wb") as fh:
            fh.write(data)

    monkeypatch.setattr(T, "atomic_write_bytes", onto_a_full_disk)
    with pytest.raises(DiskFullError, match=r"step-0000004\.pt: no space left on the device") as info:
        run(_config(tiny, steps=4, checkpoint_every=2), tiny["store"], out)
    assert "\n" not in str(info.value)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002.pt"]


def test_temporaries_of_a_run_killed_while_saving_are_cleaned(tiny, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    stale = [out / "checkpoints" / ".step-0000003.pt.4242.tmp", out / ".model.pt.4242.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    run(_config(tiny, steps=2), tiny["store"], out)
    assert not any(path.exists() for path in stale)
    assert not list(out.rglob("*.tmp"))


def test_the_feature_pass_skips_bad_images_but_surfaces_bugs(tiny, tmp_path, monkeypatch):
    from segsort_unsup.train import features as F

    def broken(*args, **kwargs):
        raise TypeError("a programming error")

    monkeypatch.setattr(F, "compute_features", broken)
    with pytest.raises(TypeError, match="a programming error"):
        run(_config(tiny, steps=2, features_dir=str(tmp_path / "features")), tiny["store"], tmp_path / "run")


@pytest.mark.parametrize(("device", "backend"), [("cpu", "gloo"), ("cuda", "nccl")])
def test_the_process_group_has_an_explicit_timeout(monkeypatch, device, backend):
    """Rank 0 runs the whole feature pass while the others wait: the default 10/30 min would end the run."""
    import torch.distributed as dist

    import segsort_unsup.train.stage as T

    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroyed"))
    with T._process_group(2, torch.device(device, 0) if device == "cuda" else torch.device(device)):
        pass
    assert calls == [(backend, {"timeout": T.DIST_TIMEOUT}), "destroyed"]
    assert T.DIST_TIMEOUT.total_seconds() >= 3600


def test_fp16_training_steps_through_the_loss_scaler(tiny, tmp_path):
    from segsort_unsup.train.stage import load_checkpoint

    def last_checkpoint(precision: str) -> dict:
        out = tmp_path / precision
        cfg = _config(tiny, steps=3, precision=precision, device="cpu", features_dir=str(tmp_path / "features"))
        assert run(cfg, tiny["store"], out).done == 3
        return load_checkpoint(sorted((out / "checkpoints").glob("step-*.pt"))[-1])

    scaler = last_checkpoint("fp16")["scaler"]
    assert scaler["scale"] == 65536.0 and scaler["_growth_tracker"] == 3  # three finite scaled steps
    assert last_checkpoint("bf16")["scaler"] == {}  # bf16 needs none


def test_a_long_run_says_how_long_and_how_to_shorten_it(tiny, tmp_path, monkeypatch, caplog):
    import segsort_unsup.train.stage as T

    monkeypatch.setattr(T, "LONG_RUN_SECONDS", 0.0)  # every run counts as long
    began = time.perf_counter()
    with caplog.at_level("INFO", logger="segsort_unsup"):
        run(_config(tiny, steps=24, checkpoint_every=100), tiny["store"], tmp_path / "run")
    per_step = (time.perf_counter() - began) / 24
    lines = [r.getMessage() for r in caplog.records if "left for" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "left for 20 steps" in lines[0] and "--steps" in lines[0] and "--crop (now 96)" in lines[0]
    estimate = float(lines[0].split("(")[1].split(" s a step")[0])
    assert 0 < estimate < 5 * per_step  # the run's own steps, not a guess (setup included in per_step)


def test_supervised_crops_carry_the_whole_images_sorting_grid_and_locations(tiny, bsds, tmp_path):
    """As the released reader: the 5x5 initial cells and (y/H, x/W) are made on the whole image,
    then scaled, flipped and cropped with it (NumPy restatement of its formulas below)."""
    from segsort_unsup.train import data as D
    from segsort_unsup.train.features import feature_jobs

    labels = _label_pngs(bsds, tiny["images"], tmp_path)
    run(_config(tiny, steps=1), tiny["store"], tmp_path / "unsup")  # the shared features store
    samples, _ = D.list_samples(tiny["store"], images=tiny["images"], labels=labels)
    paths = {s.key: s.label for s in samples}
    keys = [j.key for j in feature_jobs(samples, (1.0,), flip=True)]
    data = D.FeatureBatches(tiny["features"], sorted(paths), {k: [j for j in keys if j.startswith(k + "@")]
                                                              for k in paths},
                            seed=3, batch=4, rank=0, world=1, cells=12, ignore_label=255, labels=paths)
    for step in range(3):
        batch = data[step]
        for i in range(4):
            index = step * 4 + i
            image = data.keys[D.sample_image(3, index, len(data.keys))]
            rng = D.sample_rng(3, index)
            options = data.variants[image]
            key = options[int(rng.integers(len(options)))]
            item = data._read(key)
            h, w = item.arrays["segments"].shape
            big_h, big_w = cv2.imread(paths[image], cv2.IMREAD_UNCHANGED).shape
            y0 = int(rng.integers(0, max(h - 12, 0) + 1))
            x0 = int(rng.integers(0, max(w - 12, 0) + 1))
            ys = (np.arange(h) * big_h // h)[y0:y0 + 12]
            xs = np.arange(w) * big_w // w
            if item.attrs["flip"]:
                xs = big_w - 1 - xs
            xs = xs[x0:x0 + 12]
            cells = (ys[:, None] // -(-big_h // 5)) + 5 * (xs[None, :] // -(-big_w // 5))  # released grid ids
            ch, cw = len(ys), len(xs)
            np.testing.assert_array_equal(batch["init"][i, :ch, :cw].numpy(), cells)
            np.testing.assert_array_equal(batch["yx"][i, 0, :ch, :cw].numpy(), np.broadcast_to(ys[:, None], (ch, cw)))
            np.testing.assert_array_equal(batch["yx"][i, 1, :ch, :cw].numpy(), np.broadcast_to(xs[None, :], (ch, cw)))
            assert batch["image_size"][i].tolist() == [big_h, big_w]
    summary = run(_config(tiny, labels_dir=str(labels), steps=3), tiny["store"], tmp_path / "sup")
    assert summary.ok and summary.done == 3


def test_full_mode_supervised_crops_carry_cells_and_locations_of_the_whole_photo(tiny, bsds, tmp_path):
    """Scaled, cropped and flipped together: at every unpadded pixel the initial cell is the released
    grid's cell of that pixel's (y, x) in the whole photo, and training on them runs."""
    from segsort_unsup.train import data as D

    labels = _label_pngs(bsds, tiny["images"], tmp_path)
    samples, _ = D.list_samples(tiny["store"], images=tiny["images"], labels=labels)
    data = D.PhotoBatches(samples, seed=0, batch=4, rank=0, world=1, crop=160, scale_range=(0.5, 2.0), flip=True,
                          grouping=("labels", None), ignore_label=255)
    flipped = 0
    for step in range(3):
        batch = data[step]
        for i in range(4):
            big_h, big_w = batch["image_size"][i].tolist()
            real = batch["segments"][i].numpy() != -1  # PAD_SEGMENT marks the padding
            y, x = batch["yx"][i, 0].numpy()[real], batch["yx"][i, 1].numpy()[real]
            assert y.max() < big_h and x.max() < big_w
            cells = y // -(-big_h // 5) + 5 * (x // -(-big_w // 5))
            np.testing.assert_array_equal(batch["init"][i].numpy()[real], cells)
            row = batch["yx"][i, 1, 0].numpy()[real[0]]
            flipped += bool(len(row) > 1 and row[0] > row[-1])
    assert flipped, "no flipped crop among 12: the test checks nothing about flips"
    summary = run(_config(tiny, mode="full", labels_dir=str(labels), steps=2, batch_size=2, crop=64, workers=0),
                  tiny["store"], tmp_path / "run")
    assert summary.ok and summary.done == 2 and all(np.isfinite(_losses(tmp_path / "run")))
