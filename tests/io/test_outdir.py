"""Output folders: manifest, lock, overwrite that removes only listed files, resume, safe names."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from segsort_unsup import __version__
from segsort_unsup.io.outdir import (JOURNAL_NAME, MANIFEST_NAME, OutputFolder, OutputFolderError, UnsafeNameError,
                                     key_path, safe_relative_name)

HOSTILE = ["/abs/escape", "../../escaped", "a/../../b", "a//b", "", ".hidden", "a/./b", "a\\b", "a\x00b",
           "line\nbreak", "bell\x07", "x" * 256, "a/", "..", "."]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    return env


def _write(folder: OutputFolder, name: str, data: bytes) -> Path:
    target = folder.file_for(name, ".png")
    folder.write_bytes(target, data)
    return target


def _manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8"))


def _tree(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*")}


# -- names -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused_with_one_line_naming_them(name, tmp_path):
    with pytest.raises(UnsafeNameError) as err:
        safe_relative_name(name)
    text = str(err.value)
    assert "\n" not in text and repr(name) in text
    with pytest.raises(UnsafeNameError):
        key_path(tmp_path, name, ".png")


@pytest.mark.parametrize("name", ["a", "0001TP_008550", "sub/dir/img", "été 2024", "x" * 251, "a.b.c"])
def test_ordinary_keys_stay_inside_the_folder(name, tmp_path):
    assert safe_relative_name(name) == name
    target = key_path(tmp_path, name, ".png")
    assert tmp_path.resolve() in target.resolve().parents
    assert target.relative_to(tmp_path).as_posix() == f"{name}.png"


def test_a_key_too_long_with_its_suffix_is_refused_naming_the_key(tmp_path):
    with pytest.raises(UnsafeNameError, match=r"key 'x{252}'.*256 bytes"):
        key_path(tmp_path, "x" * 252, ".png")


def test_section_names_may_not_hold_subfolders():
    assert safe_relative_name("fine", what="section", subfolders=False) == "fine"
    with pytest.raises(UnsafeNameError, match="section 'a/b'"):
        safe_relative_name("a/b", what="section", subfolders=False)


def test_a_symlinked_subfolder_leading_out_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "out"
    with OutputFolder(root, kind="t", identity={"a": 1}) as folder:
        (root / "link").symlink_to(outside, target_is_directory=True)
        with pytest.raises(OutputFolderError, match="symbolic link"):
            folder.file_for("link/x", ".png")
    assert not list(outside.iterdir())


# -- manifest --------------------------------------------------------------------------------------
def test_manifest_says_what_wrote_the_folder_and_lists_each_file_with_its_size(tmp_path):
    root = tmp_path / "out"
    with OutputFolder(root, kind="labels", identity={"k": 15}, meta={"query": "q"}) as folder:
        _write(folder, "a", b"1234")
        _write(folder, "sub/b", b"123456789")
        folder.write_text(folder.path_for("index.html"), "<p>hi</p>")
    data = _manifest(root)
    assert data["producer"] == f"segsort-unsup {__version__}"
    assert data["kind"] == "labels" and data["identity"] == {"k": 15} and data["meta"] == {"query": "q"}
    on_disk = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*")
               if p.is_file() and not p.name.startswith(".")}
    assert data["files"] == on_disk == {"a.png": 4, "sub/b.png": 9, "index.html": 9}
    assert data["folders"] == ["sub"]
    assert not (root / JOURNAL_NAME).exists() and not (root / ".lock").exists()


# -- overwrite -------------------------------------------------------------------------------------
def test_overwrite_removes_only_listed_files_and_keeps_the_users(tmp_path):
    root = tmp_path / "out"
    with OutputFolder(root, kind="labels", identity={"k": 1}) as folder:
        _write(folder, "a", b"old")
        _write(folder, "nested/b", b"old")
        _write(folder, "gone/c", b"old")
    (root / "photo.png").write_bytes(b"user photo")  # named like an output, but the user's
    (root / "nested" / "mine.png").write_bytes(b"user file")
    (root / "album").mkdir()
    (root / "album" / "x.png").write_bytes(b"user")
    (root / "empty").mkdir()  # the user's folders stay, even empty ones that held our files
    with OutputFolder(root, kind="labels", identity={"k": 1}) as folder:
        _write(folder, "empty/d", b"old")
    with OutputFolder(root, kind="labels", identity={"k": 1}, overwrite=True) as folder:
        assert folder.files == {}
        _write(folder, "a", b"new")
    assert (root / "photo.png").read_bytes() == b"user photo"
    assert (root / "nested" / "mine.png").read_bytes() == b"user file"
    assert (root / "album" / "x.png").read_bytes() == b"user"
    assert not (root / "nested" / "b.png").exists() and not (root / "gone").exists()
    assert (root / "empty").is_dir() and not list((root / "empty").iterdir())
    assert (root / "a.png").read_bytes() == b"new"
    assert _manifest(root)["files"] == {"a.png": 3}


def test_a_non_empty_folder_without_manifest_is_refused_even_with_overwrite(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    (root / "holiday.png").write_bytes(b"precious")
    for overwrite in (False, True, "changed"):
        with pytest.raises(OutputFolderError) as err:
            OutputFolder(root, kind="labels", identity={}, overwrite=overwrite).open()
        assert "not written by segsort-unsup; choose an empty folder" in str(err.value)
        assert "\n" not in str(err.value)
    assert _tree(root) == {"holiday.png"}


def test_another_identity_is_refused_or_replaced_and_another_kind_never(tmp_path):
    root = tmp_path / "out"
    with OutputFolder(root, kind="labels", identity={"k": 1, "index": "flat"}) as folder:
        _write(folder, "a", b"k1")
    with pytest.raises(OutputFolderError, match=r"differs in: k\b.*--overwrite"):
        OutputFolder(root, kind="labels", identity={"k": 2, "index": "flat"}).open()
    with pytest.raises(OutputFolderError, match="holds a 'labels' output, not 'retrieval'"):
        OutputFolder(root, kind="retrieval", identity={}, overwrite=True).open()
    with OutputFolder(root, kind="labels", identity={"k": 1, "index": "flat"}, overwrite="changed") as folder:
        assert folder.resumed and folder.is_complete(folder.file_for("a", ".png"))
    with OutputFolder(root, kind="labels", identity={"k": 2, "index": "flat"}, overwrite="changed") as folder:
        assert folder.replaced_keys == ["k"] and not folder.files
    assert not (root / "a.png").exists()


def test_a_hand_edited_manifest_cannot_make_overwrite_delete_outside(tmp_path):
    root = tmp_path / "out"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    with OutputFolder(root, kind="t", identity={}) as folder:
        _write(folder, "a", b"x")
    data = _manifest(root)
    data["files"]["../victim.txt"] = 4
    (root / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(OutputFolderError, match="lists '../victim.txt'"):
        OutputFolder(root, kind="t", identity={}, overwrite=True).open()
    assert victim.read_text() == "keep"


def test_an_interrupted_overwrite_leaves_a_folder_that_opens_again(tmp_path, monkeypatch):
    root = tmp_path / "out"
    with OutputFolder(root, kind="t", identity={"v": 1}) as folder:
        for name in "abc":
            _write(folder, name, b"old")
    real_unlink = Path.unlink
    calls = []

    def dying_unlink(self, *args, **kwargs):
        calls.append(self.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", dying_unlink)
    with pytest.raises(KeyboardInterrupt):
        OutputFolder(root, kind="t", identity={"v": 2}, overwrite=True).open()
    monkeypatch.setattr(Path, "unlink", real_unlink)
    with OutputFolder(root, kind="t", identity={"v": 2}, overwrite=True) as folder:
        _write(folder, "d", b"new")
    assert _tree(root) == {MANIFEST_NAME, "d.png"}


# -- resume ----------------------------------------------------------------------------------------
def test_resume_trusts_only_listed_files_of_the_recorded_size(tmp_path):
    root = tmp_path / "out"
    with OutputFolder(root, kind="t", identity={}) as folder:
        _write(folder, "kept", b"12345")
        _write(folder, "shrunk", b"12345")
        folder.announce(folder.file_for("announced", ".png"))
    (root / "shrunk.png").write_bytes(b"12")
    (root / "announced.png").write_bytes(b"half?")
    with OutputFolder(root, kind="t", identity={}) as folder:
        assert folder.resumed
        assert folder.is_complete(folder.file_for("kept", ".png"))
        assert not folder.is_complete(folder.file_for("shrunk", ".png"))
        assert not folder.is_complete(folder.file_for("announced", ".png"))
        (root / "unlisted.png").write_bytes(b"12345")
        assert not folder.is_complete(folder.file_for("unlisted", ".png"))


_WRITER = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from segsort_unsup.io.outdir import OutputFolder, OutputFolderError
    root, mode = Path(sys.argv[1]), sys.argv[2]
    try:
        folder = OutputFolder(root, kind="t", identity={"v": 1}).open()
    except OutputFolderError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    for i in range(3):
        folder.write_bytes(folder.file_for(f"done{i}", ".png"), b"x" * (i + 1))
    if mode == "hold":
        (root.parent / "ready").touch()
        while not (root.parent / "go").exists():
            time.sleep(0.02)
    elif mode == "die":
        with folder.writing(folder.file_for("torn", ".png")) as tmp:
            tmp.write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
    folder.close()
""")


