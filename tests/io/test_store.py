"""Stores: round trip, resume, schema, index, stacked reads, and every way a store could lie."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from segsort_unsup.errors import StoreError
from segsort_unsup.io.atomic import DiskFullError
from segsort_unsup.io.store import (
    INDEX_NAME,
    PROTOTYPES,
    QUARANTINE_DIR,
    Item,
    StoreReader,
    StoreWriter,
    is_store,
    read_failures,
)


def _item(i: int) -> Item:
    return Item(f"dir/img{i}", {"edge": np.full((3, 4), i, np.float32), "tree": np.arange(i + 3, dtype=np.int32)},
                {"source": f"/x/img{i}.jpg"})


def _write(root, n=5, shard_size=2, config=None):
    with StoreWriter(root, kind="k", config=config or {"a": 1}, shard_size=shard_size) as w:
        for i in range(n):
            w.add(_item(i))


def test_roundtrip_and_resume(tmp_path):
    root = tmp_path / "store"
    _write(root)
    reader = StoreReader(root, kind="k", required=("edge",))
    assert reader.keys() == [f"dir/img{i}" for i in range(5)]
    item = reader["dir/img3"]
    assert item.arrays["edge"][0, 0] == 3 and item.attrs["source"] == "/x/img3.jpg"
    reader.close()
    assert is_store(root) and not is_store(tmp_path)
    with StoreWriter(root, kind="k", config={"a": 1}) as w:
        assert w.completed == {f"dir/img{i}" for i in range(5)}
    with pytest.raises(StoreError, match=r"another configuration \(differs in: a\)"):
        StoreWriter(root, kind="k", config={"a": 2})
    with pytest.raises(StoreError, match="holds a 'k' store"):
        StoreWriter(root, kind="segments", config={"a": 1})
    with StoreWriter(root, kind="k", config={"a": 2}, overwrite=True) as w:
        assert not w.completed
    with StoreWriter(root, kind="k", config={"a": 3}, overwrite="changed") as w:
        assert w.replaced_keys == ["a"]
    assert not (root / ".lock").exists()  # a finished run leaves no lock file


def test_index_lists_every_shard_and_stack_reads_a_table(tmp_path):
    root = tmp_path / "store"
    _write(root, n=5, shard_size=2)
    lines = [json.loads(line) for line in (root / INDEX_NAME).read_text().splitlines()]
    assert [len(line["keys"]) for line in lines] == [2, 2, 1]
    with StoreReader(root) as reader:
        stacked, failed = reader.stack("tree")
    assert not failed and stacked.keys == [f"dir/img{i}" for i in range(5)]
    assert stacked.offsets.tolist() == [0, 3, 7, 12, 18, 25]
    np.testing.assert_array_equal(stacked.rows("dir/img2"), np.arange(5))


def test_schema_checks_names_dtypes_and_dims(tmp_path):
    good = {"prototypes": np.zeros((3, 8), np.float32), "segments": np.zeros((4, 4), np.int32),
            "area": np.ones(3, np.int64), "bbox": np.zeros((3, 4), np.int32)}
    with StoreWriter(tmp_path / "p", kind=PROTOTYPES.kind, config={}) as w:
        w.add(Item("a", good))
        with pytest.raises(ValueError, match="'prototypes' is float64 with 2 dims; the schema says float32"):
            w.add(Item("b", {**good, "prototypes": np.zeros((3, 8))}))
        with pytest.raises(ValueError, match="lacks datasets"):
            w.add(Item("c", {"prototypes": good["prototypes"]}))
        with pytest.raises(ValueError, match="not in the prototypes schema"):
            w.add(Item("d", {**good, "extra": np.zeros(2, np.float32)}))


def test_lock_refuses_second_writer(tmp_path):
    with StoreWriter(tmp_path / "s", kind="k", config={}):
        with pytest.raises(StoreError, match="another segsort-unsup run"):
            StoreWriter(tmp_path / "s", kind="k", config={})


_SLOW_WRITER = """
import sys, time, numpy as np
from segsort_unsup.io.store import Item, StoreWriter
with StoreWriter(sys.argv[1], kind="k", config={"scale": 1}, shard_size=1) as w:
    print("locked", flush=True)
    for i in range(6):
        time.sleep(0.3)
        w.add(Item(f"i{i}", {"x": np.full(4, i, np.float32)}))
