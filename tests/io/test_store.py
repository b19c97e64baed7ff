import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from segsort_unsup.errors import StoreError
from segsort_unsup.io.store import Item, StoreReader, StoreWriter


def _item(i: int) -> Item:
    return Item(f"dir/img{i}", {"edge": np.full((3, 4), i, np.float32)}, {"source": f"/x/img{i}.jpg"})


def test_roundtrip_and_resume(tmp_path):
    root = tmp_path / "store"
    with StoreWriter(root, kind="contours", config={"a": 1}, shard_size=2) as w:
        for i in range(5):
            w.add(_item(i))
    reader = StoreReader(root, kind="contours", required=("edge",))
    assert reader.keys() == [f"dir/img{i}" for i in range(5)]
    item = reader["dir/img3"]
    assert item.arrays["edge"][0, 0] == 3 and item.attrs["source"] == "/x/img3.jpg"
    reader.close()
    with StoreWriter(root, kind="contours", config={"a": 1}) as w:
        assert w.completed == {f"dir/img{i}" for i in range(5)}
    with pytest.raises(StoreError, match="another configuration"):
        StoreWriter(root, kind="contours", config={"a": 2})
    with pytest.raises(StoreError, match="not 'contours'|holds a"):
        StoreWriter(root, kind="segments", config={"a": 1})
    with StoreWriter(root, kind="contours", config={"a": 2}, overwrite=True) as w:
        assert not w.completed


def test_lock_refuses_second_writer(tmp_path):
    with StoreWriter(tmp_path / "s", kind="k", config={}):
        with pytest.raises(StoreError, match="another segsort-unsup run"):
            StoreWriter(tmp_path / "s", kind="k", config={})


def test_reader_errors(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        StoreReader(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a segsort-unsup store"):
        StoreReader(tmp_path / "plain")
    with StoreWriter(tmp_path / "s", kind="k", config={}) as w:
        w.add(_item(0))
    shard = next((tmp_path / "s").glob("part-*.h5"))
    shard.write_bytes(b"garbage" * 10)
    with pytest.raises(StoreError, match="corrupt shard"):
        StoreReader(tmp_path / "s")


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
    assert n >= 6 and n % 3 == 0
    for key in reader.keys():
        assert reader[key].arrays["x"].shape == (64, 64)
    for shard in root.glob("part-*.h5"):
        with h5py.File(shard, "r"):
            pass
    with StoreWriter(root, kind="k", config={}) as w:
        assert len(w.completed) == n
        assert not list(root.glob(".part-*.tmp"))


def test_path_errors_pickle_across_processes():
    import pickle

    from segsort_unsup.errors import BadImageError, WeightsError

    for err in (BadImageError("/a.jpg", "truncated"), StoreError("/s", "corrupt"), WeightsError("/w", "bad")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and back.reason == err.reason