def _writer(root: Path, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(root), mode], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_writer_processes_never_write_one_folder_at_once(tmp_path):
    root = tmp_path / "out"
    first = _writer(root, "hold")
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.02)
    second = _writer(root, "plain")
    _, err = second.communicate(timeout=60)
    assert second.returncode == 1
    assert err.strip().count("\n") == 0 and "another segsort-unsup run is writing this folder" in err
    (tmp_path / "go").touch()
    first.communicate(timeout=60)
    assert first.returncode == 0
    assert _manifest(root)["files"] == {"done0.png": 1, "done1.png": 2, "done2.png": 3}


def test_a_killed_writer_leaves_a_resumable_folder(tmp_path):
    root = tmp_path / "out"
    proc = _writer(root, "die")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (root / JOURNAL_NAME).exists() and any(p.name.endswith(".tmp") for p in root.iterdir())
    with OutputFolder(root, kind="t", identity={"v": 1}) as folder:  # the lock of the dead run is free
        assert folder.resumed
        assert sorted(folder.files) == ["done0.png", "done1.png", "done2.png"]
        assert not folder.is_complete(folder.file_for("torn", ".png"))
        assert not any(p.name.endswith(".tmp") for p in root.iterdir())
        _write(folder, "torn", b"whole")
    assert _manifest(root)["files"]["torn.png"] == 5
    with OutputFolder(root, kind="t", identity={"v": 1}, overwrite=True):
        pass
    assert _tree(root) == {MANIFEST_NAME}