"""


def test_overwrite_waits_for_the_lock_and_never_mixes_configurations(tmp_path):
    """Issue: --overwrite deleted the store before taking the lock, so two runs wrote one store."""
    root = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(StoreError, match="another segsort-unsup run"):
        StoreWriter(root, kind="k", config={"scale": 0.5}, overwrite=True)
    assert proc.wait(timeout=30) == 0
    with StoreReader(root) as reader:  # the first run's store is whole and says what it holds
        assert reader.config == {"scale": 1} and len(reader) == 6
    with StoreWriter(root, kind="k", config={"scale": 0.5}, overwrite=True) as w:
        assert not w.completed


def test_overwrite_refuses_another_kind_and_foreign_folders(tmp_path):
    _write(tmp_path / "s")
    with pytest.raises(StoreError, match="never replaces another kind"):
        StoreWriter(tmp_path / "s", kind="contours", config={}, overwrite=True)
    assert len(StoreReader(tmp_path / "s")) == 5
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(StoreError, match="not empty and is not a segsort-unsup store"):
        StoreWriter(tmp_path / "photos", kind="k", config={}, overwrite=True)
    assert (tmp_path / "photos" / "a.jpg").exists()


def test_shards_without_manifest_are_not_adopted(tmp_path):
    _write(tmp_path / "s")
    (tmp_path / "s" / "store.json").unlink()
    with pytest.raises(StoreError, match=r"holds 3 shard\(s\) but no store.json"):
        StoreWriter(tmp_path / "s", kind="k", config={"a": 1})


@pytest.mark.parametrize("content", ["[1, 2, 3]", "{not json", '{"kind": "k", "format_version": 99}'])
def test_bad_manifest_is_one_clear_error(tmp_path, content):
    _write(tmp_path / "s")
    (tmp_path / "s" / "store.json").write_text(content)
    with pytest.raises(StoreError, match="store.json|store format"):
        StoreReader(tmp_path / "s")
    with pytest.raises(StoreError):
        StoreWriter(tmp_path / "s", kind="k", config={"a": 1})


def _flip(path, offset, count=1):
    data = bytearray(path.read_bytes())
    for k in range(count):
        data[offset + k] ^= 0x5A
    path.write_bytes(bytes(data))


def _data_offset(shard, key, name):
    with h5py.File(shard, "r") as fh:
        ds = fh[key.replace("/", "%2F")][name]
        return ds.id.get_chunk_info(0).byte_offset


def test_flipped_bytes_in_a_small_dataset_are_detected(tmp_path):
    """Issue: small datasets had no checksum: flipped bytes were read back as wrong values."""
    root = tmp_path / "s"
    _write(root, n=2, shard_size=2)
    shard = next(root.glob("part-*.h5"))
    _flip(shard, _data_offset(shard, "dir/img1", "tree"), count=4)
    with StoreReader(root, verify=False) as reader:  # the dataset checksum alone catches it
        np.testing.assert_array_equal(reader["dir/img0"].arrays["tree"], np.arange(3))
        with pytest.raises(StoreError, match="'dir/img1' is damaged"):
            reader["dir/img1"]
    with StoreReader(root) as reader:  # and the shard's sha256 (so both items of the shard are refused)
        with pytest.raises(StoreError, match="'dir/img0' is damaged.*sha256"):
            reader["dir/img0"]
    with StoreReader(root, verify=False) as reader:
        np.testing.assert_array_equal(reader["dir/img0"].arrays["tree"], np.arange(3))
        with pytest.raises(StoreError, match="'dir/img1' is damaged"):
            reader["dir/img1"]
    with StoreWriter(root, kind="k", config={"a": 1}) as w:  # resume: the shard fails its sha256
        assert not w.completed and w.quarantined
    assert (root / QUARANTINE_DIR / shard.name).exists()
    assert "sha256" in (root / QUARANTINE_DIR / "reasons.tsv").read_text()


def test_damaged_metadata_and_truncation_never_hide_good_shards(tmp_path):
    root = tmp_path / "s"
    _write(root, n=6, shard_size=2)
    shards = sorted(root.glob("part-*.h5"))
    _flip(shards[0], 200, count=10)  # superblock / object headers
    shards[1].write_bytes(shards[1].read_bytes()[:1000])  # truncated
    (root / INDEX_NAME).unlink()  # no index: the reader must open the shards itself
    with StoreReader(root) as reader:
        assert len(reader.damaged) == 2 and reader.keys() == ["dir/img4", "dir/img5"]
    with StoreWriter(root, kind="k", config={"a": 1}) as w:
        assert w.completed == {"dir/img4", "dir/img5"} and len(w.quarantined) == 2


def test_disk_full_before_a_shard(tmp_path, monkeypatch):
    import segsort_unsup.io.store as store

    root = tmp_path / "s"
    _write(root, n=2)
    monkeypatch.setattr(store.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1000))
    w = StoreWriter(root, kind="k", config={"a": 1}, shard_size=1)
    with pytest.raises(DiskFullError, match="no space left.*MiB needed"):
        w.add(_item(7))
    w.close()
    assert not list(root.glob(".*.tmp"))


def test_disk_full_during_a_shard_removes_the_temporary_file(tmp_path, monkeypatch):
    root = tmp_path / "s"
    _write(root, n=2)
    real = h5py.Group.create_dataset

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.Group, "create_dataset", full)
    w = StoreWriter(root, kind="k", config={"a": 1}, shard_size=1)
    with pytest.raises(DiskFullError, match=str(root)):
        w.add(_item(7))
    monkeypatch.setattr(h5py.Group, "create_dataset", real)
    w.close()
    assert not list(root.glob(".*.tmp"))
    with StoreWriter(root, kind="k", config={"a": 1}) as w:  # resumable
        assert len(w.completed) == 2


def test_disk_full_on_a_real_small_filesystem(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); the fault-injection tests cover this")
    try:
        w = StoreWriter(mnt / "s", kind="k", config={}, shard_size=1)
        rng = np.random.default_rng(0)
        with pytest.raises(DiskFullError):
            for i in range(100):
                w.add(Item(f"i{i}", {"x": rng.random((128, 128))}))
        w.close()
        assert not list((mnt / "s").glob(".*.tmp"))
        with StoreReader(mnt / "s") as reader:
            assert len(reader) >= 1 and not reader.damaged
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_failures_tsv_has_a_header_escapes_and_no_duplicates(tmp_path):
    root = tmp_path / "s"
    for _ in range(2):
        with StoreWriter(root, kind="k", config={}) as w:
            w.record_failure("a\tb\nc", "bad\tthing")
            w.record_failure("plain", "reason")
    lines = (root / "failures.tsv").read_text().splitlines()
    assert lines[0] == "time\tkey\treason" and len(lines) == 3
    assert read_failures(root) == {"a\tb\nc": (read_failures(root)["a\tb\nc"][0], "bad thing"),
                                   "plain": (read_failures(root)["plain"][0], "reason")}
    with StoreWriter(root, kind="k", config={}) as w:  # a later success clears the failure
        w.add(Item("plain", {"x": np.zeros(2, np.float32)}))
    assert "plain" not in read_failures(root)


def test_environment_errors_name_the_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="exists and is not a folder"):
        StoreWriter(tmp_path / "file", kind="k", config={})
    with pytest.raises(StoreError, match="is a file, not a folder"):
        StoreWriter(tmp_path / "file" / "store", kind="k", config={})
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(StoreError, match="permission denied"):
            StoreWriter(ro / "s", kind="k", config={})


def test_killed_writer_leaves_readable_store(tmp_path):
    """SIGKILL a writer mid-run: complete shards stay readable and the rest is redone."""
    root = tmp_path / "store"
    script = textwrap.dedent(
        f"""
        import time, numpy as np
        from segsort_unsup.io.store import Item, StoreWriter
        with StoreWriter({str(root)!r}, kind="k", config={{}}, shard_size=3) as w:
            for i in range(10_000):
                w.add(Item(f"i{{i}}", {{"x": np.random.rand(64, 64)}}))
                if i == 7:
                    print("ready", flush=True)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reader = StoreReader(root)
    n = len(reader)
    assert n >= 6 and n % 3 == 0 and not reader.damaged
    for key in reader.keys():
        assert reader[key].arrays["x"].shape == (64, 64)
    with StoreWriter(root, kind="k", config={}) as w:
        assert len(w.completed) == n
        assert not list(root.glob(".part-*.tmp"))


