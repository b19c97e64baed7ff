"""`segsort-unsup run` on pipeline TOML files: validation, a real small run, resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from segsort_unsup.cli import main
from segsort_unsup.errors import InputError
from segsort_unsup.io.store import StoreReader
from segsort_unsup.pipeline import load_pipeline


def _write(tmp_path, text):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("[pipeline]\ninput='a'\n", "needs output"),
    ("[pipeline]\ninput='a'\noutput='b'\n[contour]\n", "unknown section"),
    ("[pipeline]\ninput='a'\noutput='b'\n[ucm]\nthreshhold=0.3\n", "threshhold"),
    ("[pipeline]\ninput='a'\noutput='b'\n[evaluate]\nthresholds=9\n", r"\[evaluate\]: key 'ground_truth'"),
    ("[pipeline]\ninput='a'\noutput='b'\n[contours]\nscales=1.0\n",
     r"p.toml \[contours\]: key 'scales' expects list of float, got float 1.0 \(example: scales = \[0.5, 0.5\]\)"),
    ("[pipeline]\ninput='a'\noutput='b'\n[contours]\nshard_size=0\n", r"\[contours\]: key 'shard_size': must be >= 1"),
    ("[pipeline]\ninput='a'\noutput='b'\n[ucm]\nlevels=['x']\n", r"\[ucm\]: key 'levels' expects list of float"),
    ("[pipeline]\ninput='a'\noutput='b'\n[contours]\nweights='missing.pth'\n", r"\[contours\]: key 'weights': .*does not exist"),
    ("[pipeline]\ninput='a'\noutput='b'\nexecutor='spark'\n", "executor 'spark'"),
    ("[pipeline]\ninput='a'\noutput='b'\nworkers='2'\n", "'workers' expects int"),
    ("[pipeline\n", "not valid TOML"),
    ("train = 5\n[pipeline]\ninput='a'\noutput='b'\n", r"p.toml: train = 5 is not a section; write \[train\]"),
    ("pipeline = 'x'\n", r"pipeline = 'x' is not a section"),
    ("[pipeline]\ninput='a'\noutput='b'\nworkers=0\n", r"\[pipeline\] workers = 0: give 1 or more"),
    ("[pipeline]\ninput='a'\noutput='b'\nseed=-1\n", r"\[pipeline\] seed = -1: give a seed between 0 and"),
    ("[pipeline]\ninput='a'\noutput='b'\n[train]\nseed=-1\n", r"\[train\]: key 'seed': must be between 0 and"),
    ("[pipeline]\ninput='a'\noutput='b'\n[ucm]\nthreshhold=0.3\n", r"threshhold \(did you mean 'threshold'\?\)"),
    ("[pipeline]\ninput='a'\noutput='b'\n[discovr]\n", r"\['discovr'\] \(did you mean 'discover'\?\)"),
    ("[pipeline]\ninput='a'\noutput='b'\nworker=2\n", r"\['worker'\] \(did you mean 'workers'\?\)"),
])
def test_bad_files_name_the_problem(tmp_path, text, message):
    with pytest.raises(InputError, match=message):
        load_pipeline(_write(tmp_path, text))


@pytest.fixture
def repo_pipelines(tmp_path, shared):
    """The repository's pipelines/ in a checkout whose ../shared is the test data (paths as in a user's)."""
    import shutil

    checkout = tmp_path / "checkout"
    shutil.copytree(Path(__file__).resolve().parents[1] / "pipelines", checkout / "pipelines")
    (tmp_path / "shared").symlink_to(shared, target_is_directory=True)
    return checkout / "pipelines"


def test_repo_pipelines_parse(repo_pipelines):
    files = sorted(repo_pipelines.glob("*.toml"))
    assert {"camvid.toml", "camvid_ablation.toml"} <= {p.name for p in files}
    for path in files:
        if (path.with_suffix(".py")).is_file():
            continue  # read by its own driver script
        pipe = load_pipeline(path)
        assert pipe.sections[0].stage.name == "contours" and pipe.output.is_absolute()
        for section in pipe.sections:  # every source resolves to an input or an earlier section's folder
            assert all(Path(p).is_absolute() for p in _paths(pipe, section))


def _paths(pipe, section):
    paths = pipe.source_paths(section)
    return [paths] if isinstance(paths, str) else paths


def _camvid_rows(pipe):
    return {s.name: s for s in pipe.sections}


def test_camvid_trains_and_labels_with_all_367_train_frames(repo_pipelines, shared):
    from segsort_unsup.io.images import list_images
    from segsort_unsup.io.labels import LabelFiles

    camvid = shared / "data" / "camvid"
    pipe = load_pipeline(repo_pipelines / "camvid.toml")
    rows = _camvid_rows(pipe)
    refs = list_images(pipe.inputs["input"])
    expected = sorted(p.stem for d in ("train", "extra") for p in (camvid / d).glob("*.png"))
    assert [r.key for r in refs] == expected and len(expected) == 367
    assert _paths(pipe, rows["embed.unsup-labelled"])[1] == pipe.inputs["input"]
    folders = (str(camvid / "trainannot"), str(camvid / "extraannot"))
    for name in ("train.sup", "embed.unsup-labelled", "embed.sup-labelled"):
        config = rows[name].config
        got = config.labels_dir if name.startswith("train") else config.labels
        assert tuple(Path(p).resolve() for p in got) == tuple(Path(p).resolve() for p in folders)
    labels = LabelFiles(folders)
    for ref in refs:  # every frame's label is the same-named PNG of the folder the frame came from
        folder = "trainannot" if ref.path.parent.name == "train" else "extraannot"
        assert labels.require(ref.key, ref.path).resolve() == (camvid / folder / f"{ref.key}.png").resolve()
    assert rows["train.unsup"].config.labels_dir is None
    for row in ("init", "raw", "unsup", "sup"):  # Hungarian rows: label-free clusters of the scored prototypes, matched
        assert rows[f"cluster.{row}"].sources == (f"embed.{row}-scored",)
        assert rows[f"cluster.{row}"].config.groups == 11
        hungarian = rows[f"semantic.{row}-hungarian"]
        assert hungarian.sources == (f"cluster.{row}",) and hungarian.config.hungarian


@pytest.mark.parametrize("name", ["camvid.toml", "camvid_ablation.toml"])
def test_camvid_scored_set_is_replaced_from_the_command_line(repo_pipelines, tmp_path, name):
    other, other_labels = tmp_path / "other", tmp_path / "other_labels"
    other.mkdir()
    other_labels.mkdir()
    pipe = load_pipeline(repo_pipelines / name, inputs={"scored": str(other), "scored_labels": str(other_labels)})
    scored_readers = [s for s in pipe.sections if "scored" in s.sources]
    assert scored_readers
    for section in scored_readers:
        assert str(other) in _paths(pipe, section)
    semantic = [s for s in pipe.sections if s.stage.name == "semantic"]
    assert semantic and all(s.config.ground_truth == str(other_labels) for s in semantic)


def test_camvid_scored_inputs_through_the_installed_command(repo_pipelines, tmp_path):
    import os
    import subprocess
    import sys

    other, other_labels = tmp_path / "other", tmp_path / "other_labels"
    other.mkdir()
    other_labels.mkdir()
    command = [str(Path(sys.executable).parent / "segsort-unsup"), "run", str(repo_pipelines / "camvid.toml"),
               "-o", str(tmp_path / "out"), "--input", f"scored={other}", "--input", f"scored_labels={other_labels}"]
    # parsed with the replaced inputs, it stops at the first stage run: the hungarian row has no clusters yet
    done = subprocess.run([*command, "--from", "semantic.unsup-hungarian"], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=120)
    assert done.returncode != 0 and "no predictions to score" in done.stderr
    assert "Traceback" not in done.stderr and str(tmp_path / "out" / "clusters" / "unsup") in done.stderr
    typo = subprocess.run([*command[:-2], "--input", f"scored_label={other_labels}", "--from", "semantic"],
                          capture_output=True,
                          text=True, env=os.environ.copy(), timeout=120)
    assert typo.returncode != 0 and "no input named 'scored_label'" in typo.stderr


def test_camvid_ablation_scores_ucm_units_on_the_scored_sets_own_regions(repo_pipelines):
    pipe = load_pipeline(repo_pipelines / "camvid_ablation.toml")
    rows = _camvid_rows(pipe)
    assert rows["contours.scored"].sources == ("scored",) and rows["ucm.scored"].sources == ("contours.scored",)
    assert rows["contours.train"].sources == ("input",)
    for row, cut, regions in (("unsup", "0.3", ""), ("unsup-ucm01", "0.1", "fine-")):
        scored, labelled = rows[f"embed.{row}-scored"].config, rows[f"embed.{row}-labelled"].config
        assert scored.units == labelled.units == f"ucm:{cut}"
        assert scored.segments == str(rows[f"ucm.{regions}scored"].output)
        assert labelled.segments == str(rows[f"ucm.{regions}train"].output)
        assert float(cut) in rows[f"ucm.{regions}scored"].config.levels
    assert {rows[f"embed.unsup-grid{n}-scored"].config.units for n in (5, 8, 12)} == {"grid5", "grid8", "grid12"}
    views = rows["embed.unsup-views-scored"].config
    assert views.scales == (0.75, 1.0, 1.25) and views.flip
    for row in ("unsup", "sup"):  # the headline embeds with the released views; its 1-view rows change only that
        for part in ("labelled", "scored"):
            one, base = rows[f"embed.{row}-1view-{part}"], rows[f"embed.{row}-{part}"]
            assert (base.config.scales, base.config.flip) == (views.scales, True)
            assert one.sources == base.sources and (one.config.scales, one.config.flip) == ((1.0,), False)
            assert dataclasses.replace(one.config, scales=base.config.scales, flip=True) == base.config
    for row in ("unsup", "sup"):  # twice the size: the 1x1-head models of the headline's regime, one view
        for part in ("labelled", "scored"):
            scale2, base = rows[f"embed.{row}-scale2-{part}"], rows[f"embed.{row}-head1x1-{part}"]
            assert scale2.sources == base.sources and scale2.config.scales == (2.0,)
            assert dataclasses.replace(scale2.config, scales=base.config.scales) == base.config
    for row in ("unsup", "sup"):  # the headline's models at stride 4: dense is their only change from -1view
        for part in ("labelled", "scored"):
            dense, one = rows[f"embed.{row}-dense-{part}"], rows[f"embed.{row}-1view-{part}"]
            assert dense.sources == one.sources and dense.config.dense and not one.config.dense
            assert dataclasses.replace(dense.config, dense=False) == one.config
    headline = rows["train.unsup"].config
    # twice the size: the headline's unsupervised model trained at 2x its scales, in a cache of its own,
    # and embedded at scale 2 (one view)
    x2 = rows["train.unsup-x2"].config
    assert x2.feature_scales == tuple(2 * s for s in headline.feature_scales)
    assert dataclasses.replace(x2, feature_scales=headline.feature_scales,
                               features_dir=headline.features_dir) == headline
    assert x2.features_dir not in (headline.features_dir, rows["train.unsup-cut03"].config.features_dir)
    for part in ("labelled", "scored"):
        big, one = rows[f"embed.unsup-x2-{part}"], rows[f"embed.unsup-1view-{part}"]
        assert big.sources == ("train.unsup-x2",) + one.sources[1:] and big.config.scales == (2.0,)
        assert dataclasses.replace(big.config, scales=one.config.scales) == one.config
    # the training-cut row: the headline's unsupervised model on the 0.3 cut, in a cache of its own
    cut03 = rows["train.unsup-cut03"].config
    assert (headline.cut, cut03.cut) == (None, 0.3) and cut03.features_dir != headline.features_dir
    assert dataclasses.replace(cut03, cut=None, features_dir=headline.features_dir) == headline
    assert rows["embed.unsup-cut03-scored"].config == rows["embed.unsup-1view-scored"].config
    assert rows["train.unsup-92"].sources == ("ucm.train92",)
    assert rows["train.unsup-92"].config.features_dir != rows["train.unsup"].config.features_dir
    regimes = {name: rows[f"train.unsup{name}"].config for name in ("-head", "-last1", "-head1x1", "-full")}
    assert [c.train_blocks for c in regimes.values()] == [0, 1, 2, None] and regimes["-full"].mode == "full"
    # the units, images and views axes keep the conv4 + head base they were measured on
    for row in ("grid5", "grid8", "grid12", "ucm01", "views"):
        assert rows[f"embed.unsup-{row}-scored"].sources[0] == "train.unsup-last1"
    assert rows["train.unsup-92"].config.train_blocks == rows["train.unsup-last1"].config.train_blocks == 1
    assert len({c.steps for c in regimes.values()}) == 1 and len({c.features_dir for c in regimes.values()}) == 4
    # the head rows change only the head of their base (both regimes), and share its feature cache;
    # the regime rows all keep the 1x1 head
    assert {c.head for c in regimes.values()} == {"conv1"}
    for base_row, row in (("unsup-last1", "unsup-last1-head3x3"), ("sup-last1", "sup-last1-head3x3"),
                          ("unsup-head1x1", "unsup"), ("sup-head1x1", "sup")):
        base, head3 = rows[f"train.{base_row}"].config, rows[f"train.{row}"].config
        assert (base.head, head3.head) == ("conv1", "conv3")
        assert dataclasses.replace(head3, head=base.head) == base
        assert rows[f"semantic.{row}"].sources == (f"transfer.{row}",)
        assert rows[f"embed.{row}-scored"].sources == (f"train.{row}", "scored")


def test_camvid_ablation_shares_the_headline_sections_unchanged(repo_pipelines):
    """The ablation writes into camvid.toml's folder: every section both files name must be the
    same (settings, sources, folder), or one file's run would recompute the other's stores."""
    headline = {s.name: s for s in load_pipeline(repo_pipelines / "camvid.toml").sections}
    ablation = {s.name: s for s in load_pipeline(repo_pipelines / "camvid_ablation.toml").sections}
    shared = set(headline) & set(ablation)
    assert {"ucm.train", "train.unsup", "train.sup", "embed.unsup-scored", "semantic.sup"} <= shared
    for name in shared:
        a, b = headline[name], ablation[name]
        assert (a.config, a.sources, a.output) == (b.config, b.sources, b.output), name


def test_path_keys_take_lists_and_earlier_sections(tmp_path):
    for name in ("a", "b", "imgs"):
        (tmp_path / name).mkdir()
    text = ("[pipeline]\ninput='imgs'\noutput='out'\n[pipeline.inputs]\nla='a'\n"
            "[train]\nlabels_dir=['@la', 'b']\n[embed]\nunits='ucm:0.5'\nsegments='@ucm'\n")
    pipe = load_pipeline(_write(tmp_path, text))
    assert {s.name: s.config for s in pipe.sections}["train"].labels_dir == (str(tmp_path / "a"), str(tmp_path / "b"))
    assert {s.name: s.config for s in pipe.sections}["embed"].segments == str(tmp_path / "out" / "segments")
    with pytest.raises(InputError, match=r"\[train\]: key 'labels_dir': .*missing does not exist"):
        load_pipeline(_write(tmp_path, text.replace("'b'", "'missing'")))
    with pytest.raises(InputError, match=r"\[contours\]: key 'weights': no input named 'embed'"):
        load_pipeline(_write(tmp_path, text + "[contours]\nweights='@embed'\n"))  # a later section: not yet written


def test_output_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "b").write_text("x")
    with pytest.raises(InputError, match="output .* is a file"):
        load_pipeline(_write(tmp_path, "[pipeline]\ninput='a'\noutput='b'\n"))


def test_registry_drives_the_pipeline():
    from segsort_unsup.stages import registry

    names = [stage.name for stage in registry()]
    assert names == ["contours", "ucm", "features", "train", "embed", "transfer", "cluster", "semantic", "discover",
                     "evaluate"]
    for stage in registry():
        assert stage.config.stage == stage.name and callable(stage.run)


@pytest.mark.slow
def test_run_small_bsds_pipeline_and_resume(tmp_path, bsds, pidinet_dir):
    ids = ["100007", "101027", "10081"]
    (tmp_path / "list.txt").write_text("".join(f"{bsds}/images/test/{i}.jpg\n" for i in ids))
    gt = tmp_path / "gt"
    gt.mkdir()
    for i in ids:
        (gt / f"{i}.mat").symlink_to(bsds / "groundTruth" / "test" / f"{i}.mat")
    path = _write(tmp_path, f"""
