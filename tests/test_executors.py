"""Executors: the same stores from in-process, local processes and a real Dask LocalCluster;
a Dask worker killed mid-run; no orphan processes after the parent is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from segsort_unsup.contours import stage as contours
from segsort_unsup.errors import InputError
from segsort_unsup.io.store import INDEX_NAME, StoreReader
from segsort_unsup.parallel import InProcess, ProcessPool, make_executor
from segsort_unsup.ucm import stage as ucm

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 24
TIMING_ATTRS = set()  # no stored attr depends on timing; listed here should one ever do


def _square_or_die(x: int) -> int:
    if x == 3:
        os._exit(1)  # a hard crash, as a segfault or an OOM kill would be
    if x == 5:
        raise ValueError("bad item 5")
    return x * x


def test_in_process_failures_are_per_item():
    out = {o.item: o for o in InProcess().map(_square_or_die, [1, 2, 5])}
    assert out[1].result == 1 and out[2].result == 4
    assert isinstance(out[5].error, ValueError)


def test_dead_worker_fails_only_its_item():
    out = {o.item: o for o in ProcessPool(2).map(_square_or_die, range(10))}
    assert sorted(out) == list(range(10))
    assert "worker process died" in str(out[3].error)
    assert isinstance(out[5].error, ValueError)
    assert all(out[i].result == i * i for i in range(10) if i not in (3, 5))


_SETTING = {"value": None}


def _set(value: str) -> None:
    _SETTING["value"] = value


def _pid_setting_readers(store: str | None) -> tuple[int, str | None, int]:
    """In a worker: its pid, what this map's initializer set, and how many readers were open before
    this item (then one of ``store`` is opened and kept, as stages read their inputs)."""
    from segsort_unsup.io import store as stores

    before = len(stores._READERS)
    if store is not None:
        stores.cached_reader(store)
    return os.getpid(), _SETTING["value"], before


def test_pool_workers_serve_every_map_each_starting_fresh(tmp_path):
    """A pipeline's stages share the pool's processes (torch is imported once per worker, not per
    stage); each map runs its own initializer there and finds no reader of the map before open."""
    from segsort_unsup.io.store import Item, StoreWriter

    with StoreWriter(tmp_path / "s", kind="test", config={}) as writer:
        writer.add(Item("a", {"x": np.zeros(2)}))
    with ProcessPool(2) as pool:
        first = [o.result for o in pool.map(_pid_setting_readers, [str(tmp_path / "s")] * 8,
                                            initializer=_set, initargs=("first",))]
        second = [o.result for o in pool.map(_pid_setting_readers, [None] * 8, initializer=_set,
                                             initargs=("second",))]
        crashed = {o.item: o for o in pool.map(_square_or_die, range(6))}  # a worker dies: a new pool
        third = [o.result for o in pool.map(_pid_setting_readers, [None] * 4)]
    assert {r[1] for r in first} == {"first"} and {r[1] for r in second} == {"second"}
    assert {r[0] for r in second} == {r[0] for r in first} and len({r[0] for r in first}) <= 2
    assert max(r[2] for r in first) == 1  # a worker's second item of a map finds the reader it kept
    assert {r[2] for r in second} == {0}  # closed when the next map began
    assert "worker process died" in str(crashed[3].error) and crashed[4].result == 16
    assert not {r[0] for r in third} & {r[0] for r in first} and {r[1] for r in third} == {None}  # new processes


def _pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def test_pool_interrupted_map_stops_its_workers_and_the_next_map_starts_new_ones():
    with ProcessPool(2) as pool:
        outcomes = pool.map(_pid_after, [0] + [0.2] * 19)
        first = next(outcomes).result
        with pytest.raises(KeyboardInterrupt):
            outcomes.throw(KeyboardInterrupt)  # as Ctrl-C inside a stage
        with pytest.raises(ProcessLookupError):
            for _ in range(100):  # killed, not left to finish the items nobody will record
                os.kill(first, 0)
                time.sleep(0.05)
        assert first not in {o.result for o in pool.map(_pid_after, [0] * 4)}


def test_pool_closed_while_its_caller_left_a_map_mid_way_stops_the_workers_at_once():
    """Ctrl-C while the caller saves a result: the map is left suspended, and closing the executor
    must not wait for the items still in flight."""
    pool = ProcessPool(2)
    outcomes = pool.map(_pid_after, [0, 60, 60])  # kept referenced: not closed by the garbage collector
    first = next(outcomes).result
    started = time.perf_counter()
    pool.close()
    assert time.perf_counter() - started < 10
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.kill(first, 0)
            time.sleep(0.05)
    later = pool.map(_pid_after, [0.5] * 4)
    worker = next(later).result
    outcomes.close()  # the abandoned map ends only now: the next map's workers are not its to stop
    assert worker in {o.result for o in later}  # the same workers went on with the next map's items
    pool.close()


def test_pool_released_while_idle_starts_new_workers_at_the_next_map():
    with ProcessPool(2) as pool:
        before = {o.result for o in pool.map(_pid_after, [0] * 4)}
        pool.release_idle()
        for pid in before:  # gone: their memory is the calling process's stage's again
            with pytest.raises(ProcessLookupError):
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.05)
        assert not before & {o.result for o in pool.map(_pid_after, [0] * 4)}


def test_executor_choices_are_checked():
    assert isinstance(make_executor("local", workers=1), InProcess)
    assert isinstance(make_executor("local", workers=2), ProcessPool)
    with pytest.raises(InputError, match="needs --scheduler"):
        make_executor("dask")
    with pytest.raises(InputError, match="goes with --executor dask"):
        make_executor("local", scheduler="tcp://x:1")
    with pytest.raises(InputError, match="unknown executor"):
        make_executor("spark")


def _images(bsds: Path) -> list[str]:
    return [str(p) for p in sorted((bsds / "images" / "test").glob("*.jpg"))[:N_IMAGES]]


def _assert_same_stores(a: Path, b: Path, n: int = N_IMAGES) -> None:
    with StoreReader(a) as ra, StoreReader(b) as rb:
        assert ra.keys() == rb.keys() and len(ra) == n
        assert ra.config_hash == rb.config_hash
        for key in ra.keys():
            ia, ib = ra[key], rb[key]
            assert set(ia.arrays) == set(ib.arrays)
            for name in ia.arrays:
                np.testing.assert_array_equal(ia.arrays[name], ib.arrays[name], err_msg=f"{key} {name}")
            drop = lambda attrs: {k: v for k, v in attrs.items() if k not in TIMING_ATTRS}  # noqa: E731
            assert drop(ia.attrs) == drop(ib.attrs), key


def _keys_per_shard(store: Path) -> list[str]:
    keys = []
    for line in (store / INDEX_NAME).read_text().splitlines():
        keys.extend(json.loads(line)["keys"])
    return keys


@pytest.fixture(scope="module")
def local_stores(tmp_path_factory, bsds, pidinet_dir):
    """contours + ucm over 24 BSDS500 images on 2 local processes (the reference for Dask)."""
    root = tmp_path_factory.mktemp("local")
    config = contours.ContoursConfig(model="pidinet-tiny", weights=str(pidinet_dir / "table5_pidinet-tiny.pth"),
                                     device="cpu", shard_size=5)
    with ProcessPool(2) as pool:
        assert contours.run(config, _list(root, bsds), root / "contours", executor=pool).ok
        assert ucm.run(ucm.UcmConfig(shard_size=5), root / "contours", root / "segments", executor=pool).ok
    return root, config


def _list(root: Path, bsds: Path) -> str:
    path = root / "images.txt"
    path.write_text("".join(f"{p}\n" for p in _images(bsds)))
    return str(path)


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_stores(tmp_path, bsds, local_stores):
    reference, config = local_stores
    with make_executor("dask-local", workers=2) as dask:
        assert dask.distributed and dask.workers == 2
        first = contours.run(config, _list(tmp_path, bsds), tmp_path / "contours", executor=dask)
        assert first.ok and first.done == N_IMAGES
        second = ucm.run(ucm.UcmConfig(shard_size=5), tmp_path / "contours", tmp_path / "segments", executor=dask)
        assert second.ok and second.done == N_IMAGES
    _assert_same_stores(reference / "contours", tmp_path / "contours")
    _assert_same_stores(reference / "segments", tmp_path / "segments")
    # and in-process (batched loop) gives them too, for ucm (contours' batched path is checked elsewhere)
    assert ucm.run(ucm.UcmConfig(), reference / "contours", tmp_path / "inproc", executor=InProcess()).ok
    _assert_same_stores(reference / "segments", tmp_path / "inproc")


@pytest.mark.slow
def test_killed_dask_worker_loses_nothing_and_duplicates_nothing(tmp_path, local_stores):
    reference, _ = local_stores
    out = tmp_path / "segments"
    with make_executor("dask-local", workers=2) as dask:
        pids = dask.client.run(os.getpid)
        result: dict = {}

        def work():
            result["summary"] = ucm.run(ucm.UcmConfig(shard_size=1), reference / "contours", out, executor=dask)

        thread = threading.Thread(target=work)
        thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(out.glob("part-*.h5"))) < 2:
            time.sleep(0.05)
        victim = next(iter(pids.values()))
        os.kill(victim, signal.SIGKILL)
        thread.join(timeout=600)
    summary = result["summary"]
    assert summary.ok and summary.done == N_IMAGES, summary.line()
    keys = _keys_per_shard(out)
    assert sorted(keys) == sorted(set(keys)) and len(keys) == N_IMAGES  # every item exactly once
    _assert_same_stores(reference / "segments", out)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_killed_parent_leaves_no_worker_processes(tmp_path, local_stores):
    reference, _ = local_stores
    proc = subprocess.Popen([sys.executable, "-m", "segsort_unsup.cli", "-q", "ucm", str(reference / "contours"),
                             "-o", str(tmp_path / "seg"), "--workers", "2"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    workers: set[int] = set()
    while time.monotonic() < deadline and len(workers) < 2:  # 2 workers (+ the resource tracker)
        workers = _descendants(proc.pid)
        time.sleep(0.1)
    assert len(workers) >= 2, workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)]


def _declared_extras() -> dict[str, list[str]]:
    import tomllib

    with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["optional-dependencies"]


def test_the_dask_hint_names_an_extra_that_installs_distributed(monkeypatch):
    import re

    from segsort_unsup import parallel

    monkeypatch.setitem(sys.modules, "distributed", None)  # as on a machine without it
    with pytest.raises(InputError) as info:
        parallel.make_executor("dask-local", workers=1)
    hint = re.search(r"pip install 'segsort-unsup\[(\w+)\]'", str(info.value))
    assert hint, str(info.value)
    extra = _declared_extras().get(hint.group(1))
    assert extra is not None, f"pyproject declares no extra {hint.group(1)!r}"
    assert any(re.match(r"dask\[.*distributed.*\]", req) or req.startswith("distributed") for req in extra), extra


def test_the_built_package_provides_the_dask_extra(tmp_path):
    """What pip reads: the wheel's metadata, built from a copy of the tracked files."""
    import shutil
    import zipfile

    pytest.importorskip("setuptools")
    repo = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    for name in tracked.stdout.splitlines():
        if (repo / name).is_file():
            (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, tmp_path / "src" / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheel"), str(tmp_path / "src")], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "Provides-Extra: dask" in metadata
    assert any(line.startswith("Requires-Dist: dask[distributed]") and 'extra == "dask"' in line
               for line in metadata.splitlines()), metadata


@pytest.mark.slow
def test_the_default_model_gives_the_same_bits_in_every_executor(tmp_path, bsds, pidinet_dir):
    """pidinet at its default precision (bf16 on CPUs with AVX512-BF16/AMX): torch splits reductions by
    thread count, so every inference call uses the same threads whatever the executor."""
    images = tmp_path / "images.txt"
    images.write_text("".join(f"{p}\n" for p in _images(bsds)[:4]))
    config = contours.ContoursConfig(model="pidinet", weights=str(pidinet_dir / "table5_pidinet.pth"),
                                     device="cpu", resize_to=192, shard_size=2)
    executors = {"inprocess": InProcess(), "pool": ProcessPool(2), "dask": make_executor("dask-local", workers=2)}
    for name, executor in executors.items():
        with executor:
            assert contours.run(config, str(images), tmp_path / name / "contours", executor=executor).ok
            assert ucm.run(ucm.UcmConfig(), tmp_path / name / "contours", tmp_path / name / "segments",
                           executor=executor).ok
    for name in ("pool", "dask"):
        _assert_same_stores(tmp_path / "inprocess" / "contours", tmp_path / name / "contours", n=4)
        _assert_same_stores(tmp_path / "inprocess" / "segments", tmp_path / name / "segments", n=4)
