"""The retrieval page: its title says what was searched, and it fits the window (headless Chromium)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from PIL import Image

from segsort_unsup.transfer.retrieve import Query, _query_card, index_page


def test_title_says_labelled_only_when_the_store_has_labels():
    cards = [_query_card(Query("a<b", 3), "a<b-3.png", [("c", 1, ["0.900"])])]
    unlabelled = index_page(cards, labelled="L", query="Q", has_labels=False)
    labelled = index_page(cards, labelled="L", query="Q", has_labels=True)
    assert "<h1>Nearest segments</h1>" in unlabelled and "labelled segments" not in unlabelled
    assert "<h1>Nearest labelled segments</h1>" in labelled
    assert "a&lt;b" in unlabelled and "a<b" not in unlabelled.split("<main>")[1].replace("a<b-3", "")
    assert "src='a%3Cb-3.png'" in unlabelled


_WIDTH_PROBE = """<script>window.addEventListener('load', function () {
  document.body.setAttribute('data-scroll-width', String(document.documentElement.scrollWidth));
  document.body.setAttribute('data-img-width', String(document.querySelector('img').getBoundingClientRect().width));
});</script>"""


@pytest.mark.parametrize("window", [1400, 800])
def test_a_wide_retrieval_row_fits_the_window(tmp_path, window):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed: apt-get update && apt-get install -y chromium")
    Image.fromarray(np.full((200, 1900, 3), 90, np.uint8)).save(tmp_path / "q-1.png")  # 7 tiles + captions
    page = index_page([_query_card(Query("q", 1), "q-1.png", [("r", 2, ["0.8"])])], labelled="L", query="Q",
                      has_labels=False)
    (tmp_path / "index.html").write_text(page.replace("</body>", _WIDTH_PROBE + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              f"--user-data-dir={profile}", f"--window-size={window},900",
                              "--virtual-time-budget=5000", "--dump-dom", (tmp_path / "index.html").as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
    scroll = int(dom.split('data-scroll-width="')[1].split('"')[0])
    img = float(dom.split('data-img-width="')[1].split('"')[0])
    assert scroll <= window and 0 < img < 1900  # no horizontal overflow: the picture shrinks
