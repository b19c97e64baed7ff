"""Every stage command takes its options from its config: one default, one type, one help per setting."""

from __future__ import annotations

import dataclasses
import os

import click
import pytest
from click.testing import CliRunner

from segsort_unsup import stages
from segsort_unsup.cli import main
from segsort_unsup.commands.options import stage_command
from segsort_unsup.config import cli_of

# Stages whose settings another command spells: the BSDS `evaluate` stage's are `evaluate boundaries`'s
# and `evaluate regions`' options (--gt, --thresholds, the subcommand choosing boundaries or regions).
NOT_A_COMMAND = {"evaluate"}


def _command(stage: stages.Stage) -> click.Command:
    ctx = click.Context(main)
    if stage.name == "semantic":
        return main.get_command(ctx, "evaluate").get_command(ctx, "semantic")
    return main.get_command(ctx, stage.name)


def _defaults(command: click.Command, tmp_path) -> dict:
    """The values the command passes when only its required arguments and options are given."""
    args = [str(tmp_path) for p in command.params if isinstance(p, click.Argument)]
    args += ["-o", str(tmp_path / "out")]
    if any("--gt" in p.opts for p in command.params):
        args += ["--gt", str(tmp_path)]
    return command.make_context(command.name, args).params


@pytest.mark.parametrize("stage", [s for s in stages.registry() if s.name not in NOT_A_COMMAND],
                         ids=lambda s: s.name)
def test_every_config_field_is_an_option_with_the_config_default(stage, tmp_path):
    command = _command(stage)
    params = _defaults(command, tmp_path)
    options = {p.name: p for p in command.params}
    for f in dataclasses.fields(stage.config):
        if cli_of(f).hidden or (stage.name == "semantic" and f.name == "ground_truth"):
            continue  # semantic's ground truth is the required --gt
        assert f.name in options, f"{stage.name}: no option for {f.name}"
        got = params[f.name]
        if stage.name == "semantic" and f.name == "ignore_label":
            got = None if got < 0 else got
        assert got == f.default, f"{stage.name} --{f.name}: default {got!r}, config {f.default!r}"
        if stage.name != "semantic":
            assert options[f.name].help, f"{stage.name}: {f.name} has no help"


def _config_of(stage_name: str, args: list[str], tmp_path):
    """The config a generated command builds from ``args`` (its stage's run replaced by a recorder)."""
    stage = next(s for s in stages.registry() if s.name == stage_name)
    seen = []

    def record(config, inputs, output, **_):
        seen.append(config)
        return stages.StageSummary(stage_name)

    command = stage_command(dataclasses.replace(stage, run=record))
    sources = [str(tmp_path)] * len(stage.arguments or stage.sources)
    result = CliRunner().invoke(command, [*sources, "-o", str(tmp_path / "out"), *args], standalone_mode=False)
    if result.exception:
        raise result.exception
    return seen[0]


# Spellings in users' commands and the README, and the setting each one gives.
SPELLINGS = [
    ("ucm", ["--no-owt"], {"oriented": False}),
    ("ucm", ["--levels", "0.3,0.5", "--ucm2-dtype", "uint16"], {"levels": (0.3, 0.5), "ucm2_dtype": "uint16"}),
    ("contours", ["--no-tile", "--tile-side", "640"], {"tile": False, "tile_side": 640}),
    ("contours", ["--tile-side", "auto", "--weights", "w.pth", "--scales", "0.5,1"],
     {"tile_side": None, "weights": os.path.abspath("w.pth"), "scales": (0.5, 1.0)}),
    ("train", ["--supervised", "labels", "--no-flip"], {"labels_dir": os.path.abspath("labels"), "flip": False}),
    ("train", ["--labels-dir", "labels", "--kappa", "5", "--memory-banks", "3", "--head-lr-mult", "4"],
     {"labels_dir": os.path.abspath("labels"), "kappa": 5.0, "memory_banks": 3, "head_lr_mult": 4.0}),
    ("train", ["--workers", "0", "--feature-layer", "conv5_3"], {"workers": 0, "feature_layer": "conv5_3"}),
    ("features", ["--no-flip", "--feature-scales", "1"], {"flip": False, "feature_scales": (1.0,)}),
    ("embed", ["--grid", "3", "4", "--flip", "--units", "ucm:0.5", "--segments", "."],
     {"grid": (3, 4), "flip": True, "units": "ucm:0.5"}),
    ("discover", ["--no-gallery", "--map", "pca", "--level", "requested", "--classes", "1,3"],
     {"gallery": False, "map_method": "pca", "level": "requested", "classes": (1, 3)}),
    ("discover", ["--level", "2", "--req-clust", "7"], {"level": 2, "req_clust": 7}),
    ("transfer", ["--k", "5", "--index", "ivf", "--nprobe", "4"], {"k": 5, "index": "ivf", "nprobe": 4}),
    ("cluster", ["--groups", "4", "--method", "finch", "--seed", "3"], {"groups": 4, "method": "finch", "seed": 3}),
]


@pytest.mark.parametrize("stage_name, args, expected", SPELLINGS,
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_existing_spellings_set_their_setting(stage_name, args, expected, tmp_path):
    config = _config_of(stage_name, args, tmp_path)
    assert {key: getattr(config, key) for key in expected} == expected


def test_path_settings_are_made_absolute_from_the_working_folder(tmp_path, monkeypatch):
    """A relative path in a command names a file from where it ran; the run's identity must hold
    the file itself, as a pipeline file's resolved paths do, not the text typed."""
    (tmp_path / "work" / "ucm").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    config = _config_of("embed", ["--units", "ucm:0.3", "--segments", "ucm", "--labels", "a", "--labels", "../b"],
                        tmp_path)
    assert config.segments == str(tmp_path / "work" / "ucm")
    assert config.labels == (str(tmp_path / "work" / "a"), str(tmp_path / "b"))
    assert _config_of("embed", ["--units", "ucm:0.3", "--segments", str(tmp_path)], tmp_path).segments == str(tmp_path)


def test_a_bad_choice_is_a_usage_error_naming_the_choices(tmp_path):
    with pytest.raises(click.BadParameter, match="bf16"):
        _config_of("train", ["--precision", "fp8"], tmp_path)


def test_a_config_error_names_the_options(tmp_path):
    with pytest.raises(Exception, match="needs --png-dir"):
        _config_of("contours", ["--nms-png"], tmp_path)
