"""Staged pipelines from TOML: ``segsort-unsup run pipelines/<name>.toml``.

A pipeline file names an input and an output folder, how to execute per-image work, and one
section per stage of the registry (:func:`segsort_unsup.stages.registry`), whose keys are that
stage's config fields. Stages run in registry order into ``output/<stage folder>``; optional
stages (evaluate) run only when their section is present. Every stage resumes its store; a
stage whose settings (or whose input) changed is recomputed, and so is everything downstream
of it, while unchanged upstream stages are kept. Paths of inputs (weights, ground truth) are
relative to the TOML file's folder; ``png_dir``/``mat_dir`` are relative to the output folder.
Unknown sections or keys, wrong types and missing paths are errors naming file, section and key::

    [pipeline]
    input = "photos"            # folder, glob or list file
    output = "runs/photos"      # contours/, segments/, eval/ go here
    executor = "local"          # local | dask | dask-local
    workers = 2                 # processes (local) or Dask workers (dask-local)
    # scheduler = "tcp://host:8786"   # with executor = "dask"

    [contours]
    model = "pidinet"
    scales = [1.0]
    png_dir = "png/contours"

    [ucm]
    threshold = 0.5
    levels = [0.3, 0.7]
    png_dir = "png/segments"

    [evaluate]                  # optional: BSDS ground truth -> boundary and region benchmarks
    ground_truth = "BSDS500/groundTruth/test"
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import StageConfig
from .errors import InputError
from .log import get_logger
from .parallel import EXECUTORS, make_executor
from .stages import Stage, StageSummary, registry, run_stage

log = get_logger("pipeline")

_HEAD_KEYS = {"input": str, "output": str, "name": str, "description": str, "executor": str, "workers": int,
              "scheduler": str, "seed": int}
_OUTPUT_PATHS = ("png_dir", "mat_dir")


@dataclass
class Pipeline:
    """A parsed pipeline file: where from, where to, how to execute, and each stage's config."""

    path: Path
    input: str
    output: Path
    configs: dict[str, StageConfig] = field(default_factory=dict)
    executor: str = "local"
    workers: int = 1
    scheduler: str = ""

    @property
    def stages(self) -> dict[str, StageConfig]:
        return self.configs


def _resolve(base: Path, value: str) -> str:
    return value if os.path.isabs(value) else os.path.normpath(base / os.path.expanduser(value))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such pipeline file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder; give a pipeline .toml file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid TOML ({exc})") from None


def load_pipeline(path: str | os.PathLike, *, input: str | None = None,  # noqa: A002
                  output: str | os.PathLike | None = None, sections: dict[str, dict[str, Any]] | None = None
                  ) -> Pipeline:
    """Parse and validate a pipeline TOML file (a clear error names the file, section and key).

    ``input``/``output`` replace the file's (the demo points its packaged pipeline at a folder of
    its own); ``sections`` update stage sections key by key (e.g. the contour model the demo found).
    """
    path = Path(path)
    data = _read_toml(path)
    head = data.setdefault("pipeline", {})
    if input is not None:
        head["input"] = os.path.abspath(input)
    if output is not None:
        head["output"] = os.path.abspath(output)
    for name, values in (sections or {}).items():
        data.setdefault(name, {}).update(values)
    stages = {stage.name: stage for stage in registry()}
    unknown = sorted(set(data) - {"pipeline", *stages})
    if unknown:
        raise InputError(f"{path}: unknown section(s) {unknown}; known: pipeline, {', '.join(stages)}")
    for key, tp in _HEAD_KEYS.items():
        if key in head and not isinstance(head[key], tp) or (tp is int and isinstance(head.get(key), bool)):
            raise InputError(f"{path}: [pipeline] key {key!r} expects {tp.__name__}, got {head[key]!r}")
    for key in ("input", "output"):
        if not isinstance(head.get(key), str):
            raise InputError(f"{path}: [pipeline] needs {key} = \"...\" (a path)")
    extra = sorted(set(head) - set(_HEAD_KEYS))
    if extra:
        raise InputError(f"{path}: unknown key(s) in [pipeline]: {extra}; known: {', '.join(sorted(_HEAD_KEYS))}")
    executor = head.get("executor", "local")
    if executor not in EXECUTORS:
        raise InputError(f"{path}: [pipeline] executor {executor!r}: choose one of {', '.join(EXECUTORS)}")
    base = path.absolute().parent  # a linked pipeline file's paths are relative to the link
    output = Path(_resolve(base, head["output"]))
    if output.exists() and not output.is_dir():
        raise InputError(f"{path}: [pipeline] output {output} is a file, not a folder")
    configs: dict[str, StageConfig] = {}
    for name, stage in stages.items():
        if name not in data:
            if stage.optional:
                continue
            section: dict[str, Any] = {}
        else:
            section = dict(data[name])
        where = f"{path} [{name}]"
        for key in stage.input_paths:
            if isinstance(section.get(key), str):
                section[key] = _resolve(base, section[key])
                if not os.path.exists(section[key]):
                    raise InputError(f"{where}: key {key!r}: {section[key]} does not exist")
        for key in _OUTPUT_PATHS:
            if isinstance(section.get(key), str):
                section[key] = _resolve(output, section[key])
        configs[name] = stage.config.from_mapping(section, where=where)
    return Pipeline(path, _resolve(base, head["input"]), output, configs, executor=executor,
                    workers=int(head.get("workers", 1)), scheduler=head.get("scheduler", ""))


def _sources(stage: Stage, stages: dict[str, Stage], pipeline: Pipeline) -> Any:
    paths = [pipeline.input if s == "input" else str(pipeline.output / stages[s].output) for s in stage.sources]
    return paths[0] if len(paths) == 1 else paths


def run_pipeline(pipeline: Pipeline, *, overwrite: bool = False, from_stage: str | None = None,
                 until_stage: str | None = None) -> list[StageSummary]:
    """Run the configured stages in order; each resumes its store, changed ones are recomputed.

    ``from_stage``/``until_stage`` limit the run to a span of the registry (upstream outputs
    must then exist). Stops at a stage that cannot go on (its error names it).
    """
    stages = {stage.name: stage for stage in registry()}
    names = [n for n in stages if n in pipeline.configs]
    for bound in (from_stage, until_stage):
        if bound is not None and bound not in names:
            raise InputError(f"no stage {bound!r} in {pipeline.path}; its stages: {', '.join(names)}")
    if from_stage:
        names = names[names.index(from_stage):]
    if until_stage:
        names = names[: names.index(until_stage) + 1]
    summaries: list[StageSummary] = []
    with make_executor(pipeline.executor, workers=pipeline.workers, scheduler=pipeline.scheduler or None) as executor:
        for name in names:
            stage = stages[name]
            output = pipeline.output / stage.output
            try:
                results = run_stage(stage, pipeline.configs[name], _sources(stage, stages, pipeline), output,
                                    executor=executor, overwrite=True if overwrite else "changed")
            except InputError as exc:
                raise InputError(f"{pipeline.path} [{name}]: {exc}") from None
            summaries.extend(results)
    return summaries