def test_a_shard_renamed_but_not_indexed_is_adopted(tmp_path):
    root = tmp_path / "s"
    _write(root, n=4, shard_size=2)
    lines = (root / INDEX_NAME).read_text().splitlines()
    (root / INDEX_NAME).write_text(lines[0] + "\n" + lines[1][:10])  # killed mid-append
    with StoreReader(root) as reader:
        assert len(reader) == 4
    with StoreWriter(root, kind="k", config={"a": 1}) as w:
        assert len(w.completed) == 4 and not w.quarantined


def test_store_from_version_0_1_still_opens(tmp_path):
    """A 0.1 store: format_version 1, no index, unchecked datasets."""
    root = tmp_path / "old"
    root.mkdir()
    (root / "store.json").write_text(json.dumps({"format_version": 1, "kind": "k", "config": {"a": 1},
                                                 "config_hash": "x", "meta": {}}))
    with h5py.File(root / "part-00000.h5", "w") as fh:
        group = fh.create_group("img0")
        group.attrs["key"] = "img0"
        group.create_dataset("x", data=np.arange(3))
    with StoreReader(root) as reader:
        np.testing.assert_array_equal(reader["img0"].arrays["x"], np.arange(3))


def test_fuzz_random_damage_never_gives_a_wrong_value(tmp_path, bsds):
    """200 random byte flips / truncations across the shards of a store of real image data: every
    read either equals the clean store or names the damaged item; nothing else ever happens."""
    from segsort_unsup.io.images import read_image

    clean = tmp_path / "clean"
    images = sorted((bsds / "images" / "val").glob("*.jpg"))[:6]
    with StoreWriter(clean, kind="k", config={}, shard_size=2) as w:
        for path in images:
            img = read_image(path)[::4, ::4]
            w.add(Item(path.stem, {"image": img, "mean": img.mean(axis=(0, 1)).astype(np.float32)},
                       {"source": str(path)}))
    with StoreReader(clean) as reader:
        truth = {k: reader[k].arrays for k in reader.keys()}
    rng = np.random.default_rng(0)
    counts = {"identical": 0, "named": 0, "lost_shard": 0}
    for trial in range(200):
        root = tmp_path / f"t{trial}"
        shutil.copytree(clean, root)
        shard = rng.choice(sorted(root.glob("part-*.h5")))
        data = bytearray(shard.read_bytes())
        if rng.random() < 0.2:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            for pos in rng.integers(0, len(data), size=int(rng.integers(1, 20))):
                data[pos] ^= int(rng.integers(1, 256))
        shard.write_bytes(bytes(data))
        with StoreReader(root) as reader:
            counts["lost_shard"] += len(reader.damaged)
            for key in reader.keys():
                try:
                    item = reader[key]
                except StoreError as exc:
                    assert key in str(exc)
                    counts["named"] += 1
                    continue
                for name, arr in truth[key].items():
                    np.testing.assert_array_equal(item.arrays[name], arr)
                counts["identical"] += 1
        with StoreWriter(root, kind="k", config={}) as w:  # resume trusts only verified shards
            with StoreReader(root) as reader:
                for key in w.completed:
                    for name, arr in truth[key].items():
                        np.testing.assert_array_equal(reader[key].arrays[name], arr)
        shutil.rmtree(root)
    print("fuzz outcomes:", counts)
    assert counts["identical"] > 0 and counts["named"] + counts["lost_shard"] > 0


