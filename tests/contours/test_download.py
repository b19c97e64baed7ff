"""download_url against a local HTTP server on 127.0.0.1: resume, no-resume, drops, bad sha256, 404."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from segsort_unsup.contours.download import download_url
from segsort_unsup.errors import WeightsError
from segsort_unsup.io.atomic import sha256_file

DATA = bytes(range(256)) * 12_000 + b"tail"  # ~3 MB: several 1 MiB read chunks
SHA = hashlib.sha256(DATA).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Serves DATA at /file.bin. Behaviour comes from the server: ``ranges`` (honour Range),
    ``drops`` (how many more responses to cut off half-way), and it logs each request's Range header."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        srv.seen.append(self.headers.get("Range"))
        if self.path != "/file.bin":
            self.send_error(404, "Not Found")
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and srv.ranges:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(DATA):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(DATA)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
        else:
            self.send_response(200)
        body = DATA[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.drops > 0:
            srv.drops -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # the client sees EOF before Content-Length
            return
        self.wfile.write(body)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.ranges, srv.drops, srv.seen = True, 0, []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/file.bin"
    yield srv
    srv.shutdown()
    srv.server_close()


def _part(dest):
    return dest.parent / f".{dest.name}.part"


def test_plain_download(server, tmp_path):
    dest = tmp_path / "sub" / "w.pth"
    got = download_url(server.url, dest, sha256=SHA, expected_size=len(DATA), progress=False)
    assert got == SHA
    assert dest.read_bytes() == DATA
    assert not _part(dest).exists()
    assert server.seen == [None]


def test_resume_partial_with_range(server, tmp_path):
    dest = tmp_path / "w.pth"
    _part(dest).write_bytes(DATA[:1_000_001])  # left by an earlier, killed run
    assert download_url(server.url, dest, sha256=SHA, progress=False) == SHA
    assert dest.read_bytes() == DATA
    assert server.seen == ["bytes=1000001-"]


def test_server_without_range_restarts(server, tmp_path):
    server.ranges = False
    dest = tmp_path / "w.pth"
    _part(dest).write_bytes(b"garbage that must not survive" * 100)
    assert download_url(server.url, dest, sha256=SHA, progress=False) == SHA
    assert dest.read_bytes() == DATA
    assert server.seen == ["bytes=2900-"]  # asked to resume, got 200 and the whole file


def test_partial_already_complete(server, tmp_path):
    dest = tmp_path / "w.pth"
    _part(dest).write_bytes(DATA)
    assert download_url(server.url, dest, sha256=SHA, progress=False) == SHA
    assert dest.read_bytes() == DATA


def test_drop_then_resume_on_next_call(server, tmp_path):
    server.drops = 1
    dest = tmp_path / "w.pth"
    with pytest.raises(WeightsError, match="interrupted.*run the command again to resume") as err:
        download_url(server.url, dest, sha256=SHA, progress=False, retries=0)
    assert server.url in str(err.value)
    kept = _part(dest).stat().st_size
    assert 0 < kept < len(DATA) and not dest.exists()
    assert download_url(server.url, dest, sha256=SHA, progress=False) == SHA
    assert dest.read_bytes() == DATA
    assert server.seen == [None, f"bytes={kept}-"]


def test_drops_are_retried_within_one_call(server, tmp_path):
    server.drops = 2
    dest = tmp_path / "w.pth"
    assert download_url(server.url, dest, sha256=SHA, progress=False, retries=3) == SHA
    assert dest.read_bytes() == DATA
    assert server.seen[0] is None and all(r.startswith("bytes=") for r in server.seen[1:])
    assert len(server.seen) == 3


def test_drop_on_server_without_range(server, tmp_path):
    server.ranges, server.drops = False, 1
    dest = tmp_path / "w.pth"
    assert download_url(server.url, dest, sha256=SHA, progress=False) == SHA
    assert dest.read_bytes() == DATA


def test_wrong_sha256_keeps_the_good_file(server, tmp_path):
    dest = tmp_path / "w.pth"
    dest.write_bytes(b"the good old file")
    wrong = "0" * 64
    with pytest.raises(WeightsError) as err:
        download_url(server.url, dest, sha256=wrong, progress=False)
    msg = str(err.value)
    assert server.url in msg and wrong in msg and SHA in msg and "--from PATH" in msg
    assert dest.read_bytes() == b"the good old file"
    assert not _part(dest).exists()


def test_wrong_size(server, tmp_path):
    dest = tmp_path / "w.pth"
    with pytest.raises(WeightsError, match=f"gave {len(DATA)} bytes, expected 5"):
        download_url(server.url, dest, expected_size=5, progress=False)
    assert not dest.exists() and not _part(dest).exists()


def test_bad_sha256_argument(tmp_path):
    with pytest.raises(WeightsError, match="not a sha256"):
        download_url("http://127.0.0.1:9/x", tmp_path / "w.pth", sha256="abc")


def test_404(server, tmp_path):
    dest = tmp_path / "w.pth"
    with pytest.raises(WeightsError, match="HTTP 404") as err:
        download_url(server.url.replace("file.bin", "missing.bin"), dest, progress=False)
    assert "missing.bin" in str(err.value) and "--from PATH" in str(err.value)
    assert not dest.exists()


def test_unreachable_host(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(WeightsError, match=rf"cannot reach 127\.0\.0\.1:{port}: .*download it elsewhere and pass --from PATH"):
        download_url(f"http://127.0.0.1:{port}/file.bin", tmp_path / "w.pth", progress=False)


def test_progress_bar_does_not_break(server, tmp_path, capsys):
    dest = tmp_path / "w.pth"
    assert download_url(server.url, dest, progress=True) == SHA
    assert sha256_file(dest) == SHA
