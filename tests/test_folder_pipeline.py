

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
max_side = 160
""")
    done = _cli("run", str(pipeline), env=dict(os.environ), cwd=tmp_path, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]  # one photo failed; the two others are kept
    listed = dict(re.findall(r"^  (\S+ \(\w+\))\s+(\S+)$", done.stdout, re.M))
    assert listed == {"pictures (contours)": str(tmp_path / "out" / "png" / "contours"),
                      "store (contours)": str(tmp_path / "out" / "contours")}, done.stdout