def test_a_big_item_is_written_at_once_not_held_for_the_next(tmp_path):
    """A queued item whose arrays reach ``flush_bytes`` closes its shard at once: durable and out of
    memory before the next (possibly long) item starts; small items still share shards."""
    root = tmp_path / "store"
    small = _item(0)
    limit = 3 * sum(a.nbytes for a in small.arrays.values())
    big = Item("big", {"edge": np.ones((64, 64), np.float32), "tree": np.arange(3, dtype=np.int32)}, {})
    with StoreWriter(root, kind="k", config={}, shard_size=64, flush_bytes=limit) as w:
        w.add(_item(0))
        w.add(_item(1))
        assert not w.completed  # two small items stay queued
        w.add(big)
        assert w.completed == {"dir/img0", "dir/img1", "big"}
        with StoreReader(root, kind="k") as reader:  # durable while the writer is still open
            assert sorted(reader.keys()) == ["big", "dir/img0", "dir/img1"]
        w.add(_item(2))
        assert "dir/img2" not in w.completed
    with StoreReader(root, kind="k") as reader:
        assert len(reader) == 4


def test_a_distributed_chunk_of_big_items_writes_several_shards(tmp_path, monkeypatch):
    """run_chunk splits its shard when the items' bytes pass FLUSH_BYTES; every shard is registered."""
    from segsort_unsup import stages

    root = tmp_path / "store"
    monkeypatch.setattr(stages, "FLUSH_BYTES", 2 * sum(a.nbytes for a in _item(0).arrays.values()))
    with stages.StageRun("k", root, kind="k", identity={}) as run:
        task = stages.ChunkTask(_item_of_job, tuple(_Job(f"dir/img{i}") for i in range(5)) + (_Job("bad"),),
                                str(root), "part-abc-t00000.h5", "k", run.writer.epoch)
        result = stages.run_chunk(task)
        assert len(result.shards) == 3 and [k for k, _ in result.failed] == ["bad"]
        run.record_chunk(result)
    with StoreReader(root, kind="k") as reader:
        assert sorted(reader.keys()) == [f"dir/img{i}" for i in range(5)]


