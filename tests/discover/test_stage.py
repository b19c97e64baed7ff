"""The discover stage on real prototypes (HED-VGG16 conv4_3 over SLIC superpixels of CamVid / BSDS500)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from segsort_unsup.cli import main
from segsort_unsup.discover import finch
from segsort_unsup.discover.stage import DiscoverConfig, nmi, purity, contingency, read_groups, run
from segsort_unsup.errors import InputError, StoreError
from segsort_unsup.io.store import Item, StoreReader, StoreWriter

from .protos import build_prototypes_store

CHROMIUM_INSTALL = "apt-get update && apt-get install -y chromium"


@pytest.fixture(scope="module")
def camvid_protos(shared, hed_h5, tmp_path_factory) -> Path:
    camvid = shared / "data" / "camvid"
    if not camvid.is_dir():
        pytest.skip(f"{camvid} not found")
    images = sorted((camvid / "train").glob("*.png"))[::23][:4]
    labels = [camvid / "trainannot" / p.name for p in images]
    root = tmp_path_factory.mktemp("camvid") / "prototypes"
    return build_prototypes_store(root, images, labels=labels, hed_h5=hed_h5, scale=0.35, n_segments=40, ignore=11)


@pytest.fixture(scope="module")
def bsds_protos(bsds, hed_h5, tmp_path_factory) -> Path:
    images = sorted((bsds / "images" / "val").glob("*.jpg"))[:2]
    root = tmp_path_factory.mktemp("bsds") / "prototypes"
    return build_prototypes_store(root, images, hed_h5=hed_h5, scale=0.3, n_segments=30)


def _stacked(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    with StoreReader(root, kind="prototypes") as r:
        keys = r.keys()
        items = [r.read(k) for k in keys]
    protos = np.concatenate([it.arrays["prototypes"] for it in items])
    area = np.concatenate([it.arrays["area"] for it in items])
    label = np.concatenate([it.arrays["label"] for it in items]) if "label" in items[0].arrays else None
    return protos, area, label, keys


NO_GALLERY = {"gallery": False}


def test_levels_are_finch_with_means_sizes_and_nested_parents(camvid_protos, tmp_path):
    summary = run(DiscoverConfig(**NO_GALLERY), camvid_protos, tmp_path / "g")
    assert summary.ok and summary.done == summary.total
    groups = read_groups(tmp_path / "g")
    protos, area, label, keys = _stacked(camvid_protos)
    assert groups.image_keys == keys
    assert groups.rows.arrays["image"].size == protos.shape[0]
    # every row points at its own prototype
    with StoreReader(camvid_protos) as r:
        for row in range(0, protos.shape[0], 7):
            key = keys[groups.rows.arrays["image"][row]]
            np.testing.assert_array_equal(r.read(key).arrays["prototypes"][groups.rows.arrays["segment"][row]],
                                          protos[row])
    ref = finch(protos)
    assert len(groups.levels) == ref.partitions.shape[1]
    for level, item in enumerate(groups.levels):
        part = item.arrays["partition"]
        np.testing.assert_array_equal(part, ref.partitions[:, level])
        k = int(part.max()) + 1
        for g in range(k):  # brute-force mean and size of each group
            members = protos[part == g]
            assert item.arrays["sizes"][g] == len(members)
            np.testing.assert_allclose(item.arrays["means"][g], members.mean(axis=0), atol=1e-6)
        parent = item.arrays["parent"]
        if level + 1 == len(groups.levels):
            assert (parent == -1).all()
            continue
        coarse = groups.levels[level + 1].arrays["partition"]
        for c in range(int(coarse.max()) + 1):
            children = np.flatnonzero(parent == c)
            assert children.size >= 1
            # the finer groups listed under a coarse group partition it exactly
            union = np.isin(part, children)
            np.testing.assert_array_equal(union, coarse == c)


def _brute_purity(groups: np.ndarray, labels: np.ndarray) -> float:
    good = 0
    total = 0
    for g in set(groups.tolist()):
        members = [int(c) for gg, c in zip(groups, labels) if gg == g and c >= 0]
        if members:
            good += max(members.count(c) for c in set(members))
            total += len(members)
    return good / total


def _brute_nmi(groups: np.ndarray, labels: np.ndarray) -> float:
    pairs = [(int(g), int(c)) for g, c in zip(groups, labels) if c >= 0]
    n = len(pairs)

    def entropy(values):
        return -sum((values.count(v) / n) * math.log(values.count(v) / n) for v in set(values))

    gs, cs = [p[0] for p in pairs], [p[1] for p in pairs]
    mi = 0.0
    for g in set(gs):
        for c in set(cs):
            nij = pairs.count((g, c))
            if nij:
                mi += nij / n * math.log(n * nij / (gs.count(g) * cs.count(c)))
    hg, hc = entropy(gs), entropy(cs)
    return mi / ((hg + hc) / 2) if hg + hc else 1.0


def test_purity_nmi_per_level_against_brute_force_and_sklearn(camvid_protos, tmp_path):
    run(DiscoverConfig(req_clust=5, **NO_GALLERY), camvid_protos, tmp_path / "g")
    groups = read_groups(tmp_path / "g")
    label = groups.rows.arrays["label"]
    assert (label >= 0).any()
    sk = pytest.importorskip("sklearn.metrics")
    keep = label >= 0
    for item in groups.levels + [groups.requested]:
        part = item.arrays["partition"]
        assert item.attrs["purity"] == pytest.approx(_brute_purity(part, label), abs=1e-12)
        assert item.attrs["nmi"] == pytest.approx(_brute_nmi(part, label), abs=1e-9)
        assert item.attrs["nmi"] == pytest.approx(sk.normalized_mutual_info_score(label[keep], part[keep]), abs=1e-9)
        np.testing.assert_array_equal(item.arrays["class_counts"].sum(axis=1),
                                      np.bincount(part[keep], minlength=item.attrs["groups"]))
    assert groups.requested.attrs["groups"] == 5


def test_scores_on_random_partitions():
    rng = np.random.default_rng(3)
    for _ in range(5):
        g = rng.integers(0, 7, 300)
        c = rng.integers(-1, 5, 300)
        counts = contingency(g, c)
        assert purity(counts) == pytest.approx(_brute_purity(g, c), abs=1e-12)
        assert nmi(counts) == pytest.approx(_brute_nmi(g, c), abs=1e-9)


def test_filters_min_area_classes_and_seeded_cap(camvid_protos, tmp_path):
    protos, area, label, _ = _stacked(camvid_protos)
    min_area = int(np.median(area))
    run(DiscoverConfig(min_area=min_area, **NO_GALLERY), camvid_protos, tmp_path / "a")
    rows = read_groups(tmp_path / "a").rows.arrays
    assert rows["area"].size == int((area >= min_area).sum())
    assert (rows["area"] >= min_area).all()

    present = np.unique(label[label >= 0])
    keep = tuple(int(c) for c in present[:2])
    run(DiscoverConfig(classes=keep, **NO_GALLERY), camvid_protos, tmp_path / "c")
    got = read_groups(tmp_path / "c").rows.arrays["label"]
    assert set(got.tolist()) == set(keep) and got.size == int(np.isin(label, keep).sum())

    run(DiscoverConfig(exclude_classes=keep, **NO_GALLERY), camvid_protos, tmp_path / "x")
    got = read_groups(tmp_path / "x").rows.arrays["label"]
    assert not set(got.tolist()) & set(keep) and got.size == int((~np.isin(label, keep)).sum())

    def sample(seed, name):
        run(DiscoverConfig(max_prototypes=25, seed=seed, **NO_GALLERY), camvid_protos, tmp_path / name)
        r = read_groups(tmp_path / name).rows.arrays
        return list(zip(r["image"].tolist(), r["segment"].tolist()))

    a, b, c = sample(1, "s1"), sample(1, "s1b"), sample(2, "s2")
    assert len(a) == 25 and len(set(a)) == 25 and a == b and a != c
    # the sample is clustered as is: FINCH of exactly those rows
    _, _, _, keys = _stacked(camvid_protos)
    with StoreReader(camvid_protos) as r:
        rows = np.stack([r.read(keys[i]).arrays["prototypes"][s] for i, s in a])
    np.testing.assert_array_equal(read_groups(tmp_path / "s1").levels[0].arrays["partition"],
                                  finch(rows).partitions[:, 0])


def test_errors_are_one_line_and_name_the_store(camvid_protos, bsds_protos, tmp_path):
    empty = tmp_path / "empty"
    StoreWriter(empty, kind="prototypes", config={"x": 1}).close()
    with pytest.raises(StoreError, match="holds no items") as exc:
        run(DiscoverConfig(), empty, tmp_path / "o1")
    assert str(empty) in str(exc.value) and "\n" not in str(exc.value)

    other = tmp_path / "contours"
    with StoreWriter(other, kind="contours", config={"x": 1}) as w:
        z = np.zeros((4, 4), np.float16)
        w.add(Item("a", {"edge": z, "orientation": z}))
    with pytest.raises(StoreError, match="'contours' store; expected a 'prototypes' store"):
        run(DiscoverConfig(), other, tmp_path / "o2")

    with pytest.raises(InputError, match="level 99 does not exist; levels are 0..") as exc:
        run(DiscoverConfig(level=99), camvid_protos, tmp_path / "o3")
    assert "\n" not in str(exc.value)

    with pytest.raises(InputError, match="need labelled prototypes"):
        run(DiscoverConfig(classes=(1,), **NO_GALLERY), bsds_protos, tmp_path / "o4")
    with pytest.raises(InputError, match="no prototype passes the filters"):
        run(DiscoverConfig(min_area=10**9, **NO_GALLERY), camvid_protos, tmp_path / "o5")
    with pytest.raises(InputError, match="not both"):
        DiscoverConfig(classes=(1,), exclude_classes=(2,))

    result = CliRunner().invoke(main, ["discover", str(camvid_protos), "-o", str(tmp_path / "o6"), "--level", "99"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "level 99 does not exist" in lines[0]


def test_idempotent_resume_and_changed_settings(camvid_protos, tmp_path):
    out = tmp_path / "g"
    cfg = DiscoverConfig(map_method="pca")
    first = run(cfg, camvid_protos, out)
    shard = next(out.glob("part-*.h5"))
    stamp = (shard.stat().st_mtime_ns, (out / "gallery" / "gallery.html").stat().st_mtime_ns)
    second = run(cfg, camvid_protos, out)
    assert second.done == 0 and second.skipped == first.done
    assert (shard.stat().st_mtime_ns, (out / "gallery" / "gallery.html").stat().st_mtime_ns) == stamp
    # a gallery-only change redraws the gallery, never re-clusters
    run(cfg.replace(representatives=2), camvid_protos, out)
    assert shard.stat().st_mtime_ns == stamp[0]
    assert (out / "gallery" / "gallery.html").stat().st_mtime_ns != stamp[1]
    # a result-changing setting needs --overwrite
    with pytest.raises(StoreError, match="differs in: min_area"):
        run(cfg.replace(min_area=50), camvid_protos, out)
    again = run(cfg.replace(min_area=50), camvid_protos, out, overwrite=True)
    assert again.done == again.total > 0


def test_gallery_pages_links_and_files(camvid_protos, tmp_path):
    run(DiscoverConfig(level=0, map_method="pca", representatives=3, random_members=2), camvid_protos, tmp_path / "g")
    folder = tmp_path / "g" / "gallery"
    groups = read_groups(tmp_path / "g")
    html = (folder / "gallery.html").read_text()
    assert html == (folder / "level-00.html").read_text()
    pages = [*folder.glob("*.html"), *folder.glob("photos/*.html")]
    assert len(list(folder.glob("photos/*.html"))) > 0
    for page in pages:
        text = page.read_text()
        for src in re.findall(r"src='([^']+)'", text):
            assert (page.parent / src).is_file(), (page.name, src)
        for href in re.findall(r"href='([^'#]+)", text):
            assert (page.parent / href).is_file(), (page.name, href)
    if len(groups.levels) > 1:
        text = (folder / "level-01.html").read_text()
        parent = groups.levels[0].arrays["parent"]
        for g in range(groups.levels[1].attrs["groups"]):
            links = re.search(rf"<div class='card' id='g{g}'[^>]*>.*?<div class='links'>(.*?)</div></div>", text,
                              re.S).group(1)
            listed = [int(x) for x in re.findall(r"level-00(?:-p\d+)?\.html#g(\d+)", links)]
            assert sorted(listed) == np.flatnonzero(parent == g).tolist()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _browser_flags(browser: str, profile: str) -> list[str]:
    return [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=15000"]


def _dump_dom(flags: list[str], page: Path) -> str:
    return subprocess.run(flags + ["--dump-dom", page.resolve().as_uri()], capture_output=True, text=True,
                          timeout=120).stdout


# Appended to a copy of a gallery page: hover a map cell and a legend entry, then report through the DOM.
_HOVER_PROBE = """<script>
window.addEventListener('load', function () { setTimeout(function () {
  var cells = document.querySelectorAll('.map a.cell'), cell = cells[%(cell)d];
  cell.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
  var prev = document.getElementById('preview'), img = prev.querySelector('img');
  var key = document.querySelector(".legend a[data-g='" + cell.getAttribute('data-g') + "']");
  key.dispatchEvent(new MouseEvent('mouseenter'));
  var on = document.querySelectorAll('.map.focus a.cell.on').length;
  setTimeout(function () {
    var b = document.body;
    b.setAttribute('data-probe-shown', prev.classList.contains('show') ? '1' : '0');
    b.setAttribute('data-probe-src', img.getAttribute('src'));
    b.setAttribute('data-probe-width', String(img.naturalWidth));
    b.setAttribute('data-probe-caption', prev.querySelector('.cap').textContent);
    b.setAttribute('data-probe-on', String(on));
  }, 500);
}, 100); });
</script>"""
_CLICK_PROBE = """<script>
window.addEventListener('load', function () { setTimeout(function () {
  document.querySelectorAll('.map a.cell')[%(cell)d].click();
}, 100); });
</script>"""


@pytest.mark.slow
def test_gallery_in_headless_chromium(camvid_protos, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip(f"chromium not installed: {CHROMIUM_INSTALL}")
    run(DiscoverConfig(map_method="pca", level=0, groups_per_page=10), camvid_protos, tmp_path / "g")
    folder = tmp_path / "g" / "gallery"
    groups = read_groups(tmp_path / "g")
    text = (folder / "gallery.html").read_text()
    n_imgs = len(re.findall(r"<img [^>]*src=", text))
    assert n_imgs > 20 and (folder / "level-00-p2.html").is_file()
    cells = re.findall(r"<a class='cell' href='([^']+)' data-g='(\d+)' data-row='(\d+)' data-tile='([^']+)' "
                       r"title='([^']+)'", text)
    assert cells
    pick = len(cells) // 2
    href, g, row, tile, title = cells[pick]
    partition = groups.levels[0].arrays["partition"]
    assert int(partition[int(row)]) == int(g)  # the cell's group is its segment's group
    with tempfile.TemporaryDirectory() as profile:
        flags = _browser_flags(browser, profile)
        for page in (folder / "gallery.html", folder / "level-00-p2.html", next(folder.glob("photos/*.html"))):
            dom = _dump_dom(flags, page)
            wanted = len(re.findall(r"<img [^>]*src=", page.read_text()))
            assert 'data-images="ok"' in dom, (page.name, dom[:300])
            assert dom.count('data-loaded="1"') == wanted and 'data-loaded="0"' not in dom, page.name

        probe = folder / "probe-hover.html"
        probe.write_text(text.replace("</body>", _HOVER_PROBE % {"cell": pick} + "</body>"))
        dom = _dump_dom(flags, probe)
        assert 'data-probe-shown="1"' in dom, dom[-600:]
        assert f'data-probe-src="{tile}"' in dom and 'data-probe-width="160"' in dom
        key = groups.image_keys[int(groups.rows.arrays["image"][int(row)])]
        assert key in re.search(r'data-probe-caption="([^"]*)"', dom).group(1)
        members_on_map = sum(1 for c in cells if c[1] == g)
        assert f'data-probe-on="{members_on_map}"' in dom

        probe = folder / "probe-click.html"
        probe.write_text(text.replace("</body>", _CLICK_PROBE % {"cell": pick} + "</body>"))
        dom = _dump_dom(flags, probe)
        focused = re.findall(r"<div class=\"card\" id=\"g(\d+)\"[^>]*data-focus=\"1\"", dom)
        assert focused == [g], (href, focused)
        assert href.split("#")[1] == f"g{g}" and re.fullmatch(r"level-00(-p\d+)?\.html", href.split("#")[0])

        shot = tmp_path / "gallery.png"
        subprocess.run(flags + ["--hide-scrollbars", f"--screenshot={shot}", "--window-size=1280,1600",
                                (folder / "gallery.html").as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 1600)
        assert np.asarray(im.convert("L")).std() > 10  # not a blank page


def test_cli_discover_with_classes(camvid_protos, tmp_path):
    protos, area, label, _ = _stacked(camvid_protos)
    keep = sorted(set(label[label >= 0].tolist()))[:3]
    out = tmp_path / "g"
    result = CliRunner().invoke(main, ["-q", "discover", str(camvid_protos), "-o", str(out), "--classes",
                                       ",".join(map(str, keep)), "--map", "pca", "--req-clust", "3"])
    assert result.exit_code == 0, result.output
    assert "purity" in result.output and "gallery.html" in result.output
    groups = read_groups(out)
    assert set(groups.rows.arrays["label"].tolist()) <= set(keep)
    assert (out / "gallery" / "requested.html").is_file()