[pipeline]
input = "list.txt"
output = "out"
[contours]
model = "pidinet-tiny"
weights = "{pidinet_dir / 'table5_pidinet-tiny.pth'}"
[ucm]
levels = [0.3, 0.6]
png_dir = "png/segments"
[evaluate]
ground_truth = "gt"
thresholds = 9
""")
    first = CliRunner().invoke(main, ["-q", "run", str(path)])
    assert first.exit_code == 0, first.output
    assert "boundaries ODS 0." in first.output and "covering 0." in first.output
    with StoreReader(tmp_path / "out" / "segments", kind="segments") as store:
        assert store.keys() == sorted(ids)
        assert store[ids[0]].arrays["labels_levels"].shape[0] == 2
    assert (tmp_path / "out" / "png" / "segments" / f"{ids[0]}_overview.png").is_file()
    summary = json.loads((tmp_path / "out" / "eval" / "segments" / "summary.json").read_text())
    assert summary["images"] == 3 and 0.5 < summary["boundaries"]["ods"] < 1
    assert 0.3 < summary["regions"]["covering_ods"] < 1
    again = CliRunner().invoke(main, ["-q", "run", str(path)])
    assert again.exit_code == 0 and "contours: 0 done, 3 already complete" in again.output
    assert "ucm: 0 done, 3 already complete" in again.output
    assert "evaluate segments: 0 done, 3 already complete" in again.output  # nothing recomputed
    # one changed key re-runs that stage and what follows it, nothing upstream
    path.write_text(path.read_text().replace("levels = [0.3, 0.6]", "levels = [0.3, 0.6]\nthreshold = 0.4"))
    changed = CliRunner().invoke(main, ["-q", "run", str(path)])
    assert changed.exit_code == 0, changed.output
    assert "contours: 0 done, 3 already complete" in changed.output
    assert "ucm: 3 done, 0 already complete" in changed.output
    assert "evaluate segments: 3 done" in changed.output and "evaluate contours: 0 done, 3 already complete" in changed.output


SECTIONS = """
[pipeline]
input = "photos"
output = "out"
[pipeline.inputs]
scored = "val"
scored_labels = "valannot"
[train]
steps = 7
crop = 64
[train.a]
[train.b]
steps = 3
"""


def _tree(tmp_path):
    for name in ("photos", "val", "valannot"):
        (tmp_path / name).mkdir(exist_ok=True)


def test_sub_sections_are_instances_sharing_the_stage_keys(tmp_path):
    _tree(tmp_path)
    pipe = load_pipeline(_write(tmp_path, SECTIONS + """