class _Job:
    def __init__(self, key):
        self.key = key


def _item_of_job(job):
    if job.key == "bad":
        raise ValueError("unreadable")
    return _item(int(job.key[-1]))


def _checked_square(order, item, n):
    """A deferred dataset's compute: records when it runs and what of its item is still held."""
    order.append(("computed", sorted(k for k, v in item.arrays.items() if v is not None)))
    return np.arange(n * n, dtype=np.int32).reshape(n, n)


def test_a_streamed_item_is_written_a_dataset_at_a_time(tmp_path):
    """A streamed item's deferred datasets are computed at write time, after the datasets before
    them were written and let go; the stored values are those a plain item gives."""
    from segsort_unsup.io.store import DeferredArray

    order: list = []
    big = np.ones((5, 5), np.float32)
    item = Item("a", {"edge": big, "tree": np.arange(3, dtype=np.int32)}, {"source": "x"}, stream=True)
    item.arrays["late"] = DeferredArray(_checked_square, (order, item, 4), (4, 4), np.dtype(np.int32))
    assert not order  # nothing computed before the write
    with StoreWriter(tmp_path / "s", kind="k", config={}) as w:
        w.add(item)
        assert w.completed == {"a"}  # a streamed item is huge: written at once, not queued
    assert order == [("computed", ["late"])]  # edge and tree were already let go
    assert all(v is None for v in item.arrays.values())  # spent
    with StoreReader(tmp_path / "s", kind="k") as reader:
        back = reader["a"]
        np.testing.assert_array_equal(back.arrays["edge"], big)
        np.testing.assert_array_equal(back.arrays["late"], np.arange(16, dtype=np.int32).reshape(4, 4))
    plain = Item("b", {"late": DeferredArray(_checked_square, ([], Item("c", {}), 4), (4, 4), np.dtype(np.int32))})
    with StoreWriter(tmp_path / "p", kind="k", config={}) as w:
        w.add(plain)
    assert isinstance(plain.arrays["late"], DeferredArray)  # a plain item keeps its arrays
    wrong = Item("d", {"late": DeferredArray(_checked_square, ([], Item("c", {}), 3), (4, 4), np.dtype(np.int32))})
    with pytest.raises(ValueError, match="deferred dataset gave"):
        with StoreWriter(tmp_path / "w", kind="k", config={}) as w:
            w.add(wrong)


