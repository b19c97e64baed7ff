"""Staged pipelines from TOML: ``segsort-unsup run pipelines/<name>.toml``.

A pipeline file names an input and an output folder and configures the stages that exist
today, run in order: ``contours`` -> ``ucm`` -> ``evaluate`` (only with ``ground_truth``).
Every stage writes a resumable store, so a re-run skips what is complete. Relative paths are
resolved against the TOML file's folder. Unknown sections or keys are errors that name them
(a typo never silently falls back to a default)::

    [pipeline]
    input = "photos"            # folder, glob or list file
    output = "runs/photos"      # contours/, segments/, eval-*/ go here

    [contours]                  # every key optional: ContoursConfig fields
    model = "pidinet"
    scales = [1.0]

    [ucm]                       # UcmConfig fields, plus workers and png
    threshold = 0.5
    levels = [0.3, 0.7]
    workers = 2
    png = true

    [evaluate]                  # optional: BSDS ground truth -> boundary and region benchmarks
    ground_truth = "BSDS500/groundTruth/test"
    workers = 2
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, SegsortError
from .log import get_logger
from .stage import StageSummary

log = get_logger("pipeline")

_STAGE_EXTRAS = {
    "contours": {"weights", "png"},
    "ucm": {"workers", "png", "mat"},
    "evaluate": {"ground_truth", "workers", "boundaries", "regions", "thresholds"},
}


@dataclass
class Pipeline:
    """A parsed pipeline file: where from, where to, and each stage's settings."""

    path: Path
    input: str
    output: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _resolve(base: Path, value: str) -> str:
    return value if os.path.isabs(value) else os.path.normpath(base / value)


def load_pipeline(path: str | os.PathLike) -> Pipeline:
    """Parse and validate a pipeline TOML file (a clear error names the file and the bad key)."""
    from .contours.stage import ContoursConfig
    from .ucm.stage import UcmConfig

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such pipeline file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None
    allowed = {
        "contours": _fields(ContoursConfig) | _STAGE_EXTRAS["contours"],
        "ucm": _fields(UcmConfig) | _STAGE_EXTRAS["ucm"],
        "evaluate": _STAGE_EXTRAS["evaluate"],
    }
    unknown = sorted(set(data) - {"pipeline", *allowed})
    if unknown:
        raise InputError(f"{path}: unknown section(s) {unknown}; known: pipeline, {', '.join(allowed)}")
    head = data.get("pipeline", {})
    for key in ("input", "output"):
        if not isinstance(head.get(key), str):
            raise InputError(f"{path}: [pipeline] needs {key} = \"...\" (a path)")
    extra = sorted(set(head) - {"input", "output", "name", "description"})
    if extra:
        raise InputError(f"{path}: unknown key(s) in [pipeline]: {extra}")
    base = path.resolve().parent
    stages: dict[str, dict[str, Any]] = {}
    for name in allowed:
        if name not in data:
            continue
        section = dict(data[name])
        bad = sorted(set(section) - allowed[name])
        if bad:
            raise InputError(f"{path}: unknown key(s) in [{name}]: {bad}; known: {', '.join(sorted(allowed[name]))}")
        for key in ("weights", "ground_truth"):
            if isinstance(section.get(key), str):
                section[key] = _resolve(base, section[key])
        stages[name] = section
    if "evaluate" in stages and "ground_truth" not in stages["evaluate"]:
        raise InputError(f"{path}: [evaluate] needs ground_truth = \"...\" (a folder of BSDS groundTruth .mat files)")
    stages.setdefault("contours", {})
    stages.setdefault("ucm", {})
    return Pipeline(path, _resolve(base, head["input"]), Path(_resolve(base, head["output"])), stages)


def _config(cls, section: dict[str, Any], extras: set[str], where: str):
    kwargs = {k: v for k, v in section.items() if k not in extras}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: {exc}") from None


def run_pipeline(pipeline: Pipeline, *, overwrite: bool = False) -> list[StageSummary]:
    """Run the stages in order; each resumes its store. Stops at a stage that cannot go on."""
    from .contours.stage import ContoursConfig, run_contours
    from .ucm.stage import UcmConfig, run_ucm

    out = pipeline.output
    where = str(pipeline.path)
    summaries: list[StageSummary] = []
    section = pipeline.stages["contours"]
    config = _config(ContoursConfig, section, _STAGE_EXTRAS["contours"], f"{where} [contours]")
    summaries.append(run_contours(config, pipeline.input, out / "contours", weights_path=section.get("weights"),
                                  overwrite=overwrite, png_dir=out / "png" / "contours" if section.get("png") else None))
    log.info("%s", summaries[-1].line())
    section = pipeline.stages["ucm"]
    ucm_config = _config(UcmConfig, section, _STAGE_EXTRAS["ucm"], f"{where} [ucm]")
    summaries.append(run_ucm(ucm_config, out / "contours", out / "segments", workers=int(section.get("workers", 1)),
                             overwrite=overwrite, png_dir=out / "png" / "segments" if section.get("png") else None,
                             mat_dir=out / "ucm2" if section.get("mat") else None))
    log.info("%s", summaries[-1].line())
    if "evaluate" in pipeline.stages:
        summaries.extend(_evaluate(pipeline, pipeline.stages["evaluate"]))
    return summaries


def _evaluate(pipeline: Pipeline, section: dict[str, Any]) -> list[StageSummary]:
    from .evaluate.bsds import BenchOptions, run_benchmark

    out = pipeline.output
    workers = int(section.get("workers", 1))
    n = int(section.get("thresholds", 99))
    done = []
    runs = []
    if section.get("boundaries", True):
        runs.append(("contours", out / "eval-contours", BenchOptions(n_thresholds=n)))
    if section.get("regions", True):
        runs.append(("segments", out / "eval-segments", BenchOptions(regions=True, n_thresholds=n)))
    for store, target, options in runs:
        try:
            report = run_benchmark(out / store, section["ground_truth"], target, options=options,
                                   workers=workers, overwrite=True, label=f"{pipeline.path.stem} {store}")
        except SegsortError as exc:
            raise InputError(f"{pipeline.path} [evaluate]: {exc}") from None
        report.stage.stage = f"evaluate {store}"
        done.append(report.stage)
        lines = []
        if report.boundary is not None:
            b = report.boundary
            lines.append(f"boundaries ODS {b.ods_f:.3f} OIS {b.ois_f:.3f} AP {b.ap:.3f}")
        if report.region is not None:
            r = report.region
            lines.append(f"covering {r.cover_ods:.3f}/{r.cover_ois:.3f} PRI {r.ri_ods:.3f}/{r.ri_ois:.3f} "
                         f"VI {r.voi_ods:.3f}/{r.voi_ois:.3f}")
        report.stage.output = f"{target}: {'; '.join(lines)}"  # the summary line carries the numbers
    return done