[embed.a-scored]
from = ["train.a", "scored"]
[semantic]
ground_truth = "@scored_labels"
from = "transfer"
[transfer]
from = ["embed.a-scored", "embed.a-scored"]
"""))
    by_name = {s.name: s for s in pipe.sections}
    assert [n for n in by_name if n.startswith("train")] == ["train.a", "train.b"]
    assert by_name["train.a"].config.steps == 7 and by_name["train.b"].config.steps == 3
    assert by_name["train.a"].config.crop == by_name["train.b"].config.crop == 64
    assert by_name["train.b"].output == tmp_path / "out" / "train" / "b"
    assert by_name["ucm"].output == tmp_path / "out" / "segments"  # a stage run once keeps its folder
    assert pipe.source_paths(by_name["embed.a-scored"]) == [str(tmp_path / "out" / "train" / "a"), str(tmp_path / "val")]
    assert pipe.source_paths(by_name["train.b"]) == str(tmp_path / "out" / "segments")
    assert by_name["semantic"].config.ground_truth == str(tmp_path / "valannot")
    # a named input replaced as `run --input scored=...` does
    (tmp_path / "test").mkdir()
    other = load_pipeline(tmp_path / "p.toml", inputs={"scored": str(tmp_path / "test")})
    section = next(s for s in other.sections if s.name == "embed.a-scored")
    assert other.source_paths(section)[1] == str(tmp_path / "test")


def test_idle_workers_are_let_go_before_a_stage_that_works_in_this_process(tmp_path, monkeypatch):
    """The stages share the pipeline's worker processes; a stage that runs in the calling process
    (training, the kNN transfer) gets the machine to itself: the idle workers are let go first."""
    import segsort_unsup.pipeline as pipeline_module
    from segsort_unsup.parallel import InProcess
    from segsort_unsup.stages import StageSummary

    events = []

    class Recorder(InProcess):
        def release_idle(self):
            events.append("release")

    def fake_run_stage(stage, config, inputs, output, *, executor, overwrite):
        events.append(stage.name)
        return [StageSummary(stage.name)]

    monkeypatch.setattr(pipeline_module, "make_executor", lambda *a, **k: Recorder())
    monkeypatch.setattr(pipeline_module, "run_stage", fake_run_stage)
    _tree(tmp_path)
    pipeline_module.run_pipeline(load_pipeline(_write(tmp_path, SECTIONS + """