def test_a_foreign_shard_is_set_aside_not_adopted(tmp_path):
    """Issue 21.7: a part-*.h5 copied in from another store (other settings) was indexed and replaced items."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    _write(mine, n=4, shard_size=2)
    with StoreWriter(other, kind="k", config={"a": 2}, shard_size=2) as w:
        for i in range(2):
            w.add(Item(f"dir/img{i}", {"edge": np.full((3, 4), 100 + i, np.float32), "tree": np.arange(3, dtype=np.int32)}))
    shutil.copy(other / "part-00000.h5", mine / "part-00007.h5")  # a new name
    shutil.copy(other / "part-00000.h5", mine / "part-00001.h5")  # over one of mine
    with StoreReader(mine) as reader:
        assert sorted(os.path.basename(p) for p, _ in reader.damaged) == ["part-00001.h5", "part-00007.h5"]
        assert reader.keys() == ["dir/img0", "dir/img1"]
        assert reader["dir/img1"].arrays["edge"][0, 0] == 1  # mine, not the foreign 101
    with StoreWriter(mine, kind="k", config={"a": 1}) as w:
        assert w.completed == {"dir/img0", "dir/img1"}  # img2, img3 are redone
        assert sorted(name for name, _ in w.quarantined) == ["part-00001.h5", "part-00007.h5"]
        w.add(_item(2))
        w.add(_item(3))
    reasons = (mine / QUARANTINE_DIR / "reasons.tsv").read_text()
    assert "no record of writing it" in reasons and "differs from the indexed" in reasons
    with StoreReader(mine) as reader:
        assert not reader.damaged and reader.keys() == [f"dir/img{i}" for i in range(4)]
        assert [reader[f"dir/img{i}"].arrays["edge"][0, 0] for i in range(4)] == [0, 1, 2, 3]


def test_a_writer_killed_between_rename_and_index_is_adopted(tmp_path):
    """A real SIGKILL right after a shard is renamed into place: its journal record vouches for it."""
    root = tmp_path / "store"
    script = textwrap.dedent(
        f"""
        import os, signal, numpy as np
        import segsort_unsup.io.store as store
        append = store.StoreWriter._append_index
        def killing_append(self, info):
            if getattr(info, "name", "") == "part-00001.h5":
                os.kill(os.getpid(), signal.SIGKILL)
            append(self, info)
        store.StoreWriter._append_index = killing_append
        with store.StoreWriter({str(root)!r}, kind="k", config={{}}, shard_size=2) as w:
            for i in range(6):
                w.add(store.Item(f"i{{i}}", {{"x": np.full(3, i)}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script])
    assert proc.returncode == -signal.SIGKILL
    assert (root / "part-00001.h5").is_file() and "part-00001" not in (root / INDEX_NAME).read_text()
    with StoreReader(root) as reader:
        assert reader.keys() == ["i0", "i1", "i2", "i3"] and not reader.damaged
    with StoreWriter(root, kind="k", config={}) as w:
        assert w.completed == {"i0", "i1", "i2", "i3"} and not w.quarantined
    assert "part-00001" in (root / INDEX_NAME).read_text()


def _protos_item(key, k=6, d=8):
    p = np.full((k, d), 1 / np.sqrt(d), np.float32)
    return Item(key, {"prototypes": p, "segments": np.zeros((4, 6), np.int32), "area": np.full(k, 4, np.int64),
                      "bbox": np.tile(np.array([0, 0, 4, 6], np.int32), (k, 1))})


def _record_crafted_shard(root, name, build, record=INDEX_NAME):
    """A shard written by hand and recorded (index or journal) with its real size and sha256 (so only
    its content can betray it)."""
    from segsort_unsup.io.atomic import sha256_file

    path = root / name
    with h5py.File(path, "w", libver="latest") as fh:
        build(fh)
        keys = [str(fh[g].attrs["key"]) for g in fh]
    with open(root / record, "a") as fh:
        fh.write(json.dumps({"shard": name, "keys": keys, "size": path.stat().st_size,
                             "sha256": sha256_file(path)}) + "\n")
    return path


def _bomb(fh, rows=4_000_000):
    group = fh.create_group("bomb")
    group.attrs["key"] = "bomb"
    group.create_dataset("prototypes", shape=(rows, 64), dtype="f4", chunks=(4096, 64), compression="gzip",
                         shuffle=True, fletcher32=True)  # declared, never written: reads as 1 GB of zeros
    group.create_dataset("segments", data=np.zeros((4, 6), np.int32))
    group.create_dataset("area", data=np.full(rows, 1, np.int64), chunks=True, compression="gzip")
    group.create_dataset("bbox", shape=(rows, 4), dtype="i4", chunks=(65536, 4))


def test_a_shard_declaring_millions_of_rows_is_refused_before_allocating(tmp_path):
    """Issue 21.8: a few-KB shard declaring millions of rows (valid sha256) made discover take 4.4 GB."""
    root = tmp_path / "protos"
    with StoreWriter(root, kind="prototypes", config={}) as w:
        w.add(_protos_item("a"))
        w.add(_protos_item("b"))
    shard = _record_crafted_shard(root, "part-00009.h5", _bomb)
    assert shard.stat().st_size < 2_000_000
    script = textwrap.dedent(
        f"""
        from segsort_unsup.io.store import StoreReader
        with StoreReader({str(root)!r}) as reader:
            stacked, failed = reader.stack("prototypes")
            print(stacked.keys, [k for k, _ in failed], failed[0][1])
        # this process's own peak (ru_maxrss would carry the forking test runner's peak across exec)
        peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print("peak_mb", peak_kb // 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.startswith("['a', 'b'] ['bomb']") and "declares shape (4000000, 64)" in first
    assert int(second.split()[1]) < 600  # the 1 GB the shard declares was never allocated


def test_missing_chunks_and_disagreeing_rows_are_refused(tmp_path):
    root = tmp_path / "protos"
    with StoreWriter(root, kind="prototypes", config={}) as w:
        w.add(_protos_item("a"))

    def half_written(fh):
        group = fh.create_group("half")
        group.attrs["key"] = "half"
        ds = group.create_dataset("prototypes", shape=(8, 8), dtype="f4", chunks=(4, 8), fletcher32=True)
        ds[:4] = 1.0  # the second chunk is never written: it would read as zeros
        for name, arr in _protos_item("x", k=8).arrays.items():
            if name != "prototypes":
                group.create_dataset(name, data=arr)

    def short_area(fh):
        group = fh.create_group("short")
        group.attrs["key"] = "short"
        for name, arr in _protos_item("x").arrays.items():
            group.create_dataset(name, data=arr[:5] if name == "area" else arr)

    _record_crafted_shard(root, "part-00005.h5", half_written, record="journal.jsonl")  # as if killed before indexing
    _record_crafted_shard(root, "part-00006.h5", short_area)
    with StoreReader(root) as reader:
        with pytest.raises(StoreError, match="stores 1 of its 2 chunks"):
            reader["half"]
        with pytest.raises(StoreError, match=r"disagree on the number of rows \(prototypes: 6, area: 5"):
            reader.read("short", ("area",))
        np.testing.assert_array_equal(reader["a"].arrays["area"], np.full(6, 4))
    with StoreWriter(root, kind="prototypes", config={}) as w:  # adopting reads every dataset: refused
        assert w.completed == {"a", "short"} and [n for n, _ in w.quarantined] == ["part-00005.h5"]


@pytest.mark.parametrize("config", ['[1, 2, 3]', '"text"', "[" * 100_000 + "]" * 100_000,
                                    '{"a": ' + "[" * 200 + "]" * 200 + "}"])
def test_a_manifest_whose_config_is_not_a_mapping_is_one_line(tmp_path, config):
    """Issue 21.12: a list or deeply nested ``config`` in store.json gave "unexpected ... please report it"."""
    root = tmp_path / "s"
    _write(root)
    manifest = json.loads((root / "store.json").read_text())
    text = json.dumps({**manifest, "config": "@"}).replace('"@"', config)
    (root / "store.json").write_text(text)
    with pytest.raises(StoreError, match="store manifest"):
        StoreReader(root)
    with pytest.raises(StoreError, match="store manifest"):
        StoreWriter(root, kind="k", config={"a": 1})
    assert not is_store(root)
    exe = os.path.join(os.path.dirname(sys.executable), "segsort-unsup")
    out = subprocess.run([exe, "inspect", str(root)], capture_output=True, text=True, env=os.environ, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "store manifest" in text and "unexpected" not in text.lower()
    assert len(text.strip().splitlines()) == 1


def test_an_overwrite_killed_while_clearing_is_finished_by_the_next_run(tmp_path):
    """Issue 21.4: a SIGKILL while --overwrite emptied a store deleted store.json first; the folder was
    then refused forever ("not empty and is not a store")."""
    root = tmp_path / "s"
    _write(root, n=8, shard_size=2)
    (root / QUARANTINE_DIR).mkdir()
    script = textwrap.dedent(
        f"""
        import os, pathlib, signal
        unlink = pathlib.Path.unlink
        deleted = []
        def killing_unlink(self, *args, **kwargs):
            unlink(self, *args, **kwargs)
            deleted.append(self.name)
            if len(deleted) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        pathlib.Path.unlink = killing_unlink
        from segsort_unsup.io.store import StoreWriter
        StoreWriter({str(root)!r}, kind="k", config={{"a": 2}}, overwrite=True)
        """
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    left = sorted(p.name for p in root.iterdir())
    assert "store.json" in left and len(list(root.glob("part-*.h5"))) < 4  # killed half-way
    with pytest.raises(StoreError, match="--overwrite of this store was interrupted"):
        StoreReader(root)  # half a store is never read as a store
    with pytest.raises(StoreError, match="--overwrite of the 'k' store here was interrupted"):
        StoreWriter(root, kind="contours", config={})
    with StoreWriter(root, kind="k", config={"a": 2}) as w:  # no --overwrite needed to finish it
        assert not w.completed
        w.add(_item(0))
    assert sorted(p.name for p in root.iterdir()) == ["index.jsonl", "journal.jsonl", "part-00000.h5", "store.json"]
    with StoreReader(root) as reader:
        assert reader.keys() == ["dir/img0"] and reader.config == {"a": 2}