[embed.a-scored]
from = ["train.a", "scored"]
[transfer]
from = ["embed.a-scored", "embed.a-scored"]
[semantic]
ground_truth = "@scored_labels"
""")))
    assert events == ["contours", "ucm", "release", "train", "release", "train", "embed", "release", "transfer",
                      "semantic"]


@pytest.mark.parametrize("extra, message", [
    ("[embed]\n", r"\[embed\]: reads 'train', which runs 2 times \(train.a, train.b\); say which with from"),
    ("[embed.x]\nfrom = ['train.c', 'input']\n", r"\[embed.x\]: key 'from': 'train.c' is neither an input nor a section before"),
    ("[embed.x]\nfrom = ['train.a']\n", r"key 'from' needs 2 name\(s\) \(train, input\), got 1"),
    ("[embed.x]\nfrom = [3, 'input']\n", "key 'from' expects a list of section or input names"),
    ("[embed.x]\nfrom = ['train.a', 'input']\nlabels = '@nothing'\n", r"key 'labels': no input named 'nothing'"),
    ("[embed.x]\nfrom = ['train.a', 'input']\nlabels = 'missing'\n", r"key 'labels': .*missing does not exist"),
    ("[transfer.t]\nfrom = ['embed.x', 'embed.x']\n[embed.x]\nfrom = ['transfer.t', 'input']\n",
     "'transfer.t' is neither an input nor a section before"),  # registry order: embed runs before transfer
])
def test_bad_sections_name_the_problem(tmp_path, extra, message):
    _tree(tmp_path)
    with pytest.raises(InputError, match=message):
        load_pipeline(_write(tmp_path, SECTIONS + extra))


def test_named_inputs_errors(tmp_path):
    _tree(tmp_path)
    with pytest.raises(InputError, match="no input named 'scord' to replace; its inputs: input, scored, scored_labels"):
        load_pipeline(_write(tmp_path, SECTIONS), inputs={"scord": "x"})
    with pytest.raises(InputError, match=r"input name\(s\) \['train'\] are also stage names"):
        load_pipeline(_write(tmp_path, SECTIONS.replace("scored = ", "train = ")))
    with pytest.raises(InputError, match=r"\[pipeline.inputs\] 'scored' expects a path string"):
        load_pipeline(_write(tmp_path, SECTIONS.replace('scored = "val"', "scored = 3")))


def test_run_option_input_replaces_a_named_input(tmp_path):
    _tree(tmp_path)
    path = _write(tmp_path, SECTIONS)
    result = CliRunner().invoke(main, ["run", str(path), "--input", "nope=x"])
    assert result.exit_code != 0 and "no input named 'nope'" in result.output
    result = CliRunner().invoke(main, ["run", str(path), "--input", "=x"])
    assert result.exit_code != 0 and "give PATH or NAME=PATH" in result.output


@pytest.mark.slow
def test_camvid_pipeline_file_runs_end_to_end_and_takes_another_scored_set(tmp_path, shared, pidinet_dir, hed_h5):
    """The repository's camvid.toml on 3 labelled + 2 scored CamVid images at half size (a few
    steps): every section runs, a re-run recomputes nothing, and another scored set given by path
    recomputes only what reads it."""
    from PIL import Image

    camvid = shared / "data" / "camvid"
    sets = {"tr": ("train", 3, 0), "tra": ("trainannot", 2, 0), "tra2": ("trainannot", 1, 2), "va": ("val", 2, 0),
            "vaa": ("valannot", 2, 0), "te": ("val", 2, 2), "tea": ("valannot", 2, 2)}
    for name, (split, n, skip) in sets.items():
        (tmp_path / name).mkdir()
        for f in sorted((camvid / split).glob("*.png"))[skip:skip + n]:
            image = Image.open(f)  # 240 x 180: the six views' embeds dominate this test's time
            resample = Image.Resampling.NEAREST if split.endswith("annot") else Image.Resampling.BILINEAR
            image.resize((image.width // 2, image.height // 2), resample).save(tmp_path / name / f.name)
    repo = Path(__file__).resolve().parents[1]
    inputs = {"input": tmp_path / "tr", "labelled": tmp_path / "tr",  # labels in two folders, as train + extra
              "train_labels": tmp_path / "tra", "extra_labels": tmp_path / "tra2",
              "scored": tmp_path / "va", "scored_labels": tmp_path / "vaa", "class_names": camvid / "classes.txt"}
    sections = {"contours": {"model": "pidinet-tiny", "weights": str(pidinet_dir / "table5_pidinet-tiny.pth")},
                "train": {"steps": 4, "batch_size": 2, "feature_scales": [1.0], "backbone_weights": str(hed_h5)}}

    def run(**changed):
        pipe = load_pipeline(repo / "pipelines" / "camvid.toml", output=tmp_path / "out", sections=sections,
                             inputs={k: str(v) for k, v in {**inputs, **changed}.items()})
        return {s.stage: s for s in run_pipeline(pipe)}

    from segsort_unsup.pipeline import run_pipeline

    first = run()
    rows = ("init", "raw", "unsup", "sup")
    hungarian = tuple(f"{r}-hungarian" for r in rows)
    assert all(first[f"semantic.{r}"].done == 2 for r in rows + hungarian), first
    assert first["train.init"].done == 0 and first["train.sup"].done == 4
    for r in rows + hungarian:
        scores = json.loads((tmp_path / "out" / "semantic" / r / "semantic.json").read_text())
        assert 0 < scores["miou"] < 1 and len(scores["iou"]) == 11
    with StoreReader(tmp_path / "out" / "prototypes" / "sup-labelled", kind="prototypes") as store:
        assert sorted(store.keys()) == sorted(p.stem for p in (tmp_path / "tr").iterdir())  # all 3 labelled
    assert sorted(p.name for p in (tmp_path / "out" / "predictions" / "sup").glob("*.png")) == \
        sorted(p.name for p in (tmp_path / "va").iterdir())
    again = run()
    assert all(s.done == 0 for s in again.values()), [s.line() for s in again.values() if s.done]
    other = run(scored=tmp_path / "te", scored_labels=tmp_path / "tea")
    redone = {name for name, s in other.items() if s.done}
    assert redone == {f"{stage}.{r}{suffix}" for r in rows
                      for stage, suffix in (("embed", "-scored"), ("transfer", ""), ("semantic", ""))} | \
        {f"cluster.{r}" for r in rows} | {f"semantic.{r}" for r in hungarian} | {"contours.scored", "ucm.scored"} | \
        {f"{stage}.{r}-balanced" for r in ("unsup", "sup") for stage in ("transfer", "semantic")}
    # the scored rows' units are the regions of the scored set's own ucm store, whose content now
    # differs: the scored stores are recomputed for the new set, and the scores are its own
    assert {p.name for p in (tmp_path / "out" / "predictions" / "sup").glob("*.png")} == \
        {p.name for p in (tmp_path / "te").iterdir()}
    scores = json.loads((tmp_path / "out" / "semantic" / "sup" / "semantic.json").read_text())
    assert scores["images"] == 2 and scores["missing"] == []
    # a label map rewritten in place is scored again
    (tmp_path / "tea" / sorted(p.name for p in (tmp_path / "tea").iterdir())[0]).unlink()
    last = run(scored=tmp_path / "te", scored_labels=tmp_path / "tea")
    assert last["semantic.sup"].done == 1 and last["embed.sup-scored"].done == 0


def test_pipeline_seed_is_every_seeded_stages_default(tmp_path):
    pipe = load_pipeline(_write(tmp_path, "[pipeline]\ninput='a'\noutput='b'\nseed=7\n[train]\n[embed]\n[discover]\nseed=3\n"))
    configs = {s.name: s.config for s in pipe.sections}
    assert configs["train"].seed == 7 and configs["discover"].seed == 3


def test_workers_default_to_one_per_core_and_paths_are_relative_to_the_file(tmp_path):
    import os

    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "p.toml"
    path.write_text("[pipeline]\ninput='photos'\noutput='../out'\n")
    pipe = load_pipeline(path)
    assert pipe.workers == len(os.sched_getaffinity(0))
    assert pipe.input == str(tmp_path / "sub" / "photos") and pipe.output == tmp_path / "out"
